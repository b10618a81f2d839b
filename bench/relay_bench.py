"""Relay overhead benchmark: a fast mock upstream, direct vs. through llmd (vs. nginx), driven by wrk.

    .venv/bin/python bench/relay_bench.py            # ~2.5 min: 3 interleaved rounds x 3 s per run
    .venv/bin/python bench/relay_bench.py --quick    # ~35 s: 1 round x 2 s per run

Needs ``wrk`` (Debian: ``apt-get install -y wrk``) and, for the nginx reference hop, ``nginx``
(skipped with a note when absent, or with --no-nginx). See bench/README.md for what each
number means and how to read it.

Processes (each its own session, so Ctrl-C reaches only this script, which then stops them all):

* mock upstream: ``relay_upstreams.py mock`` -- a raw uvloop Protocol that answers
  POST /v1/chat/completions with a fixed body, or a fixed 8-event SSE stream when the request
  has ``"stream": true`` (plus the usage chunk when ``include_usage`` is asked, like llama-server);
* llmd: ``python -m llmd serve -c <tmp>/llmd.yaml`` (backend openai -> mock), and a second one
  with ``server.metrics: false`` for the metrics on/off comparison;
* nginx: a plain keep-alive proxy hop in front of the mock, the "what a C proxy costs" yardstick;
* wrk: the load generator, one thread, closed loop with N connections.

CPU pinning (when there are >= 2 CPUs): wrk, the mock and this script on CPU 0; llmd / nginx on
CPU 1. The proxy under test thus has a core to itself and never competes with the load it serves.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    PYTHON,
    ROOT,
    WRK_LUA,
    Agg,
    Procs,
    free_port,
    http_status,
    md_table,
    rss_mb,
    serve_llmd,
    verdict,
    wait_until,
    wrk,
)
from relay_upstreams import MODEL

UPSTREAMS = Path(__file__).resolve().parent / "relay_upstreams.py"
SECRET = "sk-bench-0123456789abcdef"  # only with --key; the direct mock and nginx ignore it

# --- reference figures from the issue --------------------------------------------------------------

LITELLM_RPS_C1 = (65, 72)
LITELLM_ADDED_P50_MS_C1 = 14.0
LITELLM_RPS_C16 = 76.0
LITELLM_CPU_MS = (10.0, 15.0)
NGINX_CPU_MS_REF = 0.05
TARGET_CPU_MS = 0.3  # 6x nginx's 0.05 ms
TARGET_ADDED_P50_MS = 0.3
TARGET_RPS_C16 = 30 * LITELLM_RPS_C16  # 2280 req/s
TARGET_RSS_MB = 60.0
TARGET_METRICS_RATIO = 0.95  # metrics on within 5% of metrics off

# --- the request -----------------------------------------------------------------------------------

# A typical small IDE-plugin request: system + user message, a few sampling fields.
REQUEST = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a helpful coding assistant. Answer briefly."},
        {"role": "user", "content": "Write a Python function that reverses a string, with a docstring."},
    ],
    "max_tokens": 64,
    "temperature": 0.2,
}


def request_body(stream: bool) -> bytes:
    doc = {**REQUEST, "stream": True} if stream else REQUEST
    return json.dumps(doc, separators=(",", ":")).encode()


# --- processes -------------------------------------------------------------------------------------


def _cpu_sets() -> tuple[set[int] | None, set[int] | None]:
    """(load side, proxy side). None: do not pin (one CPU only)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


def http_post(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"}
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass
class Target:
    name: str  # direct | llmd | llmd-nometrics | llmd-noledger | nginx
    port: int
    proc: subprocess.Popen[bytes] | None  # the process whose CPU counts as the hop's (None: direct)
    log: Path | None = None  # llmd's stderr (JSON lines), read for error lines after the run


def start_mock(procs: Procs, cpus: set[int] | None, tmp: Path, upstream: str) -> tuple[subprocess.Popen[bytes], int]:
    if upstream == "fake":
        # tests/fake_backend.py: the llama-server look-alike the tests use (aiohttp, simulated
        # slots and tokens). Kept as an option to show why the raw mock is the default.
        # -np 64 -c 65536: a slot per connection at c=64, each with room for the prompt. It
        # generates max_tokens (64) tokens per request, so its stream is longer than the mock's.
        port = free_port()
        log = tmp / "fake.log"
        p = procs.start(
            [
                PYTHON,
                str(ROOT / "tests" / "fake_backend.py"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "-np",
                "64",
                "-c",
                "65536",
                "--load-delay-s",
                "0",
            ],
            cpus,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: http_status(port, "/health") == 200, "fake_backend", p, log)
        return p, port
    p = procs.start([PYTHON, str(UPSTREAMS), "mock"], cpus, stdout=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline().decode()
    if not line.startswith("MOCK_PORT "):
        raise SystemExit(f"mock did not start: {line!r}")
    port = int(line.split()[1])
    wait_until(lambda: http_status(port, "/health") == 200, "mock", p, None)
    return p, port


def start_floor(procs: Procs, cpus: set[int] | None, upstream_port: int, client: str = "aiohttp") -> Target:
    # stderr dropped: wrk closes its connections mid-request at the end of every run, which
    # aiohttp logs as a traceback per connection.
    p = procs.start(
        [PYTHON, str(UPSTREAMS), "floor", str(upstream_port), client],
        cpus,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert p.stdout is not None
    line = p.stdout.readline().decode()
    if not line.startswith("FLOOR_PORT "):
        raise SystemExit(f"aiohttp floor did not start: {line!r}")
    port = int(line.split()[1])
    name = {"aiohttp": "aiohttp-floor", "upstream": "upstream-floor", "lean": "lean-floor"}[client]
    wait_until(lambda: http_status(port, "/health") == 200, name, p, None)
    return Target(name, port, p)


@dataclass(frozen=True)
class LlmdOptions:
    strategy: str  # routing.strategy
    key: bool  # one key in a tier with generous limits (auth + limit windows run) instead of no keys
    src: Path = ROOT  # the checkout whose llmd/ runs


def llmd_config(d: Path, upstream_port: int, metrics: bool, opts: LlmdOptions, ledger: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "log_format": "json", "drain_seconds": 1, "metrics": metrics},
        # usage.enabled false: the "-noledger" twin, for the ledger on/off ratio (issue: within 5%).
        "usage": {"path": str(d / "usage.sqlite3"), "enabled": ledger},
        # slots 256 > any concurrency here: admission never queues, the relay path is what runs.
        "models": {MODEL: {"backend": "openai", "urls": [f"http://127.0.0.1:{upstream_port}/v1"], "slots": 256}},
        "routing": {"strategy": opts.strategy, "max_queue": 1024},
    }
    if opts.key:
        # Limits far above what the run can reach: every window is checked and updated, none refuses.
        doc["tiers"] = {
            "bench": {
                "requests_per_minute": 100_000_000,
                "requests_per_hour": 1_000_000_000,
                "tokens_per_minute": 1_000_000_000,
                "monthly_tokens": 10**15,
                "max_concurrent": 1024,
            }
        }
        doc["keys"] = [{"id": "bench", "tier": "bench", "sha256": hashlib.sha256(SECRET.encode()).hexdigest()}]
    return doc


def start_llmd(
    procs: Procs, cpus: set[int] | None, tmp: Path, name: str, upstream_port: int, metrics: bool, opts: LlmdOptions
) -> Target:
    """llmd from ``opts.src`` (this checkout, or a scratch copy for --candidate): ``-m llmd`` imports
    the package from the working directory before the venv's editable install."""
    d = tmp / name
    d.mkdir()
    config = d / "llmd.yaml"
    src = opts.src
    # JSON so the config is exact without a YAML dependency here (YAML is a superset of JSON).
    doc = llmd_config(d, upstream_port, metrics, opts, ledger=not name.endswith("-noledger"))
    config.write_text(json.dumps(doc, indent=2))
    log = d / "llmd.log"  # the access log goes to stderr with everything else: a file, like journald
    p, port = serve_llmd(procs, config, cpus, log, name, src)
    return Target(name, port, p, log)


def start_nginx(procs: Procs, cpus: set[int] | None, tmp: Path, upstream_port: int) -> Target | None:
    exe = shutil.which("nginx") or next((x for x in ("/usr/sbin/nginx",) if Path(x).exists()), None)
    if exe is None:
        return None
    port = free_port()
    d = tmp / "nginx"
    d.mkdir()
    # As plain as nginx/llm-api.conf's proxy part, without TLS: upstream keep-alive, HTTP/1.1,
    # no response buffering (SSE), one worker (llmd is one process too), an access log per request.
    (d / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    access_log {d}/access.log;
    upstream mock {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    log = d / "error.log"
    p = procs.start(
        [exe, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(log)],
        cpus,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(d / "stderr.log").open("wb"),
    )
    wait_until(lambda: http_status(port, "/health") == 200, "nginx", p, d / "stderr.log")
    return Target("nginx", port, p)


def log_errors(t: Target) -> str | None:
    """A summary of the error-level lines llmd logged during the run, or None. wrk closes its
    connections mid-request at the end of every run, so client aborts are expected; errors
    are not."""
    if t.log is None or not t.log.exists():
        return None
    msgs: dict[str, int] = {}
    for line in t.log.read_text(errors="replace").splitlines():
        if '"level":"error"' not in line and '"level":"critical"' not in line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            doc = {"msg": line[:120]}
        exc = str(doc.get("exc", "")).strip().splitlines()
        key = f"{doc.get('msg', '?')}" + (f" ({exc[-1][:160]})" if exc else "")
        msgs[key] = msgs.get(key, 0) + 1
    if not msgs:
        return None
    return f"{t.name} logged {sum(msgs.values())} error line(s): " + "; ".join(f"{n} x {m}" for m, n in msgs.items())


def sanity_check(targets: list[Target]) -> None:
    """Every hop must return what the upstream returns directly (targets[0]): status, usage, the
    same number of SSE events (llmd asks for the usage chunk and must hide it again) and [DONE].
    Otherwise the comparison would be between different work."""
    expected: int | None = None
    for t in targets:
        status, body = http_post(t.port, request_body(False))
        if status != 200 or b'"usage"' not in body:
            raise SystemExit(f"{t.name}: non-stream answered {status}: {body[:300]!r}")
        status, body = http_post(t.port, request_body(True))
        events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ") and e != b"data: [DONE]"]
        expected = len(events) if expected is None else expected
        if status != 200 or len(events) != expected or not body.rstrip().endswith(b"data: [DONE]"):
            raise SystemExit(
                f"{t.name}: stream answered {status} with {len(events)} events (direct: {expected}): {body[:300]!r}"
            )


# --- load ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    stream: bool
    conns: int

    @property
    def label(self) -> str:
        return f"{'stream' if self.stream else 'non-stream'} c={self.conns}"

    @classmethod
    def parse(cls, spec: str) -> Shape:
        """``n16``: non-stream at 16 connections; ``s16``: streamed at 16."""
        if len(spec) < 2 or spec[0] not in "ns" or not spec[1:].isdigit() or int(spec[1:]) < 1:
            raise argparse.ArgumentTypeError(f"bad shape {spec!r}: want n<connections> or s<connections>")
        return cls(spec[0] == "s", int(spec[1:]))


C1, C16 = Shape(False, 1), Shape(False, 16)
DEFAULT_SHAPES = "n1,n16,n64,s16"


def start_targets(
    args: argparse.Namespace, procs: Procs, hop_cpus: set[int] | None, tmp: Path, mock_port: int
) -> list[Target]:
    """The direct target, then every hop the arguments ask for, each started and ready."""
    opts = LlmdOptions(args.strategy, args.key, args.llmd_src.resolve())
    targets = [
        Target("direct", mock_port, None),
        start_llmd(procs, hop_cpus, tmp, "llmd", mock_port, True, opts),
        start_llmd(procs, hop_cpus, tmp, "llmd-nometrics", mock_port, False, opts),
        start_llmd(procs, hop_cpus, tmp, "llmd-noledger", mock_port, True, opts),
    ]
    if args.floor:
        targets.append(start_floor(procs, hop_cpus, mock_port))
        targets.append(start_floor(procs, hop_cpus, mock_port, "upstream"))
        targets.append(start_floor(procs, hop_cpus, mock_port, "lean"))
    if args.candidate:
        cand = LlmdOptions(args.strategy, args.key, args.candidate.resolve())
        targets.append(start_llmd(procs, hop_cpus, tmp, "candidate", mock_port, True, cand))
        targets.append(start_llmd(procs, hop_cpus, tmp, "candidate-nometrics", mock_port, False, cand))
    if not args.no_nginx:
        ng = start_nginx(procs, hop_cpus, tmp, mock_port)
        if ng is None:
            print("note: nginx not found, skipping the nginx reference hop", file=sys.stderr)
        else:
            targets.append(ng)
    return targets


def plan(shapes: list[Shape], by_name: dict[str, Target]) -> list[tuple[Shape, list[str]]]:
    """Which targets run at each shape, in the order of a round."""
    out: list[tuple[Shape, list[str]]] = []
    for s in shapes:
        names = ["direct", "llmd"] + [
            n for n in ("candidate", "aiohttp-floor", "upstream-floor", "lean-floor", "nginx") if n in by_name
        ]
        if s == C16:
            # The metrics on/off pairs run interleaved as well.
            names += [n for n in ("llmd-nometrics", "llmd-noledger", "candidate-nometrics") if n in by_name]
        out.append((s, names))
    return out


@dataclass(frozen=True)
class Load:
    """What every wrk run of a benchmark shares."""

    wrk_exe: str
    procs: Procs
    cpus: set[int] | None  # the load side
    scripts: dict[bool, Path]  # stream? -> wrk's Lua script
    mock: subprocess.Popen[bytes]


def run_rounds(
    load: Load,
    plan: list[tuple[Shape, list[str]]],
    by_name: dict[str, Target],
    rounds: int,
    duration: float,
) -> dict[tuple[str, Shape], Agg]:
    """``rounds`` interleaved passes over the plan, a progress line per run on stderr."""
    results: dict[tuple[str, Shape], Agg] = {}
    total_runs = rounds * sum(len(n) for _, n in plan)
    done = 0
    for rnd in range(rounds):
        for s, names in plan:
            # Alternate the order each round so neither side always runs right after the other.
            for name in names if rnd % 2 == 0 else reversed(names):
                t = by_name[name]
                run = wrk(
                    load.wrk_exe,
                    load.procs,
                    load.cpus,
                    load.scripts[s.stream],
                    t.port,
                    s.conns,
                    duration,
                    t.proc,
                    load.mock,
                )
                results.setdefault((name, s), Agg()).runs.append(run)
                done += 1
                print(
                    f"[{done}/{total_runs}] round {rnd + 1} {s.label:<16} {name:<15} {run.rps:9,.0f} req/s "
                    f"p50 {run.p50_ms:6.2f} ms p99 {run.p99_ms:6.2f} ms "
                    f"cpu {1000 * run.hop_cpu_s / max(1, run.requests):.3f} ms/req "
                    f"hop util {100 * run.hop_cpu_s / run.seconds:3.0f}% "
                    f"foreign {100 * run.foreign_cores:3.0f}%",
                    file=sys.stderr,
                )
    return results


# --- report ----------------------------------------------------------------------------------------


def report(
    results: dict[tuple[str, Shape], Agg],
    shapes: list[Shape],
    rss: tuple[float, float],
    rss_idle: float,
    args: argparse.Namespace,
    cpus: tuple[set[int] | None, set[int] | None],
) -> str:
    lines = [
        f"## llmd relay benchmark ({args.rounds} round(s) x {args.duration:g} s per run, upstream: {args.upstream}, "
        f"routing.strategy: {args.strategy}, keys: {'one key + tier limits' if args.key else 'none'})",
        "",
        f"machine: {os.cpu_count()} CPUs; "
        + (
            f"wrk + mock on CPU {sorted(cpus[0])[0]}, the hop under test on CPU {sorted(cpus[1])[0]}"
            if cpus[0] and cpus[1]
            else "no pinning (one CPU)"
        )
        + "; every figure is the median over the rounds, ratios are medians of per-round ratios",
        "",
        *_llmd_table(results, shapes),
        *_reference_table(results, shapes),
        *_candidate_table(results, shapes, args),
    ]
    foreign = max(r.foreign_cores for v in results.values() for r in v.runs)
    lines += [
        "",
        f"other load on the machine during the runs (not part of the benchmark): at most "
        f"{100 * foreign:.0f}% of one CPU"
        + (" -- **noisy: rerun on an idle machine before trusting small differences**" if foreign > 0.05 else ""),
    ]
    errors = {f"{k[0]} {k[1].label}": v.errors for k, v in results.items() if v.errors}
    if errors:
        lines += ["", f"**errors (non-2xx, timeouts, socket errors)**: {errors}"]

    lines.append("")
    for twin, what in (("llmd-nometrics", "metrics"), ("llmd-noledger", "ledger")):
        if (twin, C16) in results:
            on, off = results[("llmd", C16)], results[(twin, C16)]
            lines.append(
                f"{what} on vs off, non-stream c=16: {on.rps:,.0f} vs {off.rps:,.0f} req/s -> ratio "
                f"{on.ratio(off):.3f} (CPU {on.cpu_ms():.3f} vs {off.cpu_ms():.3f} ms/req)"
            )
    lines += [
        f"llmd RSS after load: {rss[0]:.1f} MB (peak VmHWM {rss[1]:.1f} MB; {rss_idle:.1f} MB idle before load)",
        "",
        "Reference (from the issue, other machine): LiteLLM proxy, 1 worker: "
        f"{LITELLM_RPS_C1[0]}-{LITELLM_RPS_C1[1]} req/s at c=1 (+{LITELLM_ADDED_P50_MS_C1:g} ms p50 over direct), "
        f"{LITELLM_RPS_C16:g} req/s at c=16, {LITELLM_CPU_MS[0]:g}-{LITELLM_CPU_MS[1]:g} ms CPU/request; "
        f"nginx as a plain hop: {NGINX_CPU_MS_REF} ms CPU/request.",
        "",
        "Targets:",
        *_targets(results, rss),
    ]
    return "\n".join(lines)


def _llmd_table(results: dict[tuple[str, Shape], Agg], shapes: list[Shape]) -> list[str]:
    rows = []
    for s in shapes:
        d, l_ = results[("direct", s)], results[("llmd", s)]
        rows.append(
            [
                s.label,
                f"{d.rps:,.0f}",
                f"{l_.rps:,.0f}",
                f"{l_.ratio(d):.3f}",
                f"{d.p50:.2f} / {d.p99:.2f}",
                f"{l_.p50:.2f} / {l_.p99:.2f}",
                f"{l_.p50 - d.p50:+.2f}",
                f"{l_.cpu_ms():.3f} ({100 * l_.sys_share:.0f}%)",
                f"{100 * l_.hop_util:.0f}%",
                f"{d.cpu_ms(hop=False):.3f}",
            ]
        )
    header = (
        "shape",
        "direct RPS",
        "llmd RPS",
        "ratio",
        "direct p50/p99 ms",
        "llmd p50/p99 ms",
        "added p50 ms",
        "llmd CPU ms/req (kernel share)",
        "llmd core busy",
        "mock CPU ms/req",
    )
    return md_table(header, rows, "lrrrrrrrrr")


def _reference_table(results: dict[tuple[str, Shape], Agg], shapes: list[Shape]) -> list[str]:
    """nginx and the bare aiohttp relay, when they ran."""
    others = [n for n in ("nginx", "aiohttp-floor", "upstream-floor", "lean-floor") if any(k[0] == n for k in results)]
    if not others:
        return []
    rows = []
    for s in shapes:
        for name in others:
            d, n, l_ = results[("direct", s)], results[(name, s)], results[("llmd", s)]
            rows.append(
                [
                    s.label,
                    name,
                    f"{n.rps:,.0f}",
                    f"{n.p50:.2f} / {n.p99:.2f}",
                    f"{n.p50 - d.p50:+.2f}",
                    f"{n.cpu_ms():.3f} ({100 * n.sys_share:.0f}%)",
                    f"{l_.cpu_ms() / max(1e-9, n.cpu_ms()):.1f}x",
                ]
            )
    header = ("shape", "hop", "RPS", "p50/p99 ms", "added p50 ms", "CPU ms/req (kernel share)", "llmd CPU / hop CPU")
    return [
        "",
        "Reference hops in front of the same mock, same rounds (nginx: 1 worker, plain keep-alive proxy; "
        "aiohttp-floor: a bare aiohttp relay with none of llmd's logic; upstream-floor: the same "
        "with llmd/upstream.py as its client; lean-floor: no aiohttp, an httptools server + llmd/upstream.py):",
        "",
        *md_table(header, rows, "llrrrrr"),
    ]


def _candidate_table(results: dict[tuple[str, Shape], Agg], shapes: list[Shape], args: argparse.Namespace) -> list[str]:
    """--candidate: its llmd against this checkout's, shape by shape."""
    if not any(k[0] == "candidate" for k in results):
        return []
    rows = []
    for s in shapes:
        l_, c = results[("llmd", s)], results[("candidate", s)]
        rows.append(
            [
                s.label,
                f"{l_.rps:,.0f}",
                f"{c.rps:,.0f}",
                f"{c.ratio(l_):.3f}",
                f"{l_.p50:.2f}",
                f"{c.p50:.2f}",
                f"{l_.cpu_ms():.3f} ({100 * l_.sys_share:.0f}%)",
                f"{c.cpu_ms():.3f} ({100 * c.sys_share:.0f}%)",
                f"{100 * (c.cpu_ms() / l_.cpu_ms() - 1):+.1f}%",
            ]
        )
    header = (
        "shape",
        "llmd RPS",
        "candidate RPS",
        "ratio",
        "llmd p50 ms",
        "candidate p50 ms",
        "llmd CPU ms/req (kernel)",
        "candidate CPU ms/req (kernel)",
        "CPU change",
    )
    lines = [
        "",
        f"candidate llmd from {args.candidate} vs llmd from {args.llmd_src} (same rounds, interleaved):",
        "",
        *md_table(header, rows, "lrrrrrrrr"),
    ]
    if ("candidate-nometrics", C16) in results:
        c_on, c_off = results[("candidate", C16)], results[("candidate-nometrics", C16)]
        lines.append(
            f"\ncandidate metrics on vs off, non-stream c=16: ratio {c_on.ratio(c_off):.3f} "
            f"(CPU {c_on.cpu_ms():.3f} vs {c_off.cpu_ms():.3f} ms/req)"
        )
    return lines


def _targets(results: dict[tuple[str, Shape], Agg], rss: tuple[float, float]) -> list[str]:
    """One PASS/MISS line per goal of the issue that this run measured."""

    def has(name: str, shape: Shape) -> bool:
        return (name, shape) in results

    lines = []
    if has("llmd", C16):
        l16 = results[("llmd", C16)]
        lines.append(
            f"- {verdict(l16.cpu_ms() <= TARGET_CPU_MS)} llmd CPU per request (non-stream c=16) <= "
            f"{TARGET_CPU_MS} ms (6x nginx's {NGINX_CPU_MS_REF}): {l16.cpu_ms():.3f} ms"
        )
        if has("nginx", C16):
            n_cpu = results[("nginx", C16)].cpu_ms()
            lines.append(
                f"- {verdict(l16.cpu_ms() <= 6 * n_cpu)} same machine: llmd CPU <= 6x nginx's measured "
                f"{n_cpu:.3f} ms (= {6 * n_cpu:.3f} ms): {l16.cpu_ms() / max(1e-9, n_cpu):.1f}x"
            )
    if has("llmd", C1):
        added = results[("llmd", C1)].p50 - results[("direct", C1)].p50
        lines.append(
            f"- {verdict(added <= TARGET_ADDED_P50_MS)} added p50 at c=1 <= {TARGET_ADDED_P50_MS} ms: {added:.3f} ms"
        )
    if has("llmd", C16):
        rps = results[("llmd", C16)].rps
        lines.append(
            f"- {verdict(rps >= TARGET_RPS_C16)} throughput at c=16 >= 30x LiteLLM's {LITELLM_RPS_C16:g} "
            f"(= {TARGET_RPS_C16:g} req/s): {rps:,.0f} req/s ({rps / LITELLM_RPS_C16:.0f}x)"
        )
    lines.append(f"- {verdict(rss[0] <= TARGET_RSS_MB)} RSS after load <= {TARGET_RSS_MB:g} MB: {rss[0]:.1f} MB")
    if has("llmd-nometrics", C16):
        ratio = results[("llmd", C16)].ratio(results[("llmd-nometrics", C16)])
        # Two llmd processes of the same code differ by a few % from run to run on a VM; with few
        # rounds the verdict is mostly noise. README: "Reading the numbers honestly".
        caveat = (
            f" (only {len(results[('llmd', C16)].runs)} round(s): run-to-run spread is about +-5%; "
            "for a verdict use --shapes n16 --rounds 10)"
            if len(results[("llmd", C16)].runs) < 8
            else ""
        )
        lines.append(
            f"- {verdict(ratio >= TARGET_METRICS_RATIO)} metrics on within 5% of off (c=16): ratio {ratio:.3f}{caveat}"
        )
    return lines


# --- profile ---------------------------------------------------------------------------------------


def profile(
    out: Path,
    wrk_exe: str,
    procs: Procs,
    cpus: set[int] | None,
    script: Path,
    llmd: Target,
    mock: subprocess.Popen[bytes],
    seconds: float,
) -> None:
    """py-spy (pip install py-spy) samples llmd from the load-side CPU while wrk drives c=16.
    --nonblocking: llmd is never paused, so the profile costs it (almost) nothing; the numbers of
    this extra run are not part of the table above."""
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(spy).exists():
        print(f"\n--profile: py-spy not found; install it: {PYTHON} -m pip install py-spy", file=sys.stderr)
        return
    assert llmd.proc is not None
    dur = max(5, round(seconds)) + 1  # >= ~1,500 samples at 250 Hz
    p = procs.start(
        [
            spy,
            "record",
            "-p",
            str(llmd.proc.pid),
            "-d",
            str(dur),
            "-r",
            "250",
            "--nonblocking",
            "-f",
            "raw",
            "-o",
            str(out),
        ],
        cpus,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)  # let py-spy attach before the load starts
    wrk(wrk_exe, procs, cpus, script, llmd.port, 16, dur - 1, llmd.proc, mock)
    _, err = p.communicate()
    procs.procs.remove(p)
    if not out.exists():
        print(f"\n--profile: py-spy wrote nothing: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
        return
    print(f"\n### py-spy profile of llmd, non-stream c=16 (collapsed stacks in {out})\n")
    print(summarize_profile(out))


def summarize_profile(path: Path, top: int = 25) -> str:
    """Self and inclusive shares per function from py-spy's raw (collapsed) output, where each line
    is ``frame;frame;...;leaf count`` and a frame is ``function (file:line)``."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        # Drop line numbers so one function's lines add up: "handle (aiohttp/web_protocol.py:512)".
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + count
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + count
    if not total:
        return "(no samples)"
    top_self = [
        (f"{100 * k / total:.1f}", f"{100 * incl_n[f] / total:.1f}", f"`{f}`")
        for f, k in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]
    ]
    ours = [
        (f"{100 * k / total:.1f}", f"`{f}`") for f, k in sorted(incl_n.items(), key=lambda kv: -kv[1]) if "(llmd/" in f
    ]
    lines = md_table(("part", "share of llmd's CPU samples"), profile_parts(path), "lr")
    lines += ["", *md_table(("self %", "inclusive %", "function"), top_self, "rr")]
    lines += ["", *md_table(("inclusive %", "function (llmd's own)"), ours, "r")]
    return "\n".join(lines)


# Which part of llmd a sample belongs to: the innermost frame (leaf first) that names one. A leaf in
# shared code (asyncio, aiohttp's streams and writer) counts for whoever called it.
PARTS = [
    (r"aiosqlite/|llmd/usage\.py", "ledger (usage row + SQLite thread)"),
    (r"llmd/log\.py|logging/", "access log"),
    (r"llmd/metrics\.py|prometheus_client", "metrics"),
    (r"llmd/(auth|limits)\.py", "auth + limits"),
    (r"llmd/upstream\.py", "upstream client (llmd/upstream.py)"),
    (r"aiohttp/(client|connector|tracing|cookiejar)", "aiohttp client"),
    (r"aiohttp/(web_|http_parser|base_protocol)", "aiohttp server"),
    (r"llmd/relay\.py", "llmd relay (relay.py's own lines)"),
    (r"llmd/(admission|balancer|pool|replica|supervisor)\.py", "llmd pool, admission, balancer"),
    (r"llmd/(?!daemon|cli|__main__)", "llmd middleware, pipeline, envelope, meter, call"),  # not the roots
]


def profile_parts(path: Path) -> list[tuple[str, str]]:
    """Shares of the samples by part (PARTS); samples in no part are the event loop itself (uvloop's
    C code under ``Runner.run``: socket I/O, callbacks) or unattributable."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        part = "event loop (uvloop's C code, task steps) and the rest"
        for frame in reversed(stack.split(";")):
            found = next((name for rx, name in PARTS if re.search(rx, frame)), None)
            if found is not None:
                part = found
                break
        counts[part] = counts.get(part, 0) + int(n)
    return [(k, f"{100 * v / max(1, total):.1f}%") for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]


# --- main ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round x 2 s per run (~35 s in all)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per wrk run, whole seconds (default 3; --quick 2)")
    ap.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        type=lambda v: [Shape.parse(x.strip()) for x in v.split(",") if x.strip()],
        help=f"load shapes, n<conns> non-stream, s<conns> streamed (default {DEFAULT_SHAPES})",
    )
    ap.add_argument("--no-nginx", action="store_true", help="skip the nginx reference hop")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also run bare relays (no llmd logic): aiohttp's server with aiohttp's client, with "
        "llmd/upstream.py's, and an httptools server with llmd/upstream.py's: what each costs per hop",
    )
    ap.add_argument(
        "--upstream",
        choices=("mock", "fake"),
        default="mock",
        help="mock: the raw uvloop server in this file; fake: tests/fake_backend.py",
    )
    ap.add_argument(
        "--strategy",
        choices=("prefix-affinity", "least-loaded", "round-robin"),
        default="prefix-affinity",
        help="routing.strategy (default: the config default)",
    )
    ap.add_argument(
        "--key",
        action="store_true",
        help="configure one API key in a tier with generous limits, so auth and the limit "
        "windows run on every request (default: no keys, 'anonymous', as in the issue)",
    )
    ap.add_argument(
        "--llmd-src",
        type=Path,
        metavar="DIR",
        default=ROOT,
        help="run the measured llmd from DIR instead of this checkout (e.g. a frozen copy, "
        "so edits to llmd/ during an A/B session do not move the baseline)",
    )
    ap.add_argument(
        "--candidate",
        type=Path,
        metavar="DIR",
        help="also run llmd from DIR (a scratch copy of the repo with a hot-path change), "
        "interleaved with this checkout's, and print the before/after table",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="OUT",
        help="after the rounds, record llmd with py-spy during one non-stream c=16 run: "
        "collapsed stacks to OUT, a top-functions summary to stdout",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, ledgers)")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 3.0)
    if isinstance(args.shapes, str):  # the default is not run through type=
        args.shapes = [Shape.parse(x) for x in args.shapes.split(",")]
    return args


def main() -> int:
    args = parse_args()
    wrk_exe = shutil.which("wrk")
    if wrk_exe is None:
        print(
            "relay_bench: wrk not found. Install it: apt-get install -y wrk (Debian/Ubuntu), "
            "or build https://github.com/wg/wrk and put it on PATH.",
            file=sys.stderr,
        )
        return 2

    load_cpus, hop_cpus = _cpu_sets()
    if load_cpus is not None:
        os.sched_setaffinity(0, load_cpus)  # this script shares the load side; it mostly sleeps
    procs = Procs()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # run the finally below: children are stopped, not orphaned

    signal.signal(signal.SIGTERM, on_term)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored; Ctrl-C / kill -INT
    # must still stop the run and its children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="llmd-bench-"))
    t_begin = time.monotonic()
    try:
        mock, mock_port = start_mock(procs, load_cpus, tmp, args.upstream)
        targets = start_targets(args, procs, hop_cpus, tmp, mock_port)
        by_name = {t.name: t for t in targets}
        sanity_check(targets)
        llmd = by_name["llmd"]
        assert llmd.proc is not None
        rss_idle = rss_mb(llmd.proc.pid)[0]

        scripts = {}
        for stream in (False, True):
            scripts[stream] = tmp / f"{'stream' if stream else 'plain'}.lua"
            scripts[stream].write_text(WRK_LUA.format(body=request_body(stream).decode(), secret=SECRET))

        # Warm-up (not measured): connection pools, allocator arenas, lazily built label children.
        for t in targets:
            wrk(wrk_exe, procs, load_cpus, scripts[False], t.port, 16, 1, t.proc, mock)

        shapes: list[Shape] = args.shapes
        load = Load(wrk_exe, procs, load_cpus, scripts, mock)
        results = run_rounds(load, plan(shapes, by_name), by_name, args.rounds, args.duration)
        rss = rss_mb(llmd.proc.pid)
        print(report(results, shapes, rss, rss_idle, args, (load_cpus, hop_cpus)))
        errors = [e for e in map(log_errors, targets) if e]
        if errors:
            print("\n**llmd logged errors during the run** (see its log with --keep):")
            print("\n".join(f"- {e}" for e in errors))
        if args.profile:
            profile(args.profile, wrk_exe, procs, load_cpus, scripts[False], llmd, mock, args.duration)
        print(f"\n(total {time.monotonic() - t_begin:.0f} s; temp dir {tmp}{' kept' if args.keep else ' removed'})")
        return 0
    except KeyboardInterrupt:
        print("interrupted; stopping children", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
