"""The completion cache end to end against the fake: what it serves and to whom, streams replayed
byte for byte, the SQLite store across a restart, Cache-Control, TTL and the byte bound, the
ledger's rows of hits, and the tier's say on limits."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmd import schema
from llmd.cache import Entry, Store, deterministic
from llmd.config import UsageConfig
from llmd.months import month_of
from llmd.report import format_report, report_file
from llmd.usage import Ledger
from tests.conftest import base_config, run_llmd, wait_for, write_config
from tests.fakeproc import FakeProc

KEYS = {"a1": "sk-cache-a1-0123456789", "a2": "sk-cache-a2-0123456789", "b1": "sk-cache-b1-0123456789"}
TIER = {"a1": "alpha", "a2": "alpha", "b1": "beta"}


def config(tmp_path: Path, fake: FakeProc, cache: dict[str, Any] | None = None, tiers: dict | None = None) -> Path:
    keys = [{"id": k, "tier": TIER[k], "sha256": hashlib.sha256(s.encode()).hexdigest()} for k, s in KEYS.items()]
    doc = base_config(
        tmp_path,
        {
            "m": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 8, "cache": True},
            "nocache": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 8},
        },
        tiers=tiers or {"alpha": {}, "beta": {}},
        keys=keys,
        cache=cache or {},
    )
    return write_config(tmp_path / "config.yaml", doc)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 5, **extra}


async def post(
    url: str, body: dict[str, Any] | bytes, key: str = "a1", path: str = "/v1/chat/completions", **headers: str
) -> tuple[int, bytes, str]:
    """(status, body bytes, x-llmd-cache) as the client got them."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Authorization": f"Bearer {KEYS[key]}", "Content-Type": "application/json", **headers}
    async with aiohttp.ClientSession() as s, s.post(url + path, data=data, headers=h) as r:
        return r.status, await r.read(), r.headers.get("x-llmd-cache", "")


async def upstream_requests(fake: FakeProc) -> int:
    return int((await fake.stats())["requests"])


def rows(tmp_path: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(tmp_path / "usage.sqlite3")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM requests ORDER BY id")]
    finally:
        con.close()


# --- what is cacheable (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "ok"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"seed": 7}, True),
        ({"seed": 7, "temperature": 1.2}, True),  # a seed makes sampling repeatable
        ({}, False),  # the engine's default temperature samples
        ({"temperature": 0.7}, False),
        ({"temperature": False}, False),
        ({"seed": -1}, False),  # llama.cpp: a random seed
        ({"temperature": 0, "n": 2}, False),
        ({"temperature": 0, "n": 1}, True),
        ({"temperature": 0, "n_cmpl": 3}, False),
        ({"temperature": 0, "tools": [{"type": "function"}]}, False),
        ({"temperature": 0, "tools": [{"type": "function"}], "tool_choice": "auto"}, False),
        ({"temperature": 0, "tools": [{"type": "function"}], "tool_choice": "none"}, True),
        ({"temperature": 0, "tools": [{"name": "x"}], "tool_choice": {"type": "none"}}, True),  # Anthropic
        ({"temperature": 0, "functions": [{"name": "f"}]}, False),
        ({"temperature": 0, "previous_response_id": "resp_1"}, False),
    ],
)
def test_deterministic(doc: dict[str, Any], ok: bool) -> None:
    assert deterministic(doc) is ok


def test_store_is_an_lru_bounded_in_bytes_and_entries() -> None:
    evicted: list[tuple[bytes, str]] = []
    store = Store(max_bytes=3 * (100 + 200 + 1), max_entries=None)
    store.on_evict = lambda k, reason: evicted.append((k, reason))

    def entry(expires: float = 1e12) -> Entry:
        return Entry(b"x" * 100, "application/json", False, 1, 1, expires)

    for k in (b"a", b"b", b"c"):
        store.put(k, entry())
    assert store.get(b"a", 0) is not None  # a is now the most recently used
    store.put(b"d", entry())
    assert evicted == [(b"b", "bytes")] and set(store.entries) == {b"a", b"c", b"d"}
    assert store.bytes == 3 * 301
    store.put(b"big", Entry(b"x" * 10_000, "", False, 0, 0, 1e12))  # larger than the cache: not kept
    assert b"big" not in store.entries and len(store.entries) == 3
    store.put(b"old", entry(expires=5))
    assert store.get(b"old", 6) is None and evicted[-1] == (b"old", "expired")
    store.max_entries = 1
    store.trim()
    assert list(store.entries) == [b"d"] and store.bytes == 301


# --- end to end -------------------------------------------------------------------------------------


async def test_only_deterministic_requests_are_served_and_key_order_does_not_matter(
    tmp_path: Path, fake: FakeProc
) -> None:
    async with run_llmd(config(tmp_path, fake)) as llmd:
        n0 = await upstream_requests(fake)
        # Sampled: never from the cache, each goes upstream.
        for _ in range(2):
            status, _, state = await post(llmd.url, chat(temperature=0.8))
            assert (status, state) == (200, "bypass")
        assert await upstream_requests(fake) == n0 + 2
        status, first, state = await post(llmd.url, chat(temperature=0))
        assert (status, state) == (200, "miss")
        # The same request with its keys in another order and other whitespace.
        raw = (
            b'{ "temperature" : 0,\n "max_tokens": 5,'
            b' "messages": [{"content": "one two three", "role": "user"}],  "model": "m"}'
        )
        status, again, state = await post(llmd.url, raw)
        assert (status, state) == (200, "hit")
        assert again == first  # the bytes the first client got (the fake's ids differ per answer)
        assert await upstream_requests(fake) == n0 + 3
        # Another model without cache: no header, always upstream.
        status, _, state = await post(llmd.url, chat(model="nocache", temperature=0))
        status, _, state = await post(llmd.url, chat(model="nocache", temperature=0))
        assert (status, state) == (200, "")
        assert await upstream_requests(fake) == n0 + 5
        # Tools the model could call are not cached; tool_choice none is.
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        for _ in range(2):
            assert (await post(llmd.url, chat(temperature=0, tools=tools)))[2] == "bypass"
        assert (await post(llmd.url, chat(temperature=0, tools=tools, tool_choice="none")))[2] == "miss"
        assert (await post(llmd.url, chat(temperature=0, tools=tools, tool_choice="none")))[2] == "hit"
        # Embeddings are a pure function of their input: cached without a temperature.
        emb = {"model": "m", "input": "hello"}
        assert (await post(llmd.url, emb, path="/v1/embeddings"))[2] == "miss"
        assert (await post(llmd.url, emb, path="/v1/embeddings"))[2] == "hit"


async def test_scope_key_tier_and_shared(tmp_path: Path, fake: FakeProc) -> None:
    async with run_llmd(config(tmp_path, fake)) as llmd:  # scope: key (the default)
        assert (await post(llmd.url, chat(seed=1), "a1"))[2] == "miss"
        assert (await post(llmd.url, chat(seed=1), "a2"))[2] == "miss"  # same tier, other key
        assert (await post(llmd.url, chat(seed=1), "a1"))[2] == "hit"
        assert (await post(llmd.url, chat(seed=1), "a2"))[2] == "hit"
    (tmp_path / "usage.sqlite3").unlink()
    async with run_llmd(config(tmp_path, fake, {"scope": "tier"})) as llmd:
        assert (await post(llmd.url, chat(seed=2), "a1"))[2] == "miss"
        assert (await post(llmd.url, chat(seed=2), "a2"))[2] == "hit"  # a tier-mate
        assert (await post(llmd.url, chat(seed=2), "b1"))[2] == "miss"  # another tier
    async with run_llmd(config(tmp_path, fake, {"scope": "shared"})) as llmd:
        assert (await post(llmd.url, chat(seed=3), "a1"))[2] == "miss"
        assert (await post(llmd.url, chat(seed=3), "b1"))[2] == "hit"


async def read_stream(url: str, body: dict[str, Any], key: str = "a1") -> tuple[list[bytes], bytes, str]:
    """The reads as they arrived, their bytes, and x-llmd-cache."""
    h = {"Authorization": f"Bearer {KEYS[key]}"}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body, headers=h) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        reads = [chunk async for chunk in r.content.iter_any()]
        return reads, b"".join(reads), r.headers.get("x-llmd-cache", "")


@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_is_replayed_byte_for_byte(tmp_path: Path, fake: FakeProc, include_usage: bool) -> None:
    body = chat(temperature=0, stream=True, max_tokens=6)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with run_llmd(config(tmp_path, fake)) as llmd:
        n0 = await upstream_requests(fake)
        _, first, state = await read_stream(llmd.url, body)
        assert state == "miss"
        _, again, state = await read_stream(llmd.url, body)
        assert state == "hit"
        assert again == first
        events = [e for e in again.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        assert (b'"usage"' in again) is include_usage  # llmd's own usage chunk stays hidden
        assert await upstream_requests(fake) == n0 + 1
        # A non-stream request of the same prompt is another entry.
        assert (await post(llmd.url, chat(temperature=0, max_tokens=6)))[2] == "miss"
    await asyncio.sleep(0.1)
    hit = rows(tmp_path)[1]
    assert hit["cache"] == "hit" and hit["stream"] == 1 and hit["completion_tokens"] == 6
    # `llmd usage` tells hits apart: 3 requests, 1 answered by the cache
    (report,) = report_file(str(tmp_path / "usage.sqlite3"))
    assert (report.requests, report.cache_hits) == (3, 1)
    assert format_report([report]).splitlines()[0].split()[-1] == "CACHE_HITS"


async def test_sqlite_store_survives_a_restart(tmp_path: Path, fake: FakeProc) -> None:
    cfg = config(tmp_path, fake, {"store": "sqlite"})
    body = chat(temperature=0, stream=True)
    async with run_llmd(cfg) as llmd:
        _, first, state = await read_stream(llmd.url, body)
        _, whole, state2 = await post(llmd.url, chat(temperature=0))
        assert (state, state2) == ("miss", "miss")
    assert (tmp_path / "cache.sqlite3").exists()  # beside the ledger
    async with run_llmd(cfg) as llmd:
        n0 = await upstream_requests(fake)
        _, again, state = await read_stream(llmd.url, body)
        assert (state, again) == ("hit", first)
        _, whole_again, state = await post(llmd.url, chat(temperature=0))
        assert (state, whole_again) == ("hit", whole)
        assert await upstream_requests(fake) == n0
    # The memory store forgets at restart.
    async with run_llmd(config(tmp_path, fake)) as llmd:
        assert (await post(llmd.url, chat(temperature=0)))[2] == "miss"


async def test_cache_control(tmp_path: Path, fake: FakeProc) -> None:
    async with run_llmd(config(tmp_path, fake)) as llmd:
        n0 = await upstream_requests(fake)
        # no-store: answered, not kept.
        assert (await post(llmd.url, chat(seed=5), **{"Cache-Control": "no-store"}))[2] == "miss"
        assert (await post(llmd.url, chat(seed=5)))[2] == "miss"  # this one is kept
        assert (await post(llmd.url, chat(seed=5)))[2] == "hit"
        # no-cache: not answered from the cache, but its answer replaces the entry.
        status, fresh, state = await post(llmd.url, chat(seed=5), **{"Cache-Control": "no-cache, max-age=0"})
        assert (status, state) == (200, "bypass")
        status, again, state = await post(llmd.url, chat(seed=5))
        assert (state, again) == ("hit", fresh)
        assert await upstream_requests(fake) == n0 + 3


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return await r.text()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_ttl_and_byte_bound_evict(tmp_path: Path, fake: FakeProc) -> None:
    async with run_llmd(config(tmp_path, fake, {"ttl_s": 0.5})) as llmd:
        assert (await post(llmd.url, chat(seed=1)))[2] == "miss"
        assert (await post(llmd.url, chat(seed=1)))[2] == "hit"
        await asyncio.sleep(0.6)
        assert (await post(llmd.url, chat(seed=1)))[2] == "miss"
        text = await scrape(llmd.url)
        assert metric(text, 'llmd_cache_evictions_total{reason="expired"}') == 1
        assert metric(text, 'llmd_cache_lookups_total{model="m",result="hit"}') == 1
        assert metric(text, 'llmd_cache_lookups_total{model="m",result="miss"}') == 2
    # Room for about two answers: the third evicts the least recently used.
    _, one, _ = await post_once(tmp_path, fake)
    size = len(one) + 200 + 32
    async with run_llmd(config(tmp_path, fake, {"max_bytes": 2 * size + size // 2})) as llmd:
        for seed in (1, 2):
            assert (await post(llmd.url, chat(seed=seed)))[2] == "miss"
        assert (await post(llmd.url, chat(seed=1)))[2] == "hit"  # seed 2 is now the oldest
        assert (await post(llmd.url, chat(seed=3)))[2] == "miss"
        assert (await post(llmd.url, chat(seed=1)))[2] == "hit"
        assert (await post(llmd.url, chat(seed=2)))[2] == "miss"  # evicted
        text = await scrape(llmd.url)
        assert metric(text, 'llmd_cache_evictions_total{reason="bytes"}') == 2  # seed 2, then seed 3
        assert metric(text, "llmd_cache_entries ") == 2
        assert 0 < metric(text, "llmd_cache_bytes ") <= 2 * size + size // 2


async def post_once(tmp_path: Path, fake: FakeProc) -> tuple[int, bytes, str]:
    sub = tmp_path / "probe"
    sub.mkdir(exist_ok=True)
    async with run_llmd(config(sub, fake)) as llmd:
        return await post(llmd.url, chat(seed=1))


async def test_ledger_rows_of_hits(tmp_path: Path, fake: FakeProc) -> None:
    async with run_llmd(config(tmp_path, fake)) as llmd:
        await post(llmd.url, chat(temperature=0))
        await post(llmd.url, chat(temperature=0))
        await post(llmd.url, chat(temperature=1))
    miss, hit, bypass = rows(tmp_path)
    assert (miss["cache"], hit["cache"], bypass["cache"]) == ("miss", "hit", "bypass")
    assert miss["prompt_tokens"] > 0 and miss["completion_tokens"] == 5
    assert (hit["prompt_tokens"], hit["completion_tokens"]) == (miss["prompt_tokens"], miss["completion_tokens"])
    assert miss["upstream_tokens"] == miss["prompt_tokens"] + miss["completion_tokens"]
    assert hit["upstream_tokens"] == 0 and hit["replica"] == "" and hit["token_method"] == "cache"
    assert hit["outcome"] == "ok" and hit["status"] == 200
    # Not counted against the quota by default: the rollup says how much, so a restart agrees.
    assert hit["quota_exempt_tokens"] == hit["prompt_tokens"] + hit["completion_tokens"]
    con = sqlite3.connect(tmp_path / "usage.sqlite3")
    ((hits, exempt),) = con.execute("SELECT cache_hits, quota_exempt_tokens FROM monthly WHERE key_id = 'a1'")
    assert (hits, exempt) == (1, hit["quota_exempt_tokens"])


async def test_limits_follow_the_tier(tmp_path: Path, fake: FakeProc) -> None:
    # Default: a hit counts as a request, its tokens count against no token limit.
    tiers = {
        "alpha": {"requests_per_minute": 3, "monthly_tokens": 30},
        "beta": {"requests_per_minute": 2, "cache_hit_requests": False, "cache_hit_tokens": True},
    }
    async with run_llmd(config(tmp_path, fake, tiers=tiers)) as llmd:
        status, _, _ = await post(llmd.url, chat(temperature=0), "a1")  # ~8 + 5 tokens of 30
        for _ in range(2):
            status, _, state = await post(llmd.url, chat(temperature=0), "a1")
            assert (status, state) == (200, "hit")  # tokens free: the quota does not run out
        status, _, state = await post(llmd.url, chat(temperature=0), "a1")
        assert status == 429  # the fourth request in the minute, hit or not
        await wait_for(lambda: len(rows(tmp_path)) >= 4)
        miss = rows(tmp_path)[0]
        assert llmd.services.runtime.limiter.monthly.used["a1"] == miss["prompt_tokens"] + miss["completion_tokens"]

        # beta: hits are no requests (beyond requests_per_minute), but their tokens count.
        for _ in range(4):
            status, _, state = await post(llmd.url, chat(seed=9), "b1")
            assert status == 200
        await wait_for(lambda: len(rows(tmp_path)) >= 8)
        used = llmd.services.runtime.limiter.monthly.used["b1"]
        beta = [r for r in rows(tmp_path) if r["key_id"] == "b1"]
        assert [r["cache"] for r in beta] == ["miss", "hit", "hit", "hit"]
        assert used == 4 * (beta[0]["prompt_tokens"] + beta[0]["completion_tokens"])
        assert all(r["quota_exempt_tokens"] == 0 for r in beta)


async def test_a_ledger_of_the_previous_version_is_migrated(tmp_path: Path) -> None:
    """A file at schema version 1 (before the cache) with rows: opening adds the cache columns,
    keeps the rows (upstream_tokens NULL: unknown, all upstream work then) and the quota totals."""
    path = tmp_path / "usage.sqlite3"
    month = month_of(time.time())
    con = sqlite3.connect(path)
    for stmt in schema.MIGRATIONS[0]:
        con.execute(stmt)
    con.execute(
        "INSERT INTO requests (ts, month, request_id, key_id, tier, model, replica, route, status, stream, outcome,"
        " prompt_tokens, completion_tokens) VALUES (?, ?, 'old', 'k', '', 'm', 'm/0', 'chat', 200, 0, 'ok', 7, 3)",
        (time.time(), month),
    )
    con.execute(
        "INSERT INTO monthly (key_id, month, model, requests, prompt_tokens, completion_tokens) VALUES"
        " ('k', ?, 'm', 1, 7, 3)",
        (month,),
    )
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    led = Ledger(UsageConfig(path=str(path), flush_ms=10_000))
    await led.open()
    try:
        assert await led.month_totals(month) == {"k": 10}
    finally:
        await led.close()
    (old,) = rows(tmp_path)
    assert (old["request_id"], old["cache"], old["upstream_tokens"], old["quota_exempt_tokens"]) == ("old", "", None, 0)
    con = sqlite3.connect(path)
    assert con.execute("SELECT cache_hits, quota_exempt_tokens FROM monthly").fetchall() == [(0, 0)]
    assert con.execute("PRAGMA user_version").fetchone() == (len(schema.MIGRATIONS),)


async def test_reload_applies_bounds_and_scope(tmp_path: Path, fake: FakeProc) -> None:
    async with run_llmd(config(tmp_path, fake)) as llmd:
        for seed in (1, 2, 3):
            assert (await post(llmd.url, chat(seed=seed)))[2] == "miss"
        cache = llmd.services.cache
        assert len(cache.store.entries) == 3
        config(tmp_path, fake, {"max_entries": 1, "scope": "shared"})
        await llmd.daemon.reload()
        assert len(cache.store.entries) == 1  # the least recently used went at once
        # Shared now: the new entries answer every key (the old ones were stored per key).
        assert (await post(llmd.url, chat(seed=4), "a1"))[2] == "miss"
        assert (await post(llmd.url, chat(seed=4), "b1"))[2] == "hit"


async def test_an_unusable_cache_file_leaves_the_cache_in_memory(tmp_path: Path, fake: FakeProc) -> None:
    cfg = config(tmp_path, fake, {"store": "sqlite", "path": str(tmp_path / "missing" / "dir" / "cache.sqlite3")})
    async with run_llmd(cfg) as llmd:
        assert not llmd.services.cache.persistent
        assert (await post(llmd.url, chat(seed=1)))[2] == "miss"
        assert (await post(llmd.url, chat(seed=1)))[2] == "hit"


async def test_concurrent_identical_misses_ask_the_model_once(tmp_path: Path, fake: FakeProc) -> None:
    """Eight identical deterministic requests at once: one goes upstream, seven wait for its
    answer and get it as hits (same bytes, x-llmd-cache: hit, rows of cache hits); when the
    leader's answer cannot be stored (the upstream fails it), the waiters ask the model."""
    body = chat(temperature=0, fake={"delay_ms": 300})
    async with run_llmd(config(tmp_path, fake)) as llmd:
        n0 = await upstream_requests(fake)
        got = await asyncio.gather(*(post(llmd.url, body) for _ in range(8)))
        assert await upstream_requests(fake) == n0 + 1
        assert sorted(state for _, _, state in got) == ["hit"] * 7 + ["miss"]
        assert {status for status, _, _ in got} == {200} and len({data for _, data, _ in got}) == 1
        async with aiohttp.ClientSession() as s, s.get(llmd.url + "/metrics") as r:
            text = await r.text()
        assert metric(text, 'llmd_cache_lookups_total{model="m",result="miss"}') == 1
        assert metric(text, 'llmd_cache_lookups_total{model="m",result="hit"}') == 7
        await wait_for(lambda: len(rows(tmp_path)) >= 8)
        assert sorted(r["cache"] for r in rows(tmp_path)) == ["hit"] * 7 + ["miss"]
        assert sum(r["upstream_tokens"] == 0 for r in rows(tmp_path)) == 7
        # a failing leader: nothing stored, so every waiter goes upstream on its own
        failing = chat(temperature=0, fake={"delay_ms": 200, "status": 500})
        n1 = await upstream_requests(fake)
        got = await asyncio.gather(*(post(llmd.url, failing) for _ in range(3)))
        assert [status for status, _, _ in got] == [500] * 3
        assert await upstream_requests(fake) == n1 + 3
