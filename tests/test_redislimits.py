"""Limits shared through a real redis-server (tests/redisproc.py): two SharedLimiters with stores
of their own stand for two llmd hosts. Each test uses a prefix of its own on the shared server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import yaml

from llmd.auth import Principal
from llmd.config import LimitFields, LimitsConfig
from llmd.errors import ApiError, RateLimited
from llmd.limits import Grant, Limiter
from llmd.redislimits import RETRY_AFTER_S, RedisStore, SharedLimiter
from tests.fakeproc import free_port
from tests.redisproc import RedisServer


def principal(key: str = "k", **limits: int) -> Principal:
    return Principal(key_id=key, tier="t", limits=LimitFields(**limits), models=None)


@contextlib.asynccontextmanager
async def hosts(redis: RedisServer, n: int = 2, **cfg: object) -> AsyncIterator[list[SharedLimiter]]:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    stores = [RedisStore(LimitsConfig(store="redis", prefix=prefix, **cfg), url=redis.url) for _ in range(n)]  # type: ignore[arg-type]
    for s in stores:
        await s.open()
    try:
        yield [SharedLimiter(s) for s in stores]
    finally:
        for s in stores:
            await s.close()


async def settled(lims: list[SharedLimiter]) -> None:
    for lim in lims:
        if lim.store._tasks:
            await asyncio.wait(lim.store._tasks)


async def try_acquire(lim: Limiter, p: Principal, reserve: int = 10) -> Grant | ApiError:
    try:
        return await lim.acquire(p, reserve)
    except ApiError as e:
        return e


async def test_requests_per_minute_exact_across_hosts(redis_server: RedisServer) -> None:
    p = principal(requests_per_minute=30)
    async with hosts(redis_server) as lims:
        # 100 at once, alternating between the two hosts: exactly 30 get through.
        results = await asyncio.gather(*(try_acquire(lims[i % 2], p) for i in range(100)))
        grants = [r for r in results if isinstance(r, Grant)]
        refused = [r for r in results if isinstance(r, RateLimited)]
        assert len(grants) == 30 and len(refused) == 70
        assert {r.reason for r in refused} == {"requests_per_minute"}
        assert 55 <= int(refused[0].headers["Retry-After"]) <= 60
        # Both hosts admitted some; the headers of each say what Redis holds.
        assert lims[0].headers(p)["x-ratelimit-remaining-requests"] == "0"
        for g in grants:
            g.release(5)
        await settled(lims)


async def test_tokens_reserved_then_settled_across_hosts(redis_server: RedisServer) -> None:
    p = principal(tokens_per_minute=1000)
    async with hosts(redis_server) as (a, b):
        g = await a.acquire(p, 600)
        refused = await try_acquire(b, p, 600)  # 600 reserved + 600 > 1000
        assert isinstance(refused, RateLimited) and refused.reason == "tokens_per_minute"
        assert "(600 used or reserved in the last minute, this request reserves 600)" in refused.message
        too_big = await try_acquire(b, p, 1001)
        assert isinstance(too_big, RateLimited) and "Request too large" in too_big.message
        g.release(100)  # it used 100 of its 600
        await settled([a])
        g2 = await b.acquire(p, 600)  # 100 + 600 <= 1000
        assert b.headers(p)["x-ratelimit-remaining-tokens"] == "300"
        g2.release(600)
        await settled([b])


async def test_concurrency_across_hosts_and_leases_of_a_dead_host(redis_server: RedisServer) -> None:
    p = principal(max_concurrent=2)
    async with hosts(redis_server, lease_s=1.5) as (a, b):
        g1, g2 = await a.acquire(p, 1), await b.acquire(p, 1)
        refused = await try_acquire(a, p)
        assert isinstance(refused, RateLimited) and refused.reason == "concurrency"
        g2.release(1)
        await settled([b])
        g3 = await b.acquire(p, 1)
        # Host a keeps renewing g1 beyond its lease while the request runs.
        await asyncio.sleep(2.5)
        assert isinstance(await try_acquire(b, p), RateLimited)
        # Host a "dies": no more renewals, no settle. Its slot frees within lease_s.
        assert a.store._renewer is not None
        a.store._renewer.cancel()
        t0 = time.monotonic()
        while isinstance(r := await try_acquire(b, p), RateLimited):
            assert time.monotonic() - t0 < 1.5 + 1.5  # lease_s plus slack for a loaded machine (Redis expires it)
            await asyncio.sleep(0.05)
        assert isinstance(r, Grant)
        for g in (g1, g3, r):
            g.release(1)
        await settled([a, b])


async def test_monthly_quota_seeded_and_shared(redis_server: RedisServer) -> None:
    p = principal(monthly_tokens=1000)
    async with hosts(redis_server) as (a, b):
        month = a.monthly.month
        await a.seed_month(month, {"k": 900})
        await b.seed_month(month, {"k": 500})  # a lower (older) total never lowers the count
        g = await b.acquire(p, 50)
        refused = await try_acquire(a, p, 50)  # 900 used + 50 reserved + ... >= 1000? not yet
        assert isinstance(refused, Grant)
        refused.release(0)
        g.release(150)  # 900 + 150 >= 1000
        await settled([a, b])
        quota = await try_acquire(a, p, 1)
        assert isinstance(quota, ApiError) and quota.status == 429 and quota.code == "insufficient_quota"
        assert "(1050 used in" in quota.message


async def test_same_decisions_as_the_in_process_limiter(redis_server: RedisServer) -> None:
    """One host on Redis and the in-process Limiter, fed the same sequence, decide alike."""
    p = principal(requests_per_minute=7, tokens_per_minute=500, max_concurrent=3)
    local = Limiter()
    async with hosts(redis_server, n=1) as (shared,):
        seq = itertools.cycle([40, 120, 200, 60, 90])
        held: list[tuple[Grant, Grant]] = []
        for i in range(20):
            reserve = next(seq)
            a, b = await try_acquire(local, p, reserve), await try_acquire(shared, p, reserve)
            assert isinstance(a, ApiError) == isinstance(b, ApiError), (i, a, b)
            if isinstance(a, RateLimited):
                assert isinstance(b, RateLimited) and a.reason == b.reason and a.message == b.message
            else:
                held.append((a, b))  # type: ignore[arg-type]
            # The headers of the answer (Redis's as of this admission) are the same too.
            for h in ("x-ratelimit-remaining-tokens", "x-ratelimit-remaining-requests"):
                assert local.headers(p)[h] == shared.headers(p)[h], (i, h)
            if len(held) >= 2:  # finish the oldest request with half its reservation
                ga, gb = held.pop(0)
                ga.release(ga.reserved // 2)
                gb.release(gb.reserved // 2)
                await settled([shared])


async def test_redis_down_fail_closed_then_local(redis_server: RedisServer) -> None:
    p = principal(requests_per_minute=1000)
    async with hosts(redis_server, n=1) as (closed,), hosts(redis_server, n=1, on_store_error="local") as (local,):
        errors: list[str] = []
        closed.store.on_error = errors.append
        g = await closed.acquire(p, 1)
        redis_server.stop()
        try:
            t0 = time.monotonic()
            refused = await try_acquire(closed, p)
            assert isinstance(refused, ApiError) and refused.status == 503 and refused.code == "limits_unavailable"
            assert time.monotonic() - t0 < 3.0  # refused connections fail at once, not after a hang
            assert not closed.store.healthy and errors == ["admit"]
            # Within RETRY_AFTER_S nobody waits on Redis again: answered from memory.
            failed_at = closed.store._failed_at
            again = await try_acquire(closed, p)
            assert isinstance(again, ApiError) and again.status == 503
            if time.monotonic() - failed_at < RETRY_AFTER_S:  # (a busy machine may let the window pass)
                assert errors == ["admit"]
            g.release(7)  # kept, sent when Redis is back
            await settled([closed])
            assert len(closed.store.pending) == 1
            fallback = await local.acquire(p, 1)  # local: this process's own limits
            assert type(fallback) is Grant
            fallback.release(1)
        finally:
            redis_server.start_again()
        await asyncio.sleep(1.1)
        g2 = await closed.acquire(p, 1)  # Redis answers again
        assert closed.store.healthy
        g2.release(1)
        await settled([closed])
        await closed.store._send_pending()
        assert not closed.store.pending


def test_check_probes_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"port": 0}, "usage": {"path": str(tmp_path / "u.sqlite3")},
                                   "limits": {"store": "redis"}}))  # fmt: skip
    run = [sys.executable, "-m", "llmd", "check", "-c", str(cfg)]
    ok = subprocess.run(run, capture_output=True, text=True, env={**os.environ, "LLMD_REDIS_URL": redis_server.url})
    assert ok.returncode == 0 and "limits store: ok: Redis " in ok.stdout, ok.stderr
    dead = f"redis://127.0.0.1:{free_port()}/0"
    bad = subprocess.run(run, capture_output=True, text=True, env={**os.environ, "LLMD_REDIS_URL": dead})
    assert bad.returncode == 1 and "limits store: UNREACHABLE" in bad.stderr


async def test_a_restarted_redis_gets_the_months_totals_again(redis_server: RedisServer) -> None:
    """Redis without persistence forgets everything when it restarts: on reconnecting, each llmd
    seeds the monthly counters again from its ledger (here a stand-in for month_totals)."""
    p = principal(monthly_tokens=1000)
    async with hosts(redis_server, n=1) as (lim,):
        month = lim.monthly.month

        async def month_totals() -> tuple[str, dict[str, int]]:
            return month, {"k": 1000}

        lim.store.month_totals = month_totals
        await lim.seed_month(month, {"k": 1000})
        assert isinstance(await try_acquire(lim, p), ApiError)
        redis_server.stop()
        redis_server.start_again()  # empty
        await asyncio.sleep(RETRY_AFTER_S + 0.1)  # past the failure the next call sees
        first = await try_acquire(lim, p)  # reconnects (this one may race the reseed)
        if isinstance(first, Grant):
            first.release(0)
        await settled([lim])
        refused = await try_acquire(lim, p)
        assert isinstance(refused, ApiError) and refused.code == "insufficient_quota"


async def test_a_dead_hosts_monthly_reservations_lapse_with_its_leases(redis_server: RedisServer) -> None:
    p = principal(monthly_tokens=1000)
    async with hosts(redis_server, lease_s=1.0) as (a, b):
        g = await a.acquire(p, 900)  # a request reserving 900 of the 1000 is running on a
        small = await try_acquire(b, p, 50)
        assert isinstance(small, Grant)  # 900 reserved < 1000: admitted
        small.release(0)
        await settled([b])
        await asyncio.sleep(1.5)  # beyond lease_s: a renews its lease while the request runs
        assert isinstance(await try_acquire(b, p, 200), Grant)  # 900 < 1000; now 1100 reserved
        assert isinstance(await try_acquire(b, p, 1), ApiError)
        assert a.store._renewer is not None
        a.store._renewer.cancel()  # a dies: its 900 lapse within lease_s
        await asyncio.sleep(1.2)
        assert isinstance(await try_acquire(b, p, 1), Grant)
        assert g is not None


async def test_a_request_cancelled_while_redis_decides_leaves_nothing_taken(redis_server: RedisServer) -> None:
    p = principal(max_concurrent=1, monthly_tokens=1000)
    async with hosts(redis_server, n=1, lease_s=60) as (lim,):
        for _ in range(5):
            task = asyncio.create_task(lim.acquire(p, 900))
            await asyncio.sleep(0)  # sent, not answered yet
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)
            await settled([lim])
        g = await lim.acquire(p, 900)  # neither the slot nor the 900 tokens leaked (lease_s is 60)
        g.release(0)
        await settled([lim])


async def test_zero_token_settles_and_their_window_exit(redis_server: RedisServer) -> None:
    """Requests that used 0 tokens (refused upstream, aborted) settle, and leave the window,
    without a script error (Lua's -0 is no integer to Redis)."""
    p = principal(tokens_per_minute=1000, monthly_tokens=10_000)
    async with hosts(redis_server, n=1) as (lim,):
        errors: list[str] = []
        lim.store.on_error = errors.append
        for _ in range(3):
            (await lim.acquire(p, 100)).release(0)
        await settled([lim])
        # Make the entries old enough to leave the window: move their scores back a minute.
        tpm = lim.store.key("k", "tpm")
        for member in await lim.store.client.call("ZRANGE", tpm, 0, -1):
            await lim.store.client.call("ZINCRBY", tpm, -61, member)
        g = await lim.acquire(p, 1000)  # prunes three zero entries: the window is empty again
        g.release(0)
        await settled([lim])
        assert errors == [] and lim.store.healthy
