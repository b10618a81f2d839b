"""Models on demand: what a cold start, a warm request and a swap cost on the real model, and a
timeline of a mixed two-model load under a budget that fits one.

    .venv/bin/python bench/ondemand_bench.py            # 5 rounds + a mixed load of 16 requests
    .venv/bin/python bench/ondemand_bench.py --rounds 2 --mixed 8

llmd serves the real Gemma 3 270M (bin/llama-server, models/gemma-3-270m-q4_k_m.gguf) under two
model names, ``a`` and ``b``, both ``load: on_demand`` with ``-c 512 -np 2 -t 1``, under a
``server.memory_budget`` of 1.5x llmd's own estimate of one replica: only one runs at a time.
Each round: ``a`` is made cold (``POST /admin/models/a/unload``), then timed from the client:

* cold: the first chat request for ``a`` (start + answer);
* warm: the next one;
* swap: a chat request for ``b`` while ``a`` is warm and idle (stop ``a``, start ``b``, answer);
* load: ``POST /admin/models/a/load`` after unloading both (the start alone, as `llmd load`).

Then the mixed load: requests for ``a`` and ``b`` interleaved, one every 0.3 s, 6 at a time; the
running set is sampled from /admin/status. Requests ask for 8 tokens at temperature 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness import MODEL_PATH, ROOT, http_get, install_sigterm, llama_launcher, md_table, start_llmd, stop_llmd

sys.path.insert(0, str(ROOT))
from llmd.budget import fmt, replica_bytes
from llmd.config import ModelConfig

ARGS = ["-c", "512", "-np", "2", "-t", "1"]


def post(url: str, doc: dict[str, Any] | None, timeout: float = 300) -> tuple[int, float]:
    import urllib.error
    import urllib.request

    data = json.dumps(doc).encode() if doc is not None else b""
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method="POST")
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, time.monotonic() - t0


def chat(base: str, model: str, text: str = "Say hi.") -> tuple[int, float]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
    return post(base + "/v1/chat/completions", body)


def running(base: str) -> list[str]:
    st = json.loads(http_get(base + "/admin/status")[1])
    return sorted(r["model"] for r in st["replicas"] if r["pid"] is not None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mixed", type=int, default=16, help="requests in the mixed load (0: none)")
    opts = ap.parse_args()
    install_sigterm()
    estimate = replica_bytes(ModelConfig(backend="llama-server", model=str(MODEL_PATH), args=ARGS))
    model = {"backend": "llama-server", "model": str(MODEL_PATH), "args": ARGS, "load": "on_demand", "idle_ttl_s": 600}
    doc = {
        "server": {"memory_budget": {"ram": int(estimate * 1.5)}},
        "models": {"a": model, "b": model},
        "launchers": llama_launcher(),
        "routing": {"queue_timeout_s": 300},
    }
    times: dict[str, list[float]] = {"cold": [], "warm": [], "swap": [], "load": []}
    with tempfile.TemporaryDirectory(prefix="ondemand-bench-") as tmp:
        srv = start_llmd(doc, Path(tmp), every_replica=False)
        base = srv.url
        try:
            for _ in range(opts.rounds):
                for m in ("a", "b"):
                    post(f"{base}/admin/models/{m}/unload", None)
                for case, m in (("cold", "a"), ("warm", "a"), ("swap", "b")):
                    st, took = chat(base, m)
                    assert st == 200, (case, st)
                    times[case].append(took)
                post(f"{base}/admin/models/b/unload", None)
                st, took = post(f"{base}/admin/models/a/load", None)
                assert st == 200, st
                times["load"].append(took)
            rows = [
                [case, str(len(v)), f"{statistics.median(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}"]
                for case, v in times.items()
            ]
            print(f"estimate of one replica: {fmt(estimate)}; budget {fmt(int(estimate * 1.5))}\n")
            print("\n".join(md_table(["case", "n", "p50 s", "min s", "max s"], rows, "lrrrr")))
            if opts.mixed:
                mixed(base, opts.mixed)
        finally:
            srv.replica_pids = []
            stop_llmd(srv)
    return 0


def mixed(base: str, n: int) -> None:
    t0 = time.monotonic()
    lines: list[tuple[float, str]] = []
    stop = threading.Event()

    def sample() -> None:
        seen: list[str] | None = None
        while not stop.is_set():
            now = running(base)
            if now != seen:
                lines.append((time.monotonic() - t0, f"running: {', '.join(now) or '-'}"))
                seen = now
            time.sleep(0.05)

    def one(i: int) -> int:
        m = "a" if i % 2 == 0 else "b"
        time.sleep(i * 0.3)
        at = time.monotonic() - t0
        st, took = chat(base, m, f"Count to {i}.")
        lines.append((at, f"{m} request {i:2d} -> {st} in {took:.2f}s"))
        return st

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(6) as ex:
            statuses = list(ex.map(one, range(n)))
    finally:
        stop.set()
        sampler.join()
    print(f"\nmixed load: {n} requests, {statuses.count(200)} answered 200; timeline:\n")
    for at, line in sorted(lines):
        print(f"  {at:6.2f}s  {line}")


if __name__ == "__main__":
    raise SystemExit(main())
