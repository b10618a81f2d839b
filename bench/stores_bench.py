"""What the shared stores cost per request: llmd with the PostgreSQL ledger and Redis limits vs the
same llmd with the SQLite ledger and in-process limits, in one run, driven by wrk at c=16.

    .venv/bin/python bench/stores_bench.py [--seconds 8] [--rounds 3] [--conns 16]

Both llmd relay to relay_bench's raw mock upstream with one key whose tier has every limit
(requests per minute and hour, tokens per minute, monthly tokens, max_concurrent) set far above
what the run reaches: every admission runs every check and every settle, none refuses. The
PostgreSQL 15 and redis-server are real, started here in temporary directories (tests/pgproc.py,
tests/redisproc.py) and stopped at the end. Rounds alternate the two llmd; figures are medians.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import (
    ROOT,
    WRK_LUA,
    Agg,
    Procs,
    _descendants,
    cpu_seconds,
    install_sigterm,
    md_table,
    serve_llmd,
    verdict,
    wrk,
)
from relay_bench import MODEL, SECRET, request_body, start_mock

sys.path.insert(0, str(ROOT))

from tests.pgproc import PgServer
from tests.redisproc import RedisServer

LOCAL, SHARED = "sqlite + memory", "postgres + redis"
TARGET_ADDED_P50_MS = 0.5
TARGET_RPS = 2000.0

LIMITS = {
    "requests_per_minute": 100_000_000,
    "requests_per_hour": 1_000_000_000,
    "tokens_per_minute": 1_000_000_000,
    "monthly_tokens": 10**15,
    "max_concurrent": 1024,
}


def config(d: Path, mock_port: int, shared: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "log_format": "json", "drain_seconds": 1},
        "usage": {"path": str(d / "usage.sqlite3")},
        "models": {MODEL: {"backend": "openai", "urls": [f"http://127.0.0.1:{mock_port}/v1"], "slots": 256}},
        "routing": {"max_queue": 1024},
        "tiers": {"bench": LIMITS},
        "keys": [{"id": "bench", "tier": "bench", "sha256": hashlib.sha256(SECRET.encode()).hexdigest()}],
    }
    if shared:
        doc["usage"] = {"store": "postgres", "instance": "bench"}
        doc["limits"] = {"store": "redis", "prefix": "bench:"}
    return doc


def store_cpu(pg: PgServer, redis: RedisServer) -> float:
    """CPU seconds of redis-server and of the PostgreSQL postmaster with its backends."""
    total = cpu_seconds(redis.proc.pid) if redis.proc else 0.0
    pid_file = pg.data / "postmaster.pid"
    if pid_file.exists():
        pm = int(pid_file.read_text().split()[0])
        for pid in [pm, *_descendants(pm)]:
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass  # a backend that ended meanwhile
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, nargs="+", default=[1, 16], help="wrk connections, one table row each")
    args = ap.parse_args()
    wrk_exe = shutil.which("wrk")
    if wrk_exe is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    install_sigterm()
    procs = Procs()
    pg, redis = PgServer.start(), RedisServer.start()
    cpus = sorted(os.sched_getaffinity(0))
    load_cpus, hop_cpus = ({cpus[0]}, {cpus[1]}) if len(cpus) >= 2 else (None, None)
    try:
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            os.environ["LLMD_PG_DSN"] = pg.create_db("bench")
            os.environ["LLMD_REDIS_URL"] = redis.url
            mock, mock_port = start_mock(procs, load_cpus, tmp, "mock")
            hops = {}
            for name, shared in ((LOCAL, False), (SHARED, True)):
                d = tmp / ("shared" if shared else "local")
                d.mkdir()
                (d / "llmd.yaml").write_text(json.dumps(config(d, mock_port, shared)))
                hops[name] = serve_llmd(procs, d / "llmd.yaml", hop_cpus, d / "llmd.log", name)
            script = tmp / "plain.lua"
            script.write_text(WRK_LUA.format(body=request_body(False).decode(), secret=SECRET))
            for p, port in hops.values():  # warm-up: pools, connections, scripts loaded
                wrk(wrk_exe, procs, load_cpus, script, port, 16, 2, p, mock)
            results = {(name, c): Agg() for c in args.conns for name in hops}
            store_ms: list[float] = []
            for _ in range(args.rounds):
                for c in args.conns:
                    for name, (p, port) in hops.items():
                        s0 = store_cpu(pg, redis)
                        run = wrk(wrk_exe, procs, load_cpus, script, port, c, args.seconds, p, mock)
                        results[name, c].runs.append(run)
                        if name == SHARED:
                            store_ms.append(1000 * (store_cpu(pg, redis) - s0) / max(1, run.requests))
            report(results, sorted(store_ms)[len(store_ms) // 2], args)
            for name in hops:  # what the errors were, if any (llmd's log: status and message)
                if any(results[name, c].errors for c in args.conns):
                    log = (tmp / ("shared" if name == SHARED else "local") / "llmd.log").read_text()
                    lines = log.splitlines()
                    bad = [line for line in lines if '"status":' in line and '"status":200' not in line]
                    store = [line for line in lines if "limits:" in line or "usage ledger" in line]
                    print(f"{name}: {len(bad)} non-200 answers in its log, e.g.:", *bad[:3], *store[:5], sep="\n  ")
    finally:
        procs.stop_all()
        pg.close()
        redis.close()
    return 0


def report(results: dict[tuple[str, int], Agg], store_ms: float, args: argparse.Namespace) -> None:
    rows = [
        (name, str(c), f"{a.rps:.0f}", f"{a.p50:.2f}", f"{a.p99:.2f}", f"{a.cpu_ms():.3f}", f"{a.hop_util:.0%}",
         f"{statistics.median(r.foreign_cores for r in a.runs):.2f}", str(a.errors))
        for (name, c), a in results.items()
    ]  # fmt: skip
    print(f"\nllmd stores, {args.rounds} rounds x {args.seconds:g} s per row (medians)\n")
    header = ("stores", "conns", "req/s", "p50 ms", "p99 ms", "llmd CPU ms/req", "llmd core use", "other load (cores)",
              "errors")  # fmt: skip
    print("\n".join(md_table(header, rows, "lrrrrrrrr")))
    print()
    for c in args.conns:
        base, shared = results[LOCAL, c], results[SHARED, c]
        added = shared.p50 - base.p50
        cpu = shared.cpu_ms() - base.cpu_ms()
        ok_p50, ok_rps = verdict(added < TARGET_ADDED_P50_MS), verdict(shared.rps >= TARGET_RPS)
        print(f"c={c}: added p50 {added:+.2f} ms (goal < {TARGET_ADDED_P50_MS} ms: {ok_p50}); "
              f"added llmd CPU {cpu:+.3f} ms/req; {shared.rps:.0f} req/s with both stores "
              f"(goal >= {TARGET_RPS:.0f}: {ok_rps})")  # fmt: skip
    print(f"PostgreSQL + Redis CPU per request (their processes): {store_ms:.3f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
