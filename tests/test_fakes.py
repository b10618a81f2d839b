"""The test doubles behave like the real servers they stand in for.

Expected shapes are the key sets of the bodies captured from llama-server and vLLM 0.32
(reference/observed/ in the shared workspace), inlined so that this suite is self-contained.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import time
from typing import Any

import aiohttp
import pytest

from tests.fakeproc import FAKE_LLAMA, FAKE_VLLM, FakeProc, free_port, start_fake

FAST = ("--load-delay-s", "0")

# llama-server chat_nonstream.body / chat_stream*.body / completions*.body
LLAMA_CHAT_KEYS = {"choices", "created", "model", "system_fingerprint", "object", "usage", "id", "timings"}
LLAMA_CHUNK_KEYS = {"choices", "created", "id", "model", "system_fingerprint", "object"}
LLAMA_COMPLETION_KEYS = {"choices", "created", "model", "system_fingerprint", "object", "usage", "id", "timings"}
LLAMA_USAGE_KEYS = {"completion_tokens", "prompt_tokens", "total_tokens", "prompt_tokens_details"}
LLAMA_TIMINGS_KEYS = {"cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
                      "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}
# vllm-0.32-cpu/generation.http.txt
VLLM_CHAT_KEYS = {"id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
                  "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
                  "ec_transfer_params", "metrics"}
VLLM_MESSAGE_KEYS = {"role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"}


async def post(fake: FakeProc, path: str, body: Any, *, timeout_s: float = 5.0) -> tuple[int, Any]:
    return await fake.request("POST", path, json_body=body, timeout_s=timeout_s)


async def stream(fake: FakeProc, path: str, body: dict[str, Any]) -> tuple[aiohttp.ClientResponse, list[Any]]:
    """All SSE data payloads of a streamed answer; '[DONE]' stays a string."""
    async with aiohttp.ClientSession() as session, session.post(fake.url + path, json=body) as resp:
        raw = (await resp.read()).decode()
    events: list[Any] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return resp, events


def chat(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


async def stats_when(fake: FakeProc, pred: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    """/fake/stats once ``pred(stats)`` holds: the fake learns of a hang-up or a reset when its
    loop gets to it, which a busy machine delays; a fixed sleep would guess."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await fake.stats()
        if pred(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


async def metric(fake: FakeProc, name: str) -> float:
    _, text = await fake.request("GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# ---------------------------------------------------------------- llama-server


async def test_llama_health_sequence_while_loading() -> None:
    """1. The port answers at once with 503 "Loading model" on every route.
    2. After --load-delay-s, /health is 200 {"status":"ok"}; the log says where it listens."""
    fake = await start_fake(FAKE_LLAMA, "--load-delay-s", "0.6", wait_healthy=False)
    async with fake:
        deadline = time.monotonic() + 5
        while True:
            try:
                status, body = await fake.request("GET", "/health")
                break
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        assert status == 503
        assert body == {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
        assert (await fake.request("GET", "/v1/models"))[0] == 503
        await fake.wait_healthy()
        assert await fake.request("GET", "/health") == (200, {"status": "ok"})
        await fake.wait_for_output(f"server is listening on http://127.0.0.1:{fake.port}")


async def test_llama_chat_nonstream_shape_and_tokens() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        status, body = await post(fake, "/v1/chat/completions", chat("hello there", max_tokens=3))
    assert status == 200
    assert set(body) == LLAMA_CHAT_KEYS
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice == {"finish_reason": "length", "index": 0,
                      "message": {"role": "assistant", "content": "t0 t1 t2"}}
    # one user message of two words: 2 + 4 template tokens
    assert body["usage"] == {"completion_tokens": 3, "prompt_tokens": 6, "total_tokens": 9,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert set(body["timings"]) == LLAMA_TIMINGS_KEYS


async def test_llama_chat_stream_without_usage_puts_timings_on_finish_chunk() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        resp, events = await stream(fake, "/v1/chat/completions", chat(max_tokens=3, stream=True))
    assert resp.content_type == "text/event-stream"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(set(c) - {"timings"} == LLAMA_CHUNK_KEYS for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == ["t0", " t1", " t2"]
    finish = chunks[4]
    assert finish["choices"] == [{"finish_reason": "length", "index": 0, "delta": {}}]
    assert "usage" not in finish and set(finish["timings"]) == LLAMA_TIMINGS_KEYS
    assert len(chunks) == 5


async def test_llama_chat_stream_include_usage_adds_usage_chunk() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        _, events = await stream(fake, "/v1/chat/completions",
                                 chat(max_tokens=2, stream=True, stream_options={"include_usage": True}))
    finish, usage, done = events[-3:]
    assert done == "[DONE]"
    assert "timings" not in finish and "usage" not in finish
    assert usage["choices"] == [] and set(usage) == LLAMA_CHUNK_KEYS | {"usage", "timings"}
    assert usage["usage"]["completion_tokens"] == 2 and set(usage["usage"]) == LLAMA_USAGE_KEYS


async def test_llama_completions_and_stream_always_end_with_usage() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        status, body = await post(fake, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 2})
        _, events = await stream(fake, "/v1/completions", {"prompt": "The capital", "max_tokens": 2, "stream": True})
        status_native, native = await post(fake, "/completion", {"prompt": "x y", "n_predict": 2})
    assert status == 200 and set(body) == LLAMA_COMPLETION_KEYS
    assert body["choices"] == [{"text": "t0 t1", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"]["prompt_tokens"] == 5
    assert [e["choices"][0]["text"] for e in events[:2]] == ["t0", " t1"]
    last = events[2]
    assert last["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}
    assert last["usage"]["completion_tokens"] == 2 and "timings" in last
    assert events[3] == "[DONE]"
    assert status_native == 200 and native["content"] == "t0 t1" and native["tokens_predicted"] == 2


async def test_llama_prompt_cache_reports_shared_prefix() -> None:
    """1. Turn 1 sends a conversation. 2. Turn 2 extends it: all of turn 1's prompt is cached.
    3. An unrelated prompt shares only the template's leading <|im_start|> token."""
    turn1 = [{"role": "user", "content": "tell me a story"}]
    turn2 = [*turn1, {"role": "assistant", "content": "t0 t1"}, {"role": "user", "content": "more"}]
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        _, first = await post(fake, "/v1/chat/completions", {"messages": turn1})
        _, second = await post(fake, "/v1/chat/completions", {"messages": turn2})
        _, other = await post(fake, "/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]})
        stats = await fake.stats()
    assert first["usage"]["prompt_tokens"] == 8
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}
    assert second["timings"]["cache_n"] == 8
    assert other["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}
    assert stats["cached_tokens"] == 9 and stats["requests"] == 3


async def test_llama_concurrency_stats_and_deferred_slots() -> None:
    """1. Three slow streams on two slots: two process, one is deferred.
    2. /fake/stats sees all three in flight; afterwards none, and the peak stays 3."""
    async with await start_fake(FAKE_LLAMA, *FAST, "-np", "2", "--metrics") as fake:
        # 2 s in a slot before the first byte: the state below holds from the moment all three
        # have arrived (polled, not slept on) until the first two are done.
        body = chat(max_tokens=4, stream=True, fake={"delay_ms": 2000})
        tasks = [asyncio.create_task(stream(fake, "/v1/chat/completions", body)) for _ in range(3)]
        stats = await stats_when(fake, lambda st: st["in_flight"] == 3 and st["deferred"] == 1)
        assert stats["in_flight"] == 3 and stats["processing"] == 2 and stats["deferred"] == 1
        assert await metric(fake, "llamacpp:requests_processing") == 2
        assert await metric(fake, "llamacpp:requests_deferred") == 1
        _, slots = await fake.request("GET", "/slots")
        assert [s["is_processing"] for s in slots] == [True, True]
        results = await asyncio.gather(*tasks)
        stats = await fake.stats()
    assert all(events[-1] == "[DONE]" for _, events in results)
    assert stats["in_flight"] == 0 and stats["peak_in_flight"] == 3 and stats["completed"] == 3


async def test_llama_hang_counts_cancelled_client() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        with pytest.raises(TimeoutError):
            await post(fake, "/v1/chat/completions", chat(fake={"hang": True}), timeout_s=0.3)
        stats = await stats_when(fake, lambda st: st["cancelled"] == 1 and st["in_flight"] == 0)
    assert stats["cancelled"] == 1 and stats["in_flight"] == 0


async def test_llama_hang_after_tokens_holds_stream_open() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        body = chat(max_tokens=5, stream=True, fake={"hang_after_tokens": 2})
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.post(fake.url + "/v1/chat/completions", json=body) as resp:
            seen = b""
            while seen.count(b"data: ") < 3:  # role chunk + two tokens
                seen += await resp.content.readany()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(resp.content.readany(), 0.3)
        assert (await stats_when(fake, lambda st: st["cancelled"] == 1))["cancelled"] == 1


async def test_llama_drop_after_tokens_resets_connection() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        body = chat(max_tokens=5, stream=True, fake={"drop_after_tokens": 1})
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with aiohttp.ClientSession() as session, \
                    session.post(fake.url + "/v1/chat/completions", json=body) as resp:
                async for data in resp.content.iter_any():
                    received += data
        assert b'"content":"t0"' in received and b"t1" not in received
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(fake, "/v1/chat/completions", chat(fake={"drop": True}))
        stats = await stats_when(fake, lambda st: st["dropped"] == 2 and st["in_flight"] == 0)
    assert stats["dropped"] == 2 and stats["in_flight"] == 0


async def test_llama_error_controls() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        status, body = await post(fake, "/v1/chat/completions",
                                  chat(fake={"status": 503, "message": "busy", "headers": {"Retry-After": "2"}}))
        assert (status, body) == (503, {"error": {"code": 503, "message": "busy", "type": "unavailable_error"}})
        _, events = await stream(fake, "/v1/chat/completions",
                                 chat(stream=True, fake={"error_after_tokens": 1, "message": "boom"}))
        assert events[-1] == {"error": {"code": 500, "message": "boom", "type": "server_error"}}
        status, body = await post(fake, "/v1/chat/completions", chat(fake={"typo": 1}))
        assert status == 400 and "typo" in body["error"]["message"]


async def test_llama_tool_call_stream_and_nonstream() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        _, body = await post(fake, "/v1/chat/completions", chat(tools=tools, fake={"tool_call": True}))
        _, events = await stream(fake, "/v1/chat/completions", chat(tools=tools, stream=True,
                                                                      fake={"tool_call": True}))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "t0"}
    deltas = [e["choices"][0]["delta"] for e in events[1:-2]]
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather"}
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert json.loads(arguments) == {"city": "t0"}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_llama_json_schema_answer_parses() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        _, body = await post(fake, "/v1/chat/completions", chat(response_format=fmt))
    assert json.loads(body["choices"][0]["message"]["content"]) == {"city": "t0"}
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_llama_info_routes_and_errors() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST, "-m", "/m/g.gguf", "-np", "3", "-c", "3000",
                                "-ngl", "99", "-fa", "on", "-ctk", "q8_0", "--no-mmap") as fake:
        _, props = await fake.request("GET", "/props")
        _, models = await fake.request("GET", "/v1/models")
        _, tokens = await post(fake, "/tokenize", {"content": "a b a"})
        status_404, body_404 = await fake.request("GET", "/nope")
        async with aiohttp.ClientSession() as session, \
                session.post(fake.url + "/v1/chat/completions", data=b'{"messages": [') as resp:
            status_bad, body_bad = resp.status, await resp.json()
        status_missing, missing = await post(fake, "/v1/chat/completions", {"model": "m"})
        status_emb, emb = await post(fake, "/v1/embeddings", {"input": "x"})
        status_metrics, _ = await fake.request("GET", "/metrics")
        status_ctx, ctx = await post(fake, "/v1/chat/completions", chat(" ".join(["w"] * 1000)))
    assert props["total_slots"] == 3 and props["default_generation_settings"]["n_ctx"] == 1000
    assert props["model_path"] == "/m/g.gguf"
    assert models["data"][0]["id"] == "/m/g.gguf" and models["data"][0]["meta"]["n_ctx"] == 1000
    assert len(tokens["tokens"]) == 3 and tokens["tokens"][0] == tokens["tokens"][2]
    assert (status_404, body_404) == (404, {"error": {"message": "File Not Found", "type": "not_found_error",
                                                      "code": 404}})
    assert (status_bad, body_bad["error"]["type"]) == (500, "server_error")
    assert body_bad["error"]["message"].startswith("[json.exception.parse_error.101]")
    assert status_missing == 400 and missing["error"]["message"] == "'messages' is required"
    assert (status_emb, emb["error"]["type"]) == (501, "not_supported_error")
    assert status_metrics == 501  # no --metrics
    assert status_ctx == 400 and ctx["error"]["type"] == "exceed_context_size_error"
    assert ctx["error"]["n_ctx"] == 1000 and ctx["error"]["n_prompt_tokens"] == 1004


async def test_llama_embeddings_are_deterministic_unit_vectors() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST, "--embeddings", "--pooling", "mean") as fake:
        _, a = await post(fake, "/v1/embeddings", {"model": "e", "input": ["hello world", "other"]})
        _, b = await post(fake, "/v1/embeddings", {"model": "e", "input": "hello world"})
    assert set(a) == {"model", "object", "usage", "data"} and a["model"] == "e"
    assert a["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    vector = a["data"][0]["embedding"]
    assert len(vector) == 640 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-6)
    assert b["data"][0]["embedding"] == vector and a["data"][1]["embedding"] != vector


async def test_llama_stats_echo_argv_env_headers() -> None:
    async with await start_fake(FAKE_LLAMA, *FAST, env={"CUDA_VISIBLE_DEVICES": "1"}) as fake:
        async with aiohttp.ClientSession() as session, session.post(
                fake.url + "/v1/chat/completions", json=chat(max_tokens=1), headers={"X-Trace": "abc"}) as resp:
            await resp.read()
        stats = await fake.stats()
        await fake.reset()
        after = await fake.stats()
    assert stats["env"]["CUDA_VISIBLE_DEVICES"] == "1" and stats["pid"] == fake.pid
    assert "--load-delay-s" in stats["argv"] and stats["last_headers"]["X-Trace"] == "abc"
    assert stats["last_body"]["max_tokens"] == 1 and len(stats["bodies"]) == 1
    assert after["requests"] == 0 and after["bodies"] == []


async def test_llama_sigterm_exits_zero_and_exit_control_crashes() -> None:
    fake = await start_fake(FAKE_LLAMA, *FAST)
    fake.signal(signal.SIGTERM)
    assert await fake.wait_exit(3) == 0
    fake = await start_fake(FAKE_LLAMA, *FAST)
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(fake, "/v1/chat/completions", chat(fake={"exit": True}))
    assert await fake.wait_exit(3) == 1


async def test_llama_exit_after_and_ignored_sigterm() -> None:
    crashing = await start_fake(FAKE_LLAMA, *FAST, "--exit-after-s", "0.3")
    stubborn = await start_fake(FAKE_LLAMA, *FAST, env={"FAKE_IGNORE_SIGTERM": "1"})
    assert await crashing.wait_exit(3) == 1
    stubborn.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert stubborn.proc.returncode is None
    assert await stubborn.stop(timeout_s=0.2) == -signal.SIGKILL


async def test_llama_fail_health() -> None:
    fake = await start_fake(FAKE_LLAMA, *FAST, "--fail-health", wait_healthy=False)
    async with fake:
        await fake.wait_for_output("server is listening")
        status, _ = await fake.request("GET", "/health")
        chat_status, _ = await post(fake, "/v1/chat/completions", chat(max_tokens=1))
    assert status == 503 and chat_status == 200


# ---------------------------------------------------------------- vLLM


async def test_vllm_refuses_connections_while_loading_then_empty_health() -> None:
    port = free_port()
    fake = await start_fake(FAKE_VLLM, "gemma", "--load-delay-s", "0.5", port=port, wait_healthy=False)
    async with fake:
        await fake.wait_for_output("vLLM API server version")
        with pytest.raises(aiohttp.ClientConnectionError):
            await fake.request("GET", "/health")
        await fake.wait_healthy()
        async with aiohttp.ClientSession() as session, session.get(fake.url + "/health") as resp:
            assert resp.status == 200 and await resp.read() == b""


async def test_vllm_chat_shapes_and_usage_chunk() -> None:
    async with await start_fake(FAKE_VLLM, "/models/g", "--served-model-name", "gemma3-270m", *FAST,
                                "--max-model-len", "1024") as fake:
        _, models = await fake.request("GET", "/v1/models")
        _, body = await post(fake, "/v1/chat/completions", chat(model="gemma3-270m", max_tokens=3))
        resp, events = await stream(fake, "/v1/chat/completions",
                                    chat(model="gemma3-270m", max_tokens=2, stream=True,
                                         stream_options={"include_usage": True}))
        _, plain = await stream(fake, "/v1/chat/completions", chat(model="gemma3-270m", max_tokens=2, stream=True))
        _, completion = await post(fake, "/v1/completions", {"model": "gemma3-270m", "prompt": "a b", "max_tokens": 2})
    card = models["data"][0]
    assert card["id"] == "gemma3-270m" and card["root"] == "/models/g" and card["max_model_len"] == 1024
    assert set(body) == VLLM_CHAT_KEYS and body["id"].startswith("chatcmpl-")
    assert set(body["choices"][0]["message"]) == VLLM_MESSAGE_KEYS
    assert body["choices"][0]["message"]["content"] == "t0 t1 t2"
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 9, "completion_tokens": 3,
                             "prompt_tokens_details": None, "completion_tokens_details": None}
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    role, t0, t1, usage, done = events
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert t0["choices"][0]["finish_reason"] is None and t1["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 6, "total_tokens": 8,
                                                         "completion_tokens": 2}
    assert done == "[DONE]"
    assert len(plain) == 4 and all("usage" not in e for e in plain[:-1])
    assert completion["choices"][0]["text"] == "t0 t1" and completion["id"].startswith("cmpl-")


async def test_vllm_errors_match_capture() -> None:
    async with await start_fake(FAKE_VLLM, "g", "--served-model-name", "gemma3-270m", *FAST,
                                "--max-model-len", "1024", "--enforce-eager") as fake:
        missing = await post(fake, "/v1/chat/completions", {"model": "gemma3-270m"})
        unknown = await post(fake, "/v1/chat/completions", chat(model="nope"))
        too_many = await post(fake, "/v1/chat/completions", chat(model="gemma3-270m", max_tokens=100000))
        options = await post(fake, "/v1/chat/completions", chat(model="gemma3-270m",
                                                                  stream_options={"include_usage": True}))
        no_route = await post(fake, "/v1/embeddings", {"model": "gemma3-270m", "input": "x"})
        async with aiohttp.ClientSession() as session, \
                session.post(fake.url + "/v1/chat/completions", data=b"{,") as resp:
            bad_json = resp.status, await resp.json()
    assert missing == (400, {"error": {
        "message": "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', "
                   "'input': '<dict of 1 items>'}", "type": "Bad Request", "param": "body.messages", "code": 400}})
    assert unknown == (404, {"error": {"message": "The model `nope` does not exist. Valid aliases: gemma3-270m.",
                                       "type": "NotFoundError", "param": "model", "code": 404}})
    assert too_many[0] == 400 and too_many[1]["error"]["param"] == "max_tokens"
    assert options[0] == 400
    assert no_route == (404, {"detail": "Not Found"})
    assert bad_json[0] == 400 and bad_json[1]["error"]["param"] == "body.1"


async def test_vllm_metrics_follow_live_requests() -> None:
    """1. Two slow requests on max-num-seqs 1: one runs, one waits, KV cache is in use.
    2. When both are done the gauges return to zero and the success counter saw both."""
    async with await start_fake(FAKE_VLLM, "m", *FAST, "--max-num-seqs", "1") as fake:
        # 3 tokens 500 ms apart: the state below holds from the moment both have arrived
        # (polled, not slept on) until the first is done, 1.5 s after it started.
        body = chat(model="m", max_tokens=3, fake={"token_delay_ms": 500})
        tasks = [asyncio.create_task(post(fake, "/v1/chat/completions", body, timeout_s=10)) for _ in range(2)]
        await stats_when(fake, lambda st: st["in_flight"] == 2)
        labels = '{engine="0",model_name="m"}'
        assert await metric(fake, "vllm:num_requests_running" + labels) == 1
        assert await metric(fake, "vllm:num_requests_waiting" + labels) == 1
        assert await metric(fake, "vllm:kv_cache_usage_perc" + labels) > 0
        assert (await fake.request("GET", "/load"))[1] == {"server_load": 2}
        await asyncio.gather(*tasks)
        assert await metric(fake, "vllm:num_requests_running" + labels) == 0
        assert await metric(fake, "vllm:kv_cache_usage_perc" + labels) == 0
        success = 'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"}'
        assert await metric(fake, success) == 2
        assert (await fake.stats())["peak_in_flight"] == 2


async def test_vllm_pooling_runner_serves_embeddings_only() -> None:
    async with await start_fake(FAKE_VLLM, "minilm", "--runner", "pooling", *FAST,
                                env={"CUDA_VISIBLE_DEVICES": "0,1"}) as fake:
        status, body = await post(fake, "/v1/embeddings", {"model": "minilm", "input": ["a b", "c"]})
        b64_status, b64 = await post(fake, "/v1/embeddings", {"model": "minilm", "input": "a b",
                                                              "encoding_format": "base64"})
        chat_status, _ = await post(fake, "/v1/chat/completions", chat(model="minilm"))
        missing_status, missing = await post(fake, "/v1/embeddings", {"model": "minilm"})
        stats = await fake.stats()
    assert status == 200 and body["id"].startswith("embd-") and len(body["data"][0]["embedding"]) == 384
    assert body["usage"]["prompt_tokens"] == 3
    assert b64_status == 200 and isinstance(b64["data"][0]["embedding"], str)
    assert chat_status == 404
    assert missing_status == 400 and missing["error"]["message"].startswith("7 validation errors:")
    assert stats["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"


async def test_vllm_tool_calls_need_auto_tool_choice_flags() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    async with await start_fake(FAKE_VLLM, "m", *FAST) as plain:
        status, _ = await post(plain, "/v1/chat/completions", chat(model="m", tools=tools))
    assert status == 400
    async with await start_fake(FAKE_VLLM, "m", *FAST, "--enable-auto-tool-choice",
                                "--tool-call-parser", "hermes") as fake:
        _, body = await post(fake, "/v1/chat/completions", chat(model="m", tools=tools, fake={"tool_call": True}))
    message = body["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert message["tool_calls"][0]["id"].startswith("chatcmpl-tool-")



async def test_vllm_prompt_tokens_details_count_whole_blocks() -> None:
    """With --enable-prompt-tokens-details a repeated 9-token prompt reuses 8 tokens (the
    last is always recomputed); --block-size 4 rounds that to two whole blocks."""
    prompt = {"model": "m", "prompt": "a b c d e f g h i", "max_tokens": 1}
    async with await start_fake(FAKE_VLLM, "m", *FAST, "--enable-prompt-tokens-details", "--block-size", "4") as fake:
        _, first = await post(fake, "/v1/completions", prompt)
        _, again = await post(fake, "/v1/completions", prompt)
        _, streamed = await stream(fake, "/v1/completions", {**prompt, "stream": True,
                                                             "stream_options": {"include_usage": True}})
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}
    assert streamed[-2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}


@pytest.mark.parametrize(("script", "needle"), [(FAKE_LLAMA, "couldn't bind"), (FAKE_VLLM, "address already in use")])
async def test_a_taken_port_fails_at_once_with_the_real_message(script: Any, needle: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fake = await start_fake(script, "m", port=taken.getsockname()[1], wait_healthy=False)
        assert await fake.wait_exit(5) == 1
        await fake.stop()
    assert any(needle in line for line in fake.output)


@pytest.mark.parametrize("script", [FAKE_LLAMA, FAKE_VLLM])
async def test_sigterm_while_loading_exits_at_once(script: Any) -> None:
    fake = await start_fake(script, "m", "--load-delay-s", "30", wait_healthy=False)
    await fake.wait_for_output("vLLM API server version" if script == FAKE_VLLM else "loading model")
    # exit status 0 within stop()'s 3 s SIGTERM grace (SIGKILL after it would give -9): "at
    # once" with a bound a busy machine cannot break
    assert await fake.stop(timeout_s=3) == 0


# ---------------------------------------------------------------- wire profiles


async def read_pieces(url: str, body: dict[str, Any], **headers: str) -> tuple[aiohttp.ClientResponse, list[bytes]]:
    """The answer's body as the reads that delivered it, undecoded (gzip stays gzip)."""
    async with aiohttp.ClientSession(auto_decompress=False) as session, \
            session.post(url, json=body, headers=headers) as resp:
        return resp, [piece async for piece in resp.content.iter_any()]


async def test_wire_chaos_frames_every_way_a_parser_can_trip_on() -> None:
    """1. --fake-wire chaos. 2. A chat stream with include_usage comes as "data:" without a
    space, CRLF line ends, spaced JSON, OpenAI's role chunk (refusal null), usage null on every
    chunk, no timings; some read ends between "\\r" and "\\n". 3. Parsed by the SSE rules, it
    is the same answer as the native one."""
    from tests.sse import parse

    async with await start_fake(FAKE_LLAMA, *FAST, "--fake-wire", "chaos") as fake:
        body = chat(max_tokens=4, stream=True, stream_options={"include_usage": True})
        resp, pieces = await read_pieces(fake.url + "/v1/chat/completions", body)
        raw = b"".join(pieces)
        assert resp.status == 200
        assert raw.startswith(b"data:{") and b"data: " not in raw
        assert raw.count(b"\r\n\r\n") == raw.count(b"data:") and b"\n\n" not in raw.replace(b"\r\n", b"")
        assert b'", "' in raw and b'": ' in raw and b"timings" not in raw
        assert any(p.endswith(b"\r") for p in pieces), pieces  # a CRLF cut across two reads
        assert len(pieces) > raw.count(b"data:")  # events span reads
        events = parse(raw)
        assert events[-1].done
        docs = [e.json() for e in events[:-1]]
        assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
        assert "".join(d["choices"][0]["delta"].get("content") or "" for d in docs if d["choices"]) == "t0 t1 t2 t3"
        assert all("usage" in d for d in docs) and [d["usage"] for d in docs if d["usage"]] == [
            {"completion_tokens": 4, "prompt_tokens": 6, "total_tokens": 10,
             "prompt_tokens_details": {"cached_tokens": 0}}]


async def test_wire_gzip_only_when_the_request_accepts_it() -> None:
    """Non-stream answers in a gzip profile are compressed only for a request that sends
    Accept-Encoding: gzip; the native profile never compresses."""
    import gzip

    async with await start_fake(FAKE_LLAMA, *FAST, "--fake-wire", "openai", "--embeddings") as fake:
        resp, pieces = await read_pieces(fake.url + "/v1/chat/completions", chat(max_tokens=2),
                                         **{"Accept-Encoding": "gzip, deflate"})
        assert resp.headers["Content-Encoding"] == "gzip"
        doc = json.loads(gzip.decompress(b"".join(pieces)))
        assert doc["choices"][0]["message"]["content"] == "t0 t1" and "timings" not in doc
        assert doc["choices"][0]["message"]["refusal"] is None
        resp, pieces = await read_pieces(fake.url + "/v1/embeddings", {"input": "a b"},
                                         **{"Accept-Encoding": "gzip"})
        assert resp.headers["Content-Encoding"] == "gzip"
        assert json.loads(gzip.decompress(b"".join(pieces)))["usage"]["prompt_tokens"] == 2
        resp, pieces = await read_pieces(fake.url + "/v1/chat/completions", chat(max_tokens=2),
                                         **{"Accept-Encoding": "identity"})
        assert "Content-Encoding" not in resp.headers and json.loads(b"".join(pieces))["usage"]
    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        resp, pieces = await read_pieces(fake.url + "/v1/chat/completions", chat(max_tokens=2),
                                         **{"Accept-Encoding": "gzip"})
        assert "Content-Encoding" not in resp.headers and json.loads(b"".join(pieces))["timings"]


async def test_wire_per_request_control_and_no_usage_profile() -> None:
    """1. "fake": {"wire": NAME} or {knob: value} overrides the process's profile for one
    request; an unknown profile is a 400. 2. "no-usage" ignores include_usage and sends no
    timings: nothing in the stream says how many tokens there were."""
    from tests.sse import payloads

    async with await start_fake(FAKE_LLAMA, *FAST) as fake:
        _, pieces = await read_pieces(fake.url + "/v1/chat/completions",
                                      chat(max_tokens=2, stream=True, fake={"wire": {"json": "spaced"}}))
        raw = b"".join(pieces)
        assert raw.startswith(b"data: {") and b'"finish_reason": null' in raw and b"timings" in raw
        _, pieces = await read_pieces(fake.url + "/v1/completions",
                                      {"prompt": "a b", "max_tokens": 3, "stream": True,
                                       "fake": {"wire": "no-usage"}})
        docs = payloads(b"".join(pieces))
        assert "".join(d["choices"][0]["text"] for d in docs) == "t0 t1 t2"
        assert not any("usage" in d or "timings" in d for d in docs)
        status, body = await post(fake, "/v1/chat/completions", chat(fake={"wire": "nope"}))
        assert status == 400 and "nope" in body["error"]["message"]


async def test_fake_controls_flag_applies_to_every_request() -> None:
    """--fake-controls '{"drop": true}': every request is reset before its headers (a replica
    that accepts connections but fails them); a request's own controls still win."""
    async with await start_fake(FAKE_LLAMA, *FAST, "--fake-controls", '{"drop": true}') as fake:
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(fake, "/v1/chat/completions", chat())
        status, _ = await post(fake, "/v1/chat/completions", chat(fake={"drop": False}))
        assert status == 200


async def test_vllm_fake_takes_wire_profiles_too() -> None:
    from tests.sse import parse

    async with await start_fake(FAKE_VLLM, *FAST, "--fake-wire", "chaos") as fake:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
        _, pieces = await read_pieces(fake.url + "/v1/chat/completions", body)
        events = parse(b"".join(pieces))
        assert events[-1].done and b"data:{" in b"".join(pieces)
        docs = [e.json() for e in events[:-1]]
        assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
        assert [d["choices"][0]["finish_reason"] for d in docs[1:]] == [None, None, "length"]
