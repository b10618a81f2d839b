"""API keys, tiers and limits end to end: the openai SDK against llmd against the fake."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import base_config, run_llmd, wait_for, write_config
from tests.fakeproc import FakeProc

SECRET_A = "sk-test-alpha-0123456789abcdef0123456789abcdef"
SECRET_B = "sk-test-bravo-0123456789abcdef0123456789abcdef"
SECRET_ENV = "sk-test-envkey-0123456789abcdef0123456789abcde"
SECRET_REVOKED = "sk-test-revoked-0123456789abcdef0123456789abcd"


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def keyed_config(tmp_path: Path, fake: FakeProc, tiers: dict, keys: list[dict], **sections) -> Path:
    models = {
        "m": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 64},
        "other": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 64},
    }
    doc = base_config(tmp_path, models, tiers=tiers, keys=keys, **sections)
    return write_config(tmp_path / "config.yaml", doc)


def sdk(llmd_url: str, key: str, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=llmd_url + "/v1", api_key=key, **{"max_retries": 0, **kw})


MSG = [{"role": "user", "content": "hello"}]


async def test_keys_by_hash_and_env_headers_allow_list_and_revocation(
    tmp_path: Path, fake: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMD_TEST_KEY_ENV", SECRET_ENV)
    keys = [
        {"id": "alpha", "tier": "std", "sha256": sha(SECRET_A)},
        {"id": "bravo", "tier": "std", "sha256": sha(SECRET_B), "models": ["m"]},
        {"id": "envkey", "secret_env": "LLMD_TEST_KEY_ENV"},
        {"id": "gone", "sha256": sha(SECRET_REVOKED), "revoked": True},
    ]
    async with run_llmd(keyed_config(tmp_path, fake, {"std": {}}, keys)) as llmd:
        r = await sdk(llmd.url, SECRET_A).chat.completions.create(model="other", messages=MSG)
        assert r.choices
        r = await sdk(llmd.url, SECRET_ENV).chat.completions.create(model="m", messages=MSG)
        assert r.choices
        async with aiohttp.ClientSession() as s:
            async with s.get(llmd.url + "/v1/models", headers={"X-API-Key": SECRET_B}) as resp:
                assert resp.status == 200
                assert [m["id"] for m in (await resp.json())["data"]] == ["m"]
            async with s.get(llmd.url + "/v1/models") as resp:
                assert resp.status == 401
                err = (await resp.json())["error"]
                assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as e:
            await sdk(llmd.url, "sk-wrong").models.list()
        assert e.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as e:
            await sdk(llmd.url, SECRET_REVOKED).models.list()
        assert "revoked" in str(e.value)
        with pytest.raises(openai.PermissionDeniedError) as e:
            await sdk(llmd.url, SECRET_B).chat.completions.create(model="other", messages=MSG)
        assert e.value.status_code == 403
        assert (await fake.stats())["requests"] == 2  # refused requests never reached the upstream


async def test_burst_of_100_against_30_rpm_admits_exactly_30(tmp_path: Path, fake: FakeProc) -> None:
    keys = [{"id": "alpha", "tier": "std", "sha256": sha(SECRET_A)}]
    async with run_llmd(keyed_config(tmp_path, fake, {"std": {"requests_per_minute": 30}}, keys)) as llmd:
        async with aiohttp.ClientSession() as s:

            async def one() -> int:
                async with s.post(
                    llmd.url + "/v1/chat/completions",
                    json={"model": "m", "messages": MSG},
                    headers={"Authorization": f"Bearer {SECRET_A}"},
                ) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one() for _ in range(100)))
        assert statuses.count(200) == 30 and statuses.count(429) == 70
        assert (await fake.stats())["requests"] == 30
        await llmd.services.ledger.flush()
        rows = await llmd.services.ledger.report()
        assert rows[0].requests == 100 and rows[0].errors == 70  # rejected_rate rows are recorded too


async def test_max_concurrent_never_lets_a_third_request_reach_the_upstream(tmp_path: Path, fake: FakeProc) -> None:
    """1. max_concurrent 2: two slow requests are in flight (seen in the limiter, not guessed
    from a clock). 2. Eight more get 429 and never reach the upstream. 3. The two finish."""
    keys = [{"id": "alpha", "tier": "std", "sha256": sha(SECRET_A)}]
    async with run_llmd(keyed_config(tmp_path, fake, {"std": {"max_concurrent": 2}}, keys)) as llmd:
        c = sdk(llmd.url, SECRET_A)

        async def one(delay_ms: float) -> str:
            try:
                await c.chat.completions.create(model="m", messages=MSG, extra_body={"fake": {"delay_ms": delay_ms}})
                return "ok"
            except openai.RateLimitError:
                return "429"

        slow = [asyncio.create_task(one(3000)) for _ in range(2)]
        await wait_for(lambda: llmd.services.runtime.limiter.state("alpha").in_flight == 2)
        results = await asyncio.gather(*(one(0) for _ in range(8)))
        assert results == ["429"] * 8
        assert await asyncio.gather(*slow) == ["ok", "ok"]
        stats = await fake.stats()
        assert stats["peak_in_flight"] == 2 and stats["requests"] == 2
        # Streams count too, and the slot is released when a stream is abandoned.
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(
                    llmd.url + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {SECRET_A}"},
                    json={
                        "model": "m",
                        "messages": MSG,
                        "stream": True,
                        "max_tokens": 50,
                        "fake": {"token_delay_ms": 100},
                    },
                ) as r:
                    assert r.status == 200
                    await r.content.readline()
        for _ in range(100):
            if llmd.services.runtime.limiter.state("alpha").in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert llmd.services.runtime.limiter.state("alpha").in_flight == 0


async def test_429_raises_rate_limit_error_and_the_sdk_waits_retry_after(tmp_path: Path, fake: FakeProc) -> None:
    """1. max_concurrent 1; a slow request holds the slot for 1.5 s. 2. A second request gets
    429 with Retry-After: 1; the SDK (max_retries=3) waits and retries until it succeeds."""
    keys = [{"id": "alpha", "tier": "std", "sha256": sha(SECRET_A)}]
    async with run_llmd(keyed_config(tmp_path, fake, {"std": {"max_concurrent": 1}}, keys)) as llmd:
        slow = asyncio.create_task(
            sdk(llmd.url, SECRET_A).chat.completions.create(
                model="m", messages=MSG, extra_body={"fake": {"delay_ms": 1500}}
            )
        )
        await wait_for(lambda: llmd.services.runtime.limiter.state("alpha").in_flight == 1)
        with pytest.raises(openai.RateLimitError) as e:
            await sdk(llmd.url, SECRET_A).chat.completions.create(model="m", messages=MSG)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.code == "rate_limit_exceeded" and "max_concurrent=1" in e.value.message
        t0 = time.monotonic()
        r = await sdk(llmd.url, SECRET_A, max_retries=3).chat.completions.create(model="m", messages=MSG)
        assert r.choices and time.monotonic() - t0 >= 0.9
        await slow


async def test_tokens_per_minute_reserves_then_settles_to_real_usage(tmp_path: Path, upstream: FakeProc) -> None:
    """1. A whole answer and a stream (with and without include_usage) of "short answer" (2
    tokens) for a 1-word prompt (5 tokens) with max_tokens 300: each reserves 300+ tokens, then
    settles to exactly 7, whatever the upstream and its framing. 2. While 3 requests of
    max_tokens 250 run, a 4th cannot reserve: concurrency cannot overshoot the window."""
    fake = upstream
    keys = [{"id": "alpha", "tier": "std", "sha256": sha(SECRET_A)}]
    tiers = {"std": {"tokens_per_minute": 1000, "requests_per_minute": 100}}
    async with run_llmd(keyed_config(tmp_path, fake, tiers, keys)) as llmd:
        c = sdk(llmd.url, SECRET_A)
        state = llmd.services.runtime.limiter.state("alpha")
        for n, options in enumerate(({"include_usage": True}, None), 1):
            stream = await c.chat.completions.create(
                model="m", messages=MSG, max_tokens=300, stream=True, extra_body={"fake": {"text": "short answer"}},
                **({"stream_options": options} if options else {}),  # type: ignore[arg-type]
            )
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
            assert text == "short answer"
            await wait_for(lambda: state.in_flight == 0)  # settled after the stream's end
            assert state.tokens_in_window == n * 7, f"stream {options=} settles to its upstream usage"
        raw = await c.chat.completions.with_raw_response.create(
            model="m", messages=MSG, max_tokens=300, extra_body={"fake": {"text": "short answer"}}
        )
        r = raw.parse()
        assert r.usage is not None and r.usage.total_tokens == 7
        assert state.tokens_in_window == 3 * 7  # settled, not the 300+ reserved
        h = raw.headers
        assert h["x-ratelimit-limit-requests"] == "100" and h["x-ratelimit-limit-tokens"] == "1000"
        assert int(h["x-ratelimit-remaining-requests"]) == 97
        # While 3 requests of max_tokens 250 are running (~260 reserved each), a 4th cannot
        # reserve: concurrency cannot overshoot the window (the window holds 21 from above).
        slow = [
            asyncio.create_task(
                c.chat.completions.create(
                    model="m", messages=MSG, max_tokens=250, extra_body={"fake": {"delay_ms": 3000}}
                )
            )
            for _ in range(3)
        ]
        await wait_for(lambda: state.in_flight == 3)
        with pytest.raises(openai.RateLimitError) as e:
            await c.chat.completions.create(model="m", messages=MSG, max_tokens=250)
        assert "tokens_per_minute=1000" in e.value.message
        await asyncio.gather(*slow)


async def test_monthly_quota_survives_a_restart(tmp_path: Path, upstream: FakeProc) -> None:
    """1. monthly_tokens 30; each request uses 5 prompt + 8 completion = 13 tokens, the first
    streamed (its tokens come from the stream's usage), two more whole. 2. After 39 tokens
    the quota is used up: 429 insufficient_quota. 3. A restarted llmd (same ledger) still
    refuses: nothing forgotten."""
    fake = upstream
    keys = [{"id": "alpha", "tier": "std", "sha256": sha(SECRET_A)}]
    path = keyed_config(tmp_path, fake, {"std": {"monthly_tokens": 30}}, keys)
    async with run_llmd(path) as llmd:
        c = sdk(llmd.url, SECRET_A)
        stream = await c.chat.completions.create(model="m", messages=MSG, max_tokens=8, stream=True)
        assert len([ch async for ch in stream if ch.choices and ch.choices[0].delta.content]) == 8
        await wait_for(lambda: llmd.services.runtime.limiter.state("alpha").in_flight == 0)
        for _ in range(2):
            r = await c.chat.completions.create(model="m", messages=MSG, max_tokens=8)
            assert r.usage is not None and r.usage.total_tokens == 13
        with pytest.raises(openai.RateLimitError) as e:
            await c.chat.completions.create(model="m", messages=MSG)
        assert e.value.code == "insufficient_quota" and e.value.type == "insufficient_quota"
        assert "monthly_tokens=30" in e.value.message and "tier 'std'" in e.value.message
    async with run_llmd(path) as llmd:
        with pytest.raises(openai.RateLimitError) as e:
            await sdk(llmd.url, SECRET_A).chat.completions.create(model="m", messages=MSG)
        assert e.value.code == "insufficient_quota"


async def test_the_secret_never_appears_in_logs_metrics_ledger_or_errors(
    tmp_path: Path, fake: FakeProc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    keys = [{"id": "alpha", "tier": "std", "sha256": sha(SECRET_A)}]
    async with run_llmd(keyed_config(tmp_path, fake, {"std": {"requests_per_minute": 2}}, keys)) as llmd:
        c = sdk(llmd.url, SECRET_A)
        errors = []
        for _ in range(3):
            try:
                await c.chat.completions.create(model="m", messages=MSG)
            except openai.APIStatusError as e:
                errors.append(str(e.body))
        try:
            await sdk(llmd.url, SECRET_A + "x").models.list()
        except openai.AuthenticationError as e:
            errors.append(str(e.body))
        async with aiohttp.ClientSession() as s, s.get(llmd.url + "/metrics") as r:
            metrics = await r.text()
        await llmd.services.ledger.flush()
        db = Path(llmd.services.runtime.cfg.usage.path)
    wal = db.with_name(db.name + "-wal")
    ledger_bytes = db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert 'key="alpha"' in metrics
    from llmd.log import JsonFormatter

    logs = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert "alpha" in logs
    for where, text in (("logs", logs), ("metrics", metrics), ("errors", "\n".join(errors))):
        assert SECRET_A not in text, where
        assert SECRET_A[3:20] not in text, where
    assert SECRET_A.encode() not in ledger_bytes
    rows = sqlite3.connect(db).execute("select key_id from requests").fetchall()
    assert {r[0] for r in rows} == {"alpha"}  # a refused key never reaches the ledger
