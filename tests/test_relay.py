"""The relay through llmd with the official openai SDK against the fake backend."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from tests.conftest import wait_for
from tests.fakeproc import FakeProc


def client(url: str, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-unused", max_retries=0, **kw)  # type: ignore[arg-type]


async def test_chat_non_stream_via_sdk(upstream: FakeProc, llmd_for) -> None:
    """A whole answer from each upstream and wire profile (gzip, spaced JSON, no timings) reaches
    the SDK intact, and the ledger row has the upstream's usage: 2 words + 4 template tokens."""
    async with llmd_for(upstream) as llmd:
        c = client(llmd.url)
        raw = await c.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hello there"}], max_tokens=5
        )
        r = raw.parse()
        assert r.choices[0].message.content == "t0 t1 t2 t3 t4"
        assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (6, 5)
        st = await upstream.stats()
        assert st["last_body"]["model"] == "m"
        headers = {k.lower(): v for k, v in st["last_headers"].items()}
        assert headers["x-request-id"] == raw.headers["x-request-id"]
        await llmd.services.ledger.flush()
        (row,) = await llmd.services.ledger.report()
        assert (row.prompt_tokens, row.completion_tokens) == (6, 5)


async def test_streamed_chat_hides_the_usage_chunk_llmd_asked_for(upstream: FakeProc, llmd_for) -> None:
    """1. A client streams without include_usage. 2. llmd asks upstream for it (to count
    tokens) 3. but the client sees no usage chunk; 4. the ledger has the exact numbers
    (3 words + 4 template tokens, 4 generated), whatever the upstream's framing."""
    fake = upstream
    async with llmd_for(fake) as llmd:
        c = client(llmd.url)
        chunks = [
            ch
            async for ch in await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "one two three"}], max_tokens=4, stream=True
            )
        ]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == "t0 t1 t2 t3"
        assert all(ch.usage is None for ch in chunks)
        assert all(ch.choices for ch in chunks)
        st = await fake.stats()
        assert st["last_body"]["stream_options"] == {"include_usage": True}
        await llmd.services.ledger.flush()
        (row,) = await llmd.services.ledger.report()
        assert (row.prompt_tokens, row.completion_tokens) == (7, 4)


async def test_streamed_chat_with_include_usage_is_relayed_as_is(upstream: FakeProc, llmd_for) -> None:
    """The client asked for usage: it gets the upstream's usage chunk, and the ledger row
    equals it."""
    async with llmd_for(upstream) as llmd:
        c = client(llmd.url)
        chunks = [
            ch
            async for ch in await c.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "one two three"}],
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (7, 3)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == "t0 t1 t2"
        await llmd.services.ledger.flush()
        (row,) = await llmd.services.ledger.report()
        assert (row.prompt_tokens, row.completion_tokens) == (7, 3)


@pytest.mark.parametrize("upstream", ["llama", "llama-openai", "llama-chaos"], indirect=True)
async def test_completions_embeddings_and_models_via_sdk(upstream: FakeProc, llmd_for) -> None:
    """Completions and embeddings in each wire profile of the fake llama-server (the fake vLLM's
    generate runner has no embeddings); usage is exact: 4 prompt words, 3 embedded words."""
    fake = upstream
    async with llmd_for(fake) as llmd:
        c = client(llmd.url)
        comp = await c.completions.create(model="gpt-4o-mini", prompt="once upon a time", max_tokens=3)
        assert comp.choices[0].text == "t0 t1 t2"
        assert comp.usage is not None and (comp.usage.prompt_tokens, comp.usage.completion_tokens) == (4, 3)
        # The alias is mapped to the upstream's name; every other field passes through.
        st = await fake.stats()
        assert st["last_body"]["model"] == "m" and st["last_body"]["max_tokens"] == 3
        emb = await c.embeddings.create(model="m", input=["a b", "c"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 640
        assert emb.usage.prompt_tokens == 3
        models = await c.models.list()
        assert sorted(m.id for m in models.data) == ["gpt-4o-mini", "m"]
        one = await c.models.retrieve("gpt-4o-mini")
        assert one.id == "gpt-4o-mini"


async def test_unknown_fields_and_tools_pass_through_untouched(fake: FakeProc, llmd_for) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    async with llmd_for(fake) as llmd:
        c = client(llmd.url)
        r = await c.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "weather in Paris?"}],
            tools=tools,  # type: ignore[arg-type]
            seed=7,
            extra_body={"fake": {"tool_call": True}, "x_custom": {"a": [1, 2]}},
        )
        assert r.choices[0].finish_reason == "tool_calls"
        call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert call.function.name == "get_weather"
        body = (await fake.stats())["last_body"]
        assert body["tools"] == tools and body["seed"] == 7 and body["x_custom"] == {"a": [1, 2]}


async def test_body_that_needs_no_change_is_forwarded_byte_for_byte(fake: FakeProc, llmd_for) -> None:
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"hi"}],"max_tokens":2, "zzz":  1.50}'
    async with llmd_for(fake) as llmd, aiohttp.ClientSession() as s:
        async with s.post(
            llmd.url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 200
        st = await fake.stats()
        assert st["last_raw"] == raw.decode()
        assert st["last_body"]["zzz"] == 1.50


async def test_first_event_arrives_before_the_upstream_has_finished(fake: FakeProc, llmd_for) -> None:
    """1. The fake streams its first token, then hangs (never finishes). 2. The client still
    gets that token's event: llmd relays events as they come, it buffers nothing. (An event,
    not a clock: a busy machine cannot make it flaky.)"""
    async with llmd_for(fake) as llmd:
        c = client(llmd.url)
        stream = await c.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=5,
            stream=True,
            extra_body={"fake": {"hang_after_tokens": 1}},
        )
        first = None
        async with asyncio.timeout(10):
            async for ch in stream:
                if ch.choices and ch.choices[0].delta.content:
                    first = ch.choices[0].delta.content
                    break
        await stream.close()
        assert first == "t0"
        assert (await fake.stats())["completion_tokens"] == 1  # the upstream had made no more


async def test_sse_headers(fake: FakeProc, llmd_for) -> None:
    async with llmd_for(fake) as llmd, aiohttp.ClientSession() as s:
        async with s.post(
            llmd.url + "/v1/chat/completions",
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        ) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["X-Accel-Buffering"] == "no"
            body = await r.read()
        assert body.rstrip().endswith(b"data: [DONE]")


async def test_error_types_raised_by_the_sdk(fake: FakeProc, llmd_for) -> None:
    async with llmd_for(fake, server={"max_body_bytes": 2000}) as llmd:
        c = client(llmd.url)
        with pytest.raises(openai.NotFoundError) as nf:
            await c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert nf.value.code == "model_not_found" and nf.value.body["param"] == "model"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as br:
            await c.chat.completions.create(model="m", messages="not a list")  # type: ignore[arg-type]
        assert br.value.body["param"] == "messages"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as bt:
            await c.chat.completions.create(model="m", messages=[], max_tokens="many")  # type: ignore[arg-type]
        assert bt.value.body["param"] == "max_tokens"  # type: ignore[index]
        with pytest.raises(openai.APIStatusError) as big:
            await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 5000}])
        assert big.value.status_code == 413
        # An upstream error is relayed with its status and body.
        with pytest.raises(openai.InternalServerError) as ue:
            await c.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "x"}],
                extra_body={"fake": {"status": 500, "message": "boom"}},
            )
        assert "boom" in str(ue.value)
        async with aiohttp.ClientSession() as s:
            async with s.post(llmd.url + "/v1/chat/completions", data=b"{nope") as r:
                assert r.status == 400
                err = (await r.json())["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_json"
                assert r.headers["x-request-id"]
            async with s.get(llmd.url + "/v2/whatever", headers={"X-Request-ID": "abc-123"}) as r:
                assert r.status == 404 and (await r.json())["error"]["type"] == "invalid_request_error"
                assert r.headers["x-request-id"] == "abc-123"


async def test_upstream_unreachable_is_502_and_timeout_is_504(fake: FakeProc, llmd_for, tmp_path) -> None:
    from tests.fakeproc import free_port

    dead = free_port()
    async with llmd_for(fake, model_extra={"urls": [f"http://127.0.0.1:{dead}/v1"]}) as llmd:
        c = client(llmd.url)
        with pytest.raises(openai.APIStatusError) as e:
            await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 502
    async with llmd_for(fake, routing={"timeouts": {"connect_s": 1, "first_byte_s": 0.5, "total_s": 5}}) as llmd:
        c = client(llmd.url)
        with pytest.raises(openai.APIStatusError) as e:
            await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], extra_body={"fake": {"hang": True}}
            )
        assert e.value.status_code == 504


async def _abort_after_first_token(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            url + "/v1/chat/completions",
            json={
                "model": "m",
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 50,
                "fake": {"token_delay_ms": 200},
            },
        ) as r:
            async for line in r.content:
                if b'"content":"t0"' in line:
                    break


async def _row(llmd) -> tuple:
    import sqlite3

    for _ in range(200):  # the handler learns of the hang-up, then settles in the background
        await llmd.services.ledger.flush()
        row = (
            sqlite3.connect(llmd.services.runtime.cfg.usage.path)
            .execute("select outcome, prompt_tokens, completion_tokens, token_method from requests")
            .fetchone()
        )
        if row is not None:
            return row
        await asyncio.sleep(0.025)
    raise AssertionError("no usage row")


async def test_client_disconnect_cancels_the_upstream_request(fake: FakeProc, llmd_for) -> None:
    """1. A streamed request, tokens 200 ms apart. 2. The client reads the first token and hangs
    up. 3. The fake sees its request cancelled (not run to the end), nothing stays in flight,
    and the usage row says client_abort with the relayed tokens (a remote url cannot tokenize:
    the prompt is estimated, and the row says so)."""
    async with llmd_for(fake) as llmd:
        await _abort_after_first_token(llmd.url)
        stats: dict = {}
        for _ in range(100):
            stats = await fake.stats()
            if stats["in_flight"] == 0:
                break
            await asyncio.sleep(0.05)
        assert stats["in_flight"] == 0 and stats["cancelled"] == 1 and stats["completion_tokens"] < 50
        await wait_for(lambda: llmd.services.pools["m"].admission.depth == 0)
        assert all(r.in_flight == 0 for r in llmd.services.supervisor.replicas("m"))
        outcome, _, completion, method = await _row(llmd)
        assert outcome == "client_abort" and 1 <= completion <= 3 and method == "stream_chunks+estimate"


async def test_aborted_stream_prompt_is_tokenized_by_its_replica(tmp_path) -> None:
    """A supervised llama-server replica is asked to tokenize the abandoned prompt
    (/apply-template + /tokenize): <|im_start|> user x <|im_end|> newline = 5 tokens."""
    import sys

    from tests.conftest import base_config, run_llmd, write_config
    from tests.fakeproc import FAKE_LLAMA

    doc = base_config(
        tmp_path,
        {"m": {"backend": "llama-server", "model": "fake.gguf", "args": ["-np", "2"]}},
        launchers={"llama-server": {"command": [sys.executable, str(FAKE_LLAMA)]}},
    )
    async with run_llmd(write_config(tmp_path / "c.yaml", doc)) as llmd:
        await wait_for(lambda: llmd.services.readiness()[0])
        await _abort_after_first_token(llmd.url)
        outcome, prompt, completion, method = await _row(llmd)
    assert (outcome, prompt, method) == ("client_abort", 5, "stream_chunks+tokenize")
    assert 1 <= completion <= 3


async def test_request_id_is_returned_and_forwarded(fake: FakeProc, llmd_for) -> None:
    async with llmd_for(fake) as llmd, aiohttp.ClientSession() as s:
        async with s.post(
            llmd.url + "/v1/chat/completions",
            headers={"X-Request-ID": "req-42"},
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        ) as r:
            assert r.headers["X-Request-ID"] == "req-42"
        hdrs = {k.lower(): v for k, v in (await fake.stats())["last_headers"].items()}
        assert hdrs["x-request-id"] == "req-42"
        async with s.get(llmd.url + "/v1/models") as r:
            assert len(r.headers["X-Request-ID"]) == 32


async def test_cors_allow_list(fake: FakeProc, llmd_for) -> None:
    async with llmd_for(fake, server={"cors_origins": ["https://ide.example"]}) as llmd, aiohttp.ClientSession() as s:
        pre = {"Origin": "https://ide.example", "Access-Control-Request-Method": "POST"}
        async with s.options(llmd.url + "/v1/chat/completions", headers=pre) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://ide.example"
        async with s.options(llmd.url + "/v1/chat/completions", headers={**pre, "Origin": "https://evil.example"}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        async with s.get(llmd.url + "/v1/models", headers={"Origin": "https://evil.example"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_access_log_is_one_json_line_without_bodies(fake: FakeProc, llmd_for, caplog) -> None:
    caplog.set_level("INFO", logger="llmd.access")
    async with llmd_for(fake) as llmd:
        c = client(llmd.url)
        await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "secret words"}])
    recs = [r for r in caplog.records if r.name == "llmd.access"]
    assert len(recs) == 1
    from llmd.log import JsonFormatter

    line = json.loads(JsonFormatter().format(recs[0]))
    for k in ("time", "request_id", "method", "path", "model", "status", "duration_ms", "bytes"):
        assert k in line, k
    assert "secret words" not in json.dumps(line)


async def test_llmd_status_prints_the_replica_table(fake: FakeProc, llmd_for) -> None:
    import sys

    async with llmd_for(fake) as llmd:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "llmd",
            "status",
            "--url",
            llmd.url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert lines[0].split()[:3] == ["REPLICA", "STATE", "PID"]
    assert lines[1].split()[:2] == ["m/0", "ready"]


async def test_readyz_and_admin_routes_need_admin_key(fake: FakeProc, tmp_path) -> None:
    import hashlib

    from tests.conftest import base_config, run_llmd, write_config

    keys = [
        {"id": "ops", "sha256": hashlib.sha256(b"sk-ops").hexdigest(), "admin": True},
        {"id": "dev", "sha256": hashlib.sha256(b"sk-dev").hexdigest()},
    ]
    doc = base_config(tmp_path, {"m": {"backend": "openai", "urls": [fake.url + "/v1"]}}, keys=keys)
    async with run_llmd(write_config(tmp_path / "c.yaml", doc)) as llmd, aiohttp.ClientSession() as s:
        async with s.get(llmd.url + "/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["models"]["m"]["replicas"][0]["state"] == "ready"
        async with s.get(llmd.url + "/admin/status", headers={"Authorization": "Bearer sk-dev"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "admin_required"
        async with s.get(llmd.url + "/admin/status", headers={"Authorization": "Bearer sk-ops"}) as r:
            assert r.status == 200 and (await r.json())["replicas"][0]["replica"] == "m/0"
        for bad in ("2026-13x", "2026-13"):
            async with s.get(llmd.url + f"/admin/usage?month={bad}", headers={"Authorization": "Bearer sk-ops"}) as r:
                assert r.status == 400, bad
        async with s.get(llmd.url + "/admin/usage?month=2026-11", headers={"Authorization": "Bearer sk-ops"}) as r:
            assert r.status == 200 and (await r.json())["month"] == "2026-11"
        async with s.get(llmd.url + "/health") as r:
            assert r.status == 200
