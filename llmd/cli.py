"""The ``llmd`` command: serve, check, keys, usage, status, rag (ragcli.py), load, unload, version."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from . import __version__, configfile
from . import config as config_mod


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="config file (default: ./config.yaml, then /etc/llm-api/config.yaml)")


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import serve

    try:
        path = config_mod.find(args.config)
        return serve(path)
    except config_mod.ConfigError as e:
        print(e, file=sys.stderr)
        return 1


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = configfile.load(args.config)
    except config_mod.ConfigError as e:
        print(e, file=sys.stderr)
        print(f"{e.source}: {len(e.errors)} error(s); config is invalid", file=sys.stderr)
        return 1
    replicas = sum(m.replicas if m.backend != "openai" else len(m.urls) for m in cfg.models.values())
    auth = f"{len(cfg.keys)} key(s)" if cfg.keys else f"no keys: OPEN to every client of {cfg.server.host}"
    rag = f", {len(cfg.rag.collections)} collection(s)" if cfg.rag.collections else ""
    print(
        f"{cfg.source}: ok: {len(cfg.models)} model(s), {replicas} replica(s), {len(cfg.tiers)} tier(s), "
        f"{auth}{rag}, listening on {cfg.server.host}:{cfg.server.port}"
    )
    if cfg.limits.store == "redis" or (cfg.usage.enabled and cfg.usage.store == "postgres"):
        import asyncio

        from .fleet import probe

        failed = 0
        for store, ok, what in asyncio.run(probe(cfg)):
            print(f"{store} store: {'ok' if ok else 'UNREACHABLE'}: {what}", file=sys.stdout if ok else sys.stderr)
            failed += not ok
        if failed:
            return 1
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"llmd {__version__}")
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    from .auth import hash_secret, new_secret

    secret = new_secret()
    print(f"# secret for key {args.id!r} (shown once; give it to its owner, store it nowhere else):")
    print(secret)
    print("# add to config.yaml under keys:")
    print(f"  - id: {args.id}")
    if args.tier:
        print(f"    tier: {args.tier}")
    print(f"    sha256: {hash_secret(secret)}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from .report import format_report, report_file
    from .schema import LedgerError

    path = args.db
    if args.action == "migrate" or path is None:
        try:
            cfg = configfile.load(args.config)
        except config_mod.ConfigError as e:
            print(e, file=sys.stderr)
            return 1
        if cfg.usage.store == "postgres":
            return _usage_postgres(args, cfg)
        if args.action == "migrate":
            print("llmd usage migrate: usage.store of the config is not postgres", file=sys.stderr)
            return 1
        path = cfg.usage.path
    if not os.path.exists(path):
        print(f"no usage database at {path}", file=sys.stderr)
        return 1
    try:
        rows = report_file(path, month=args.month, key=args.key, model=args.model)
    except (ValueError, LedgerError) as e:
        print(f"llmd usage: {e}", file=sys.stderr)
        return 1
    print(format_report(rows, args.format))
    return 0


def _usage_postgres(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    import socket

    from . import fleet
    from .report import format_report
    from .schema import LedgerError

    try:
        if args.action == "migrate":
            if not args.source or args.source[0] != "sqlite":
                print("llmd usage migrate: --from sqlite FILE is required", file=sys.stderr)
                return 2
            n = fleet.migrate_from_sqlite(cfg, args.source[1], args.instance or socket.gethostname())
            print(f"copied {n} rows from {args.source[1]} into the PostgreSQL ledger")
            return 0
        rows = fleet.report(cfg, month=args.month, key=args.key, model=args.model)
    except (ValueError, LedgerError) as e:
        print(f"llmd usage: {e}", file=sys.stderr)
        return 1
    print(format_report(rows, args.format))
    return 0


def _admin_get(args: argparse.Namespace, route: str, method: str = "GET", timeout: float = 10) -> object:
    url = args.url
    if url is None:
        try:
            cfg = configfile.load(args.config)
            host = cfg.server.host if cfg.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
            url = f"http://{host}:{cfg.server.port}"
        except config_mod.ConfigError:
            url = "http://127.0.0.1:8000"
    req = urllib.request.Request(url.rstrip("/") + route, method=method, data=b"" if method == "POST" else None)
    key = args.key or os.environ.get("LLMD_ADMIN_KEY")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def cmd_status(args: argparse.Namespace) -> int:
    try:
        st = _admin_get(args, "/admin/status")
    except urllib.error.HTTPError as e:
        print(f"llmd answered {e.code}: {e.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot reach llmd: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    assert isinstance(st, dict)
    cols = ("replica", "state", "pid", "port", "cpus", "slots", "in_flight", "restarts")
    _table(cols, [[str(r.get(c) if r.get(c) is not None else "-") for c in cols] for r in st["replicas"]])
    queues = st.get("queues") or {}
    if any(queues.values()):
        print("queued: " + ", ".join(f"{m}={n}" for m, n in queues.items() if n))
    models = st.get("models") or {}
    if any(m.get("load") == "on_demand" for m in models.values()):
        print()
        _table(
            ("model", "load", "state", "running", "memory", "idle_s"),
            [
                [name, str(m["load"]) + (" (pin)" if m.get("pin") else ""), str(m["state"]),
                 f"{m['running']}/{m['max_replicas']}", _sizes(m.get("memory") or {}),
                 "-" if m.get("idle_s") is None else str(m["idle_s"])]
                for name, m in models.items()
            ],
        )  # fmt: skip
    budget = st.get("memory_budget") or {}
    if budget:
        held = ", ".join(f"{r} {_size(b['held'])} of {_size(b['budget'])}" for r, b in budget.items())
        print(f"memory budget: {held}")
    return 0


def _size(n: float) -> str:
    return f"{n / (1 << 30):.2f}GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f}MiB"


def _sizes(by_resource: dict[str, int]) -> str:
    return ", ".join(f"{r} {_size(b)}" for r, b in by_resource.items()) or "-"


def _table(cols: tuple[str, ...], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def cmd_load(args: argparse.Namespace) -> int:
    """POST /admin/models/NAME/load (or unload) and print the model's state."""
    verb = "load" if args.cmd == "load" else "unload"
    try:
        st = _admin_get(args, f"/admin/models/{urllib.parse.quote(args.model, safe='')}/{verb}", "POST", args.timeout)
    except urllib.error.HTTPError as e:
        print(f"llmd answered {e.code}: {e.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot reach llmd: {e}", file=sys.stderr)
        return 1
    assert isinstance(st, dict)
    print(f"{st['model']}: {st['state']}")
    return 0 if (st["state"] == "ready") == (verb == "load") else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmd", description="LLM API daemon")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="run the daemon")
    _config_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate a config file and list every error")
    _config_arg(p)
    p.add_argument("file", nargs="?", help="config file (same as -c)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("keys", help="manage API keys")
    ks = p.add_subparsers(dest="keys_cmd", required=True)
    pn = ks.add_parser("new", help="print a new secret and its config entry")
    pn.add_argument("id")
    pn.add_argument("--tier")
    pn.set_defaults(func=cmd_keys_new)

    p = sub.add_parser("usage", help="token usage per key and model, from the ledger (SQLite or PostgreSQL)")
    _config_arg(p)
    p.add_argument(
        "action", nargs="?", choices=("report", "migrate"), default="report",
        help="migrate: copy a SQLite ledger's rows into the PostgreSQL one (--from sqlite FILE)",
    )  # fmt: skip
    p.add_argument("--from", dest="source", nargs=2, metavar=("KIND", "FILE"), help="migrate: sqlite FILE")
    p.add_argument("--instance", help="migrate: the instance of rows that name none (default: this host)")
    p.add_argument("--db", help="SQLite usage database (default: usage.path of the config)")
    p.add_argument("--month", help="YYYY-MM (default: all months)")
    p.add_argument("--key")
    p.add_argument("--model")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("status", help="replica states of a running llmd (GET /admin/status)")
    _config_arg(p)
    p.add_argument("--url", help="llmd's base URL (default: from the config)")
    p.add_argument("--key", help="admin key (default: $LLMD_ADMIN_KEY)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    from .ragcli import add_parser

    add_parser(sub, _config_arg)
    for verb, text in (("load", "start an on-demand model and wait until it serves"),
                       ("unload", "stop an on-demand model once its requests are done")):  # fmt: skip
        p = sub.add_parser(verb, help=f"{text} (POST /admin/models/MODEL/{verb})")
        _config_arg(p)
        p.add_argument("model")
        p.add_argument("--url", help="llmd's base URL (default: from the config)")
        p.add_argument("--key", help="admin key (default: $LLMD_ADMIN_KEY)")
        p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for llmd's answer")
        p.set_defaults(func=cmd_load)

    args = ap.parse_args(argv)
    if getattr(args, "file", None):
        args.config = args.file
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
