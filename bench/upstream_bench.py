"""What one upstream request costs the client: aiohttp's ClientSession (as llmd configured it
before llmd/upstream.py) against llmd's own client (``llmd.upstream.Upstreams``), on the same
mock upstream (bench/relay_upstreams.py, relay_bench's raw uvloop server), in one uvloop process.

Each run keeps ``--conns`` requests in flight for ``--duration`` seconds, non-stream (read the
whole body) or stream (read every chunk as it arrives), and reports requests/s and this
process's CPU per request (``time.process_time``; the mock runs in its own process, pinned to
another CPU when there are two). Runs alternate between the clients, round after round, and
the table shows medians and the per-round ratio, so slow phases of a shared machine hit both.

    .venv/bin/python bench/upstream_bench.py [--rounds 5] [--duration 2] [--conns 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from relay_bench import request_body  # noqa: E402  (the same request llmd relays in relay_bench)

from llmd.upstream import Upstreams  # noqa: E402

HEADERS = {"Content-Type": "application/json", "X-Request-ID": "0" * 32, "Accept-Encoding": "identity"}

One = Callable[[str, bytes, bool], Awaitable[int]]


def aiohttp_client() -> tuple[One, Callable[[], Awaitable[None]]]:
    # As llmd/runtime.py built its session, and as relay.py posted (per-request ClientTimeout).
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300),
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
    )

    async def one(url: str, body: bytes, stream: bool) -> int:
        resp = await session.post(
            url,
            data=body,
            headers=HEADERS,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, connect=10),
        )
        try:
            if not stream:
                return len(await resp.read())
            n = 0
            while data := await resp.content.readany():
                n += len(data)
            return n
        finally:
            resp.release()

    return one, session.close


def own_client() -> tuple[One, Callable[[], Awaitable[None]]]:
    ups = Upstreams()

    async def one(url: str, body: bytes, stream: bool) -> int:
        resp = await ups.post(url, body, HEADERS, 10)
        try:
            if not stream:
                return len(await resp.read())
            n = 0
            while data := await resp.readany():
                n += len(data)
            return n
        finally:
            resp.release()

    async def close() -> None:
        ups.close()

    return one, close


async def run(one: One, url: str, stream: bool, conns: int, duration: float) -> tuple[float, float]:
    """(requests/s, CPU ms per request) of ``conns`` closed loops for ``duration`` seconds."""
    body = request_body(stream)
    count = 0
    stop = time.monotonic() + duration

    async def loop() -> None:
        nonlocal count
        while time.monotonic() < stop:
            assert await one(url, body, stream) > 0
            count += 1

    await asyncio.gather(*(loop() for _ in range(conns)))  # warm: connections open
    count = 0
    stop = time.monotonic() + duration
    t0, c0 = time.monotonic(), time.process_time()
    await asyncio.gather(*(loop() for _ in range(conns)))
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    return count / wall, 1000 * cpu / count


async def main(args: argparse.Namespace, port: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    clients = {"aiohttp": aiohttp_client(), "llmd.upstream": own_client()}
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        names = list(clients) if r % 2 == 0 else list(reversed(clients))
        for stream in (False, True):
            for name in names:
                rps, cpu = await run(clients[name][0], url, stream, args.conns, args.duration)
                results.setdefault((name, stream), []).append((rps, cpu))
                kind = "stream" if stream else "non-stream"
                print(f"round {r + 1} {kind:10} {name:14} {rps:9,.0f} req/s {cpu:.4f} ms CPU/req", flush=True)
    for _, close in clients.values():
        await close()
    print(f"\n{args.rounds} rounds x {args.duration:g} s, {args.conns} requests in flight, medians:\n")
    print("| shape | client | req/s | client CPU ms/req | CPU ratio to aiohttp (median of rounds) |")
    print("|---|---|---:|---:|---:|")
    for stream in (False, True):
        base = results[("aiohttp", stream)]
        for name in clients:
            rows = results[(name, stream)]
            ratio = statistics.median(c / b[1] for (_, c), b in zip(rows, base, strict=True))
            print(
                f"| {'stream' if stream else 'non-stream'} | {name} | {statistics.median(r for r, _ in rows):,.0f} "
                f"| {statistics.median(c for _, c in rows):.4f} | {ratio:.2f} |"
            )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--conns", type=int, default=16)
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    mock_cpus = {cpus[0]} if len(cpus) > 1 else None
    here = {cpus[1]} if len(cpus) > 1 else None
    mock = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "relay_upstreams.py"), "mock"],
        stdout=subprocess.PIPE,
        preexec_fn=(lambda: os.sched_setaffinity(0, mock_cpus)) if mock_cpus else None,
    )
    try:
        assert mock.stdout is not None
        line = mock.stdout.readline().decode()
        if not line.startswith("MOCK_PORT "):
            raise SystemExit(f"mock did not start: {line!r}")
        if here:
            os.sched_setaffinity(0, here)
        uvloop.run(main(args, int(line.split()[1])))
    finally:
        mock.terminate()
        mock.wait(5)


if __name__ == "__main__":
    cli()
