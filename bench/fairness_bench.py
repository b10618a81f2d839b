"""Fair-admission benchmark: does one key's flood delay another key's single requests?

    .venv/bin/python bench/fairness_bench.py            # 10 light requests per scenario (~4 min)
    .venv/bin/python bench/fairness_bench.py --quick    # 5 light requests per scenario (~2.5 min)
    .venv/bin/python bench/fairness_bench.py --slots 1  # the same with -np 1 (see bench/README.md)

Setup: a real `llmd serve` with model ``chat`` on ONE llama-server replica with 2 slots
(``-np 2``; ``--slots N`` changes it), pinned to CPU 1 with ``-t 1``; llmd and this script stay
on CPU 0, so the load generator never steals the replica's core. Two real keys (sha256 of secrets generated here), both
in tier ``standard`` with ``priority: 1``, so only llmd's per-key fair share can tell them apart:

* ``heavy`` keeps 16 requests in flight all the time (a batch job): 2 run (one per slot), 14 wait
  in llmd's queue (``routing.max_queue`` 256, ``queue_timeout_s`` 600, so none is refused);
* ``light`` sends one request at a time (an IDE user), with a random 0.5-3 s pause between.

Every request is a short distinct prompt with ``max_tokens`` 32 and llama-server's
``ignore_eos``, so each costs the same; light's latency is client-side, request to last byte.

Scenarios, each measuring light's latency:
  (a) idle: no heavy load, the baseline;
  (b) fair: heavy load, ``routing.admission: fair`` (tier priority, then the key with the least
      recent service goes first; llmd's default);
  (c) fifo: heavy load, ``routing.admission: fifo`` (arrival order), on a fresh llmd.
Goal: light's p50 under (b) within 2x of (a). Under (c) light queues behind heavy's 14 waiters.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from harness import (
    MODEL,
    MODEL_PATH,
    Llmd,
    install_sigterm,
    llama_launcher,
    md_table,
    pct,
    start_llmd,
    stop_llmd,
    warm_replicas,
)

HEAVY_IN_FLIGHT = 16
REPLICA_CPU = 1


@dataclass
class Keys:
    heavy: str
    light: str
    admin: str


def llama_args(slots: int) -> list[str]:
    return ["-c", str(2048 * slots), "-np", str(slots), "-t", "1"]


def config(admission: str, keys: Keys, slots: int) -> dict[str, Any]:
    def sha(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    return {
        "server": {"drain_seconds": 2, "log_level": "warning"},
        "tiers": {"standard": {"priority": 1}},  # no limits: the flood is throttled only by slots
        "keys": [
            {"id": "heavy", "tier": "standard", "sha256": sha(keys.heavy)},
            {"id": "light", "tier": "standard", "sha256": sha(keys.light)},
            {"id": "bench-admin", "tier": "standard", "sha256": sha(keys.admin), "admin": True},
        ],
        "models": {MODEL: {"backend": "llama-server", "model": str(MODEL_PATH), "replicas": 1,
                           "cpus": [[REPLICA_CPU]], "args": llama_args(slots)}},
        "launchers": llama_launcher(),
        "routing": {"strategy": "least-loaded", "admission": admission, "max_queue": 256, "queue_timeout_s": 600,
                    "timeouts": {"connect_s": 5, "first_byte_s": 600, "total_s": 900}},
    }


def client(srv: Llmd, secret: str) -> openai.AsyncOpenAI:
    # The SDK's default pool (1,000 connections) holds the whole flood; no retries, so a 503 shows.
    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=secret, max_retries=0, timeout=900)


async def complete(c: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> int:
    r = await c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        # Same work per request: without ignore_eos an early end-of-turn would make some cheaper.
        extra_body={"ignore_eos": True},
    )
    return r.usage.completion_tokens if r.usage else 0


@dataclass
class Scenario:
    name: str
    light_s: list[float]
    heavy_done: int = 0
    heavy_tokens: int = 0
    window_s: float = 0.0
    max_queue: int = 0

    @property
    def p50(self) -> float:
        return statistics.median(self.light_s)

    @property
    def p90(self) -> float:
        return pct(self.light_s, 0.9)


async def measure(srv: Llmd, keys: Keys, name: str, heavy: bool, n_light: int, max_tokens: int,
                  slots: int) -> Scenario:
    light_c, heavy_c = client(srv, keys.light), client(srv, keys.heavy)
    sc = Scenario(name, [])
    stop = asyncio.Event()
    flooded = asyncio.Event()  # heavy's requests fill llmd's queue
    counting = False
    seq = 0

    async def heavy_worker(w: int) -> None:
        nonlocal seq
        while not stop.is_set():
            seq += 1
            tokens = await complete(heavy_c, f"Batch job {w}-{seq}: summarize item {seq} of the nightly report.",
                                    max_tokens)
            if counting:  # only completions inside light's measurement window count as throughput
                sc.heavy_done += 1
                sc.heavy_tokens += tokens

    async def watch_queue() -> None:
        while not stop.is_set():
            st = await asyncio.to_thread(srv.status)  # urllib in a thread: 5 calls a second
            sc.max_queue = max(sc.max_queue, st["queues"].get(MODEL, 0))
            if sc.max_queue >= max(1, HEAVY_IN_FLIGHT - slots - 2):
                flooded.set()
            await asyncio.sleep(0.2)

    tasks: list[asyncio.Task[None]] = []
    try:
        tasks.append(asyncio.create_task(watch_queue()))
        if heavy:
            tasks += [asyncio.create_task(heavy_worker(w)) for w in range(HEAVY_IN_FLIGHT)]
            # Let the flood reach its steady state (`slots` running, the rest queued) before light starts.
            await asyncio.wait_for(flooded.wait(), 60)
            await asyncio.sleep(2.0)
        rng = random.Random(name)
        counting = True
        t0 = time.perf_counter()
        for i in range(n_light):
            # A human-ish pause, random and longer than one heavy request, so light arrives at
            # random points of heavy's service cycle (not always just after its own slot was refilled).
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            t = time.perf_counter()
            await complete(light_c, f"IDE question {i}: what does a Python list comprehension return?", max_tokens)
            sc.light_s.append(time.perf_counter() - t)
        sc.window_s = time.perf_counter() - t0
        counting = False
        for t in tasks:
            if t.done() and t.exception():  # a failed heavy worker would make the scenario meaningless
                raise t.exception()  # type: ignore[misc]
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in (light_c, heavy_c):
            await c.close()
    return sc


def run_llmd(admission: str, keys: Keys, slots: int, workdir: Path, plan: list[tuple[str, bool]], n_light: int,
             max_tokens: int) -> list[Scenario]:
    srv = start_llmd(config(admission, keys, slots), workdir / admission, {"Authorization": f"Bearer {keys.admin}"})
    try:
        warm_replicas(srv)
        out = []
        for name, heavy in plan:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            out.append(asyncio.run(measure(srv, keys, name, heavy, n_light, max_tokens, slots)))
            # Drain what the cancelled heavy requests left on the replica before the next scenario.
            time.sleep(3)
        return out
    finally:
        stop_llmd(srv)


def report(scenarios: list[Scenario]) -> None:
    idle = scenarios[0]
    print("\n### Light key's latency (request to last byte) while heavy keeps 16 in flight\n")
    header = ("scenario", "light requests", "light p50", "light p90", "p50 ratio to idle", "p90 ratio to idle",
              "heavy throughput", "max llmd queue")
    rows = []
    for s in scenarios:
        thr = (f"{s.heavy_done / s.window_s:.2f} req/s, {s.heavy_tokens / s.window_s:.0f} tok/s"
               if s.heavy_done else "-")
        rows.append([s.name, str(len(s.light_s)), f"{s.p50:.2f} s", f"{s.p90:.2f} s", f"{s.p50 / idle.p50:.1f}x",
                     f"{s.p90 / idle.p90:.1f}x", thr, str(s.max_queue)])
    print("\n".join(md_table(header, rows)))
    for s in scenarios:
        print(f"{s.name}: light latencies " + " ".join(f"{x:.2f}" for x in s.light_s))
    fair = next((s for s in scenarios if s.name.startswith("(b)")), None)
    fifo = next((s for s in scenarios if s.name.startswith("(c)")), None)
    if fair:
        verdict = "met" if fair.p50 <= 2 * idle.p50 else "NOT met"
        print(f"\ngoal (fair p50 <= 2x idle p50): {verdict} ({fair.p50 / idle.p50:.2f}x)")
    if fair and fifo:
        print(f"fifo / fair light p50: {fifo.p50 / fair.p50:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 light requests per scenario (~2.5 min)")
    ap.add_argument("--light", type=int, help="light requests per scenario (default 10; quick 5)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=2, help="llama-server -np of the one replica (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (configs, llmd logs, ledgers)")
    args = ap.parse_args()
    n_light = args.light or (5 if args.quick else 10)
    install_sigterm()
    if (os.cpu_count() or 1) >= 2:
        # llmd (a child: inherits this) and the load generator on CPU 0; the replica alone on CPU 1.
        os.sched_setaffinity(0, {0})
    keys = Keys(*(secrets.token_urlsafe(24) for _ in range(3)))
    print("## fairness_bench: config")
    print(f"- model: {MODEL_PATH.name}, 1 llama-server replica on cpus [[{REPLICA_CPU}]], "
          f"args {' '.join(llama_args(args.slots))}; "
          "llmd + load generator on CPU 0")
    print(f"- keys heavy, light (tier standard, priority 1 both; no limits); heavy: {HEAVY_IN_FLIGHT} in flight, "
          f"light: {n_light} sequential (pause 0.5-3.0 s); every request max_tokens {args.max_tokens}, ignore_eos")
    print("- routing: strategy least-loaded, max_queue 256, queue_timeout_s 600; admission fair for (a), (b); "
          "fifo for (c) on a fresh llmd")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="llmd-fairness-"))
    try:
        scenarios = run_llmd("fair", keys, args.slots, tmp, [("(a) idle", False), ("(b) fair, heavy load", True)],
                             n_light, args.max_tokens)
        scenarios += run_llmd("fifo", keys, args.slots, tmp, [("(c) fifo, heavy load", True)], n_light, args.max_tokens)
    finally:
        if args.keep:
            print(f"work dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(scenarios)
    print(f"\ntotal runtime {time.perf_counter() - t0:.0f} s (including llmd/llama-server starts)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # llmd and its replicas were stopped by the `finally` blocks
        sys.exit("interrupted; llmd and its replicas stopped")
