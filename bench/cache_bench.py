"""Completion cache benchmark: what a hit costs next to a relayed request, and what a 30% hit rate
saves on a real model.

    .venv/bin/python bench/cache_bench.py            # ~2 min: mock part (3 s per run) + real mix of 40
    .venv/bin/python bench/cache_bench.py --quick    # ~1 min: 2 s per run, real mix of 20
    .venv/bin/python bench/cache_bench.py --no-real  # the mock part only

1. Mock (``relay_upstreams.py mock``, the raw uvloop upstream of relay_bench): one llmd with two
   models on the mock, ``chat`` with ``cache: true`` and ``chat-off`` without. wrk (1 thread)
   sends one fixed body per run, closed loop: with 1 connection for latency, with 16 for
   throughput and llmd's CPU per request. Cases, each whole and streamed:
   * relayed, cache off: ``chat-off``, ``temperature: 0`` (the path without a cache);
   * relayed, bypass: ``chat``, ``temperature: 0.2`` (not deterministic: the cache decodes the body
     to tell, then relays);
   * hit: ``chat``, ``temperature: 0`` (the first request stores it, every later one is a hit).
2. Real: llmd with one llama-server replica (bin/llama-server, models/gemma-3-270m-q4_k_m.gguf,
   ``cache: true``), a sequential mix of N chat requests (``temperature: 0``, ``max_tokens`` 48),
   30% of them repeats of an earlier prompt. The same mix (other prompts of the same shape) runs
   twice: with ``Cache-Control: no-cache, no-store`` (every request reaches the model) and
   without. The ledger says which requests the model served and for how long.

Processes run pinned as in relay_bench when there are >= 2 CPUs: wrk, the mock and this script
on CPU 0, llmd on CPU 1 (the real part leaves placement to the OS: llama-server needs the CPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness import (
    MODEL,
    MODEL_PATH,
    WRK_LUA,
    Procs,
    Run,
    install_sigterm,
    llama_launcher,
    md_table,
    pct,
    serve_llmd,
    start_llmd,
    stop_llmd,
    warm_replicas,
    wrk,
)
from relay_bench import REQUEST, start_mock

Case = tuple[str, str, float]  # (label, model, temperature)
CASES: list[Case] = [
    ("relayed, cache off", "chat-off", 0.0),
    ("relayed, bypass (sampled)", MODEL, 0.2),
    ("cache hit", MODEL, 0.0),
]


def body(model: str, temperature: float, stream: bool) -> bytes:
    doc: dict[str, Any] = {**REQUEST, "model": model, "temperature": temperature}
    if stream:
        doc["stream"] = True
    return json.dumps(doc, separators=(",", ":")).encode()  # compact: the mock looks for "stream":true


def start_llmd_on_mock(
    procs: Procs, cpus: set[int] | None, d: Path, mock_port: int
) -> tuple[subprocess.Popen[bytes], int]:
    url = f"http://127.0.0.1:{mock_port}/v1"
    doc = {
        "server": {"host": "127.0.0.1", "port": 0, "log_format": "json", "drain_seconds": 1},
        "usage": {"path": str(d / "usage.sqlite3")},
        "models": {
            MODEL: {"backend": "openai", "urls": [url], "slots": 256, "cache": True},
            "chat-off": {"backend": "openai", "urls": [url], "slots": 256},
        },
        "routing": {"max_queue": 1024},
    }
    config = d / "llmd.yaml"
    config.write_text(json.dumps(doc, indent=2))
    log = d / "llmd.log"
    return serve_llmd(procs, config, cpus, log)


def mock_part(args: argparse.Namespace, tmp: Path) -> list[str]:
    wrk_exe = shutil.which("wrk")
    if wrk_exe is None:
        print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
        sys.exit(2)
    multi = len(os.sched_getaffinity(0)) >= 2
    load_cpus, hop_cpus = ({0}, {1}) if multi else (None, None)
    procs = Procs()
    try:
        mock, mock_port = start_mock(procs, load_cpus, tmp, "mock")
        llmd, port = start_llmd_on_mock(procs, hop_cpus, tmp, mock_port)
        rows = []
        for stream in (False, True):
            for label, model, temperature in CASES:
                script = tmp / f"{model}-{temperature}-{stream}.lua"
                script.write_text(WRK_LUA.format(body=body(model, temperature, stream).decode(), secret="none"))
                wrk(wrk_exe, procs, load_cpus, script, port, 4, 1, llmd, mock)  # warm-up; stores the entry
                lat: Run = wrk(wrk_exe, procs, load_cpus, script, port, 1, args.seconds, llmd, mock)
                thr: Run = wrk(wrk_exe, procs, load_cpus, script, port, 16, args.seconds, llmd, mock)
                rows.append(
                    [
                        "stream" if stream else "whole",
                        label,
                        f"{lat.p50_ms * 1000:.0f}",
                        f"{lat.p99_ms * 1000:.0f}",
                        f"{thr.rps:,.0f}",
                        f"{1000 * thr.hop_cpu_s / max(1, thr.requests) * 1000:.0f}",
                        f"{1000 * thr.mock_cpu_s / max(1, thr.requests) * 1000:.0f}",
                        str(lat.errors + thr.errors),
                        f"{thr.foreign_cores:.2f}",
                    ]
                )
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        lookups = {
            m.group(1): float(m.group(2))
            for m in re.finditer(r'llmd_cache_lookups_total\{model="chat",result="(\w+)"\} (\S+)', metrics)
        }
    finally:
        procs.stop_all()
    return [
        "### Hit vs relayed (mock upstream)",
        "",
        *md_table(
            [
                "answer",
                "case",
                "p50 µs (c=1)",
                "p99 µs (c=1)",
                "req/s (c=16)",
                "llmd CPU µs/req",
                "upstream CPU µs/req",
                "errors",
                "other load, cores",
            ],
            rows,
            "llrrrrrrr",
        ),
        "",
        f"Cache lookups: {lookups.get('hit', 0):,.0f} hits, {lookups.get('miss', 0):,.0f} misses"
        " (the warm-up's first concurrent requests of each shape).",
    ]


# --- real model -----------------------------------------------------------------------------------


def mix(n: int, hit_rate: float, tag: str, rng: random.Random) -> list[str]:
    """n prompts, round(n x hit_rate) of them (never the first) repeats of an earlier one."""
    repeats = set(rng.sample(range(1, n), round(n * hit_rate)))
    out: list[str] = []
    for i in range(n):
        if i in repeats:
            out.append(rng.choice(out))
        else:
            out.append(f"[{tag}] In two sentences, what is interesting about the number {i * 7 + 3}?")
    return out


def chat(url: str, prompt: str, headers: dict[str, str]) -> tuple[float, str]:
    doc = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 48}
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(doc).encode(), {"Content-Type": "application/json", **headers}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
        state = r.headers.get("x-llmd-cache", "")
    return time.perf_counter() - t0, state


def real_part(args: argparse.Namespace, tmp: Path) -> list[str]:
    doc = {
        "server": {"drain_seconds": 5, "log_level": "warning"},
        "models": {MODEL: {"backend": "llama-server", "model": str(MODEL_PATH), "replicas": 1, "cache": True,
                           "args": ["-c", "4096", "-np", "1"]}},
        "launchers": llama_launcher(),
        "routing": {"queue_timeout_s": 600, "timeouts": {"connect_s": 5, "first_byte_s": 600, "total_s": 900}},
    }  # fmt: skip
    srv = start_llmd(doc, tmp / "real")
    results: dict[str, dict[str, Any]] = {}
    try:
        warm_replicas(srv)
        for tag, headers in (("off", {"Cache-Control": "no-cache, no-store"}), ("on", {})):
            prompts = mix(args.requests, 0.3, tag, random.Random(7))
            t0 = time.perf_counter()
            seen = [chat(srv.url, p, headers) for p in prompts]
            results[tag] = {"wall": time.perf_counter() - t0, "seen": seen}
    finally:
        stop_llmd(srv)  # flushes the ledger
    with sqlite3.connect(f"file:{srv.usage_path}?mode=ro", uri=True) as db:
        ledger = db.execute(
            "SELECT cache, duration_ms, upstream_tokens, prompt_tokens + completion_tokens FROM requests ORDER BY id"
        ).fetchall()
    n = args.requests
    rows = []
    saved = 0.0
    for i, tag in enumerate(("off", "on")):
        part = ledger[i * n : (i + 1) * n]
        model_rows = [r for r in part if r[0] != "hit"]
        hits = [r for r in part if r[0] == "hit"]
        miss_lat = [s for s, state in results[tag]["seen"] if state != "hit"]
        hit_lat = [s for s, state in results[tag]["seen"] if state == "hit"]
        if tag == "on" and model_rows:
            # What the hits would have cost the model: its mean answer time in the same run (wall
            # times of the two runs also differ by whatever else the machine was doing).
            saved = len(hits) * statistics.mean(r[1] for r in model_rows) / 1000
        rows.append(
            [
                "no-cache, no-store" if tag == "off" else "cache on",
                str(n),
                str(len(hits)),
                f"{results[tag]['wall']:.1f}",
                f"{sum(r[1] for r in model_rows) / 1000:.1f}",
                f"{sum(r[2] or 0 for r in part):,}",
                f"{sum(r[3] for r in part):,}",
                f"{statistics.median(miss_lat) * 1000:.0f}",
                f"{pct(hit_lat, 0.5) * 1000:.2f}" if hit_lat else "-",
            ]
        )
    off, on = results["off"]["wall"], results["on"]["wall"]
    return [
        f"### A 30% hit rate on the real model ({MODEL_PATH.name}, one llama-server replica)",
        "",
        *md_table(
            [
                "run",
                "requests",
                "hits",
                "wall s",
                "model s (ledger)",
                "upstream tokens",
                "client tokens",
                "model answer p50 ms",
                "hit p50 ms",
            ],
            rows,
            "lrrrrrrrr",
        ),
        "",
        f"Model time saved by the hits: {saved:.1f} s ({saved / (results['on']['wall'] + saved):.0%} of the mix"
        f" without a cache); wall time {off:.1f} s -> {on:.1f} s.",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s per wrk run, a real mix of 20")
    ap.add_argument("--seconds", type=float, default=None, help="per wrk run (default 3; quick 2)")
    ap.add_argument("--requests", type=int, default=None, help="requests of the real mix (default 40; quick 20)")
    ap.add_argument("--no-real", action="store_true", help="skip the real-model part")
    ap.add_argument("--no-mock", action="store_true", help="skip the mock part")
    args = ap.parse_args()
    args.seconds = args.seconds or (2 if args.quick else 3)
    args.requests = args.requests or (20 if args.quick else 40)
    install_sigterm()
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as d:
        tmp = Path(d)
        if not args.no_mock:
            (tmp / "mock").mkdir()
            out += [*mock_part(args, tmp / "mock"), ""]
        if not args.no_real:
            out += real_part(args, tmp)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
