"""The fake llama-server on the routes llmd relays besides chat, completions and embeddings
(Anthropic /v1/messages, OpenAI /v1/responses, /infill, /completion, tokenizer and template
helpers, token counts, rerank): the same shapes as the real one's stored answers
(data/observed/llama-server/routes/, written by capture_routes.py), usage consistent with the
fake's tokenization, and the per-request controls and wire profiles honoured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.capture_routes import CAPTURES, LLAMA_VSCODE_INFILL, OUT, Capture
from tests.fakeproc import FAKE_LLAMA, FAKE_VLLM, free_port
from tests.routeshapes import Answer, answer_gaps, read_capture, stream_shape
from tests.sse import parse
from tests.test_real_llama import shape, shape_gaps

FAST = ("--load-delay-s", "0")


# The fakes as test_real_routes_shapes starts them beside the real servers
FAKE_ARGS: dict[str, tuple[str, ...]] = {
    "chat": ("--jinja", "-np", "2", "-c", "2048", "--no-fim"),  # Gemma 3 has no FIM tokens
    "fim": ("--jinja", "-np", "2", "-c", "2048"),  # a model with them
    "rerank": ("--reranking", "-np", "1", "-c", "1024"),
}


@dataclass
class Fake:
    url: str

    async def stats(self) -> dict[str, Any]:
        return json.loads((await send(self.url, "GET", "/fake/stats")).body)

    async def reset(self) -> None:
        await send(self.url, "POST", "/fake/reset")


def start_fakes(kinds: dict[str, tuple[str, ...]]) -> tuple[dict[str, Fake], list[subprocess.Popen[bytes]]]:
    """Fake llama-servers as child processes (own process groups), healthy on return."""
    procs: list[subprocess.Popen[bytes]] = []
    fakes: dict[str, Fake] = {}
    for kind, args in kinds.items():
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, str(FAKE_LLAMA), *args, *FAST, "--port", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        fakes[kind] = Fake(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 15
    for fake in fakes.values():
        while True:
            try:
                with urllib.request.urlopen(fake.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "fake_backend.py not healthy"
            time.sleep(0.05)
    return fakes, procs


def stop_fakes(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.wait(10)


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Fake]]:
    """Started once for the module (three processes per test would dominate its time)."""
    urls, procs = start_fakes(FAKE_ARGS)
    try:
        yield urls
    finally:
        stop_fakes(procs)


async def send(url: str, method: str, path: str, body: Any = None, **headers: str) -> Answer:
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, session.request(
        method, url + path, data=data, headers={"Content-Type": "application/json", **headers}
    ) as resp:
        return Answer(resp.status, resp.content_type, await resp.read())


async def post_json(fake: Fake, path: str, body: Any) -> tuple[int, Any]:
    answer = await send(fake.url, "POST", path, body)
    return answer.status, json.loads(answer.body)


@pytest.mark.parametrize("capture", CAPTURES, ids=[c.name for c in CAPTURES])
async def test_fake_answers_like_the_stored_capture(fakes: dict[str, Fake], capture: Capture) -> None:
    """Each captured request, sent to the fake started like the real one was: same status,
    content type, JSON shape (or SSE event names, order and shapes), error type/code/message."""
    real = read_capture(OUT / f"{capture.name}.http.txt")
    fake = await send(fakes[capture.server].url, capture.method, capture.path, capture.body)
    gaps = answer_gaps(real, fake, compare_message="malformed" not in capture.name)
    assert not gaps, f"{capture.name}:\n" + "\n".join(gaps)


async def test_infill_with_fim_is_completions_answer(fakes: dict[str, Fake]) -> None:
    """A FIM model's /infill answer is /completion's (the real one's shape, here filtered by
    llama.vscode's response_fields); its prompt is the extra chunks, prefix, suffix and prompt."""
    real = read_capture(OUT / "completion_response_fields.http.txt")
    fake = await send(fakes["fim"].url, "POST", "/infill", LLAMA_VSCODE_INFILL)
    assert not answer_gaps(real, fake), fake.body
    doc = json.loads(fake.body)
    assert doc["content"] == " ".join(f"t{i}" for i in range(8)) and doc["stop_type"] == "limit"
    # util.py def sub(a, b): return a - b | def add(a, b): | print(add(1, 2)) | (empty prompt)
    assert doc["timings"]["prompt_n"] + doc["timings"]["cache_n"] == (1 + 1 + 7) + (1 + 3) + (1 + 2) + 1
    whole = {k: v for k, v in LLAMA_VSCODE_INFILL.items() if k != "response_fields"}
    status, body = await post_json(fakes["fim"], "/infill", whole)
    assert status == 200 and body["tokens_evaluated"] == 17 and body["prompt"].startswith("<|file_sep|> util.py")
    status, body = await post_json(fakes["fim"], "/infill", {"input_suffix": "x"})
    assert (status, body["error"]["message"]) == (500, "[json.exception.out_of_range.403] key 'input_prefix' not found")
    status, body = await post_json(fakes["fim"], "/infill", {**whole, "input_extra": [{"filename": "a"}]})
    assert status == 400 and "text" in body["error"]["message"]


async def test_messages_usage_is_the_fakes_tokenization(fakes: dict[str, Fake]) -> None:
    """Anthropic usage: the chat prompt's words (system + messages, 4 framing tokens each);
    input_tokens leaves out the cache hit (cache_read_input_tokens) like the real one;
    count_tokens, stream and whole answer agree; max_tokens bounds output_tokens."""
    fake = fakes["chat"]
    body = {"system": "Be brief.", "messages": [{"role": "user", "content": "Say hello now"}], "max_tokens": 5}
    prompt = (2 + 4) + (3 + 4)
    status, count = await post_json(fake, "/v1/messages/count_tokens", body)
    assert (status, count) == (200, {"input_tokens": prompt})
    status, doc = await post_json(fake, "/v1/messages", body)
    assert status == 200 and doc["content"] == [{"type": "text", "text": "t0 t1 t2 t3 t4"}]
    assert doc["stop_reason"] == "max_tokens"
    usage = doc["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt and usage["output_tokens"] == 5
    stream = await send(fake.url, "POST", "/v1/messages", {**body, "stream": True})
    events = parse(stream.body)
    names = [e.event for e in events]
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * 5, "content_block_stop",
                     "message_delta", "message_stop"]
    start = events[0].json()["message"]["usage"]
    assert start["input_tokens"] + start["cache_read_input_tokens"] == prompt and start["output_tokens"] == 0
    assert start["cache_read_input_tokens"] == prompt - 1  # the same prompt again: all but its last token
    assert "".join(e.json()["delta"]["text"] for e in events if e.event == "content_block_delta") == "t0 t1 t2 t3 t4"
    assert events[-2].json()["usage"] == {"output_tokens": 5}
    # text blocks and a system given as blocks count the same words
    blocks = {"system": [{"type": "text", "text": "Be brief."}],
              "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello now"}]}]}
    assert (await post_json(fake, "/v1/messages/count_tokens", blocks))[1] == {"input_tokens": prompt}


async def test_responses_usage_and_stream(fakes: dict[str, Fake]) -> None:
    fake = fakes["chat"]
    body = {"instructions": "Be brief.", "input": "Say hello now", "max_output_tokens": 3}
    prompt = (2 + 4) + (3 + 4)
    status, count = await post_json(fake, "/v1/responses/input_tokens", body)
    assert (status, count) == (200, {"input_tokens": prompt, "object": "response.input_tokens"})
    status, doc = await post_json(fake, "/v1/responses", body)
    assert status == 200 and doc["output"][0]["content"][0]["text"] == "t0 t1 t2"
    assert doc["usage"]["input_tokens"] == prompt and doc["usage"]["output_tokens"] == 3
    assert doc["usage"]["total_tokens"] == prompt + 3
    stream = await send(fake.url, "POST", "/v1/responses", {**body, "stream": True})
    events = parse(stream.body)
    assert [e.event for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 3, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    completed = events[-1].json()
    assert completed["response"]["usage"]["output_tokens"] == 3 and "timings" in completed
    assert completed["response"]["usage"]["input_tokens_details"]["cached_tokens"] == prompt - 1
    listed = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hello now"}]}]}
    assert (await post_json(fake, "/v1/responses/input_tokens", listed))[1]["input_tokens"] == 3 + 4


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
async def test_stream_controls(fakes: dict[str, Fake], path: str) -> None:
    """error_after_tokens: Anthropic's in-band ``event: error``, the Responses stream's unnamed
    OpenAI-style error (both as llama.cpp writes them); drop_after_tokens: a reset after the
    head and that many tokens; the chaos wire profile (CRLF, "event:"/"data:" without their
    space, events cut across writes) still parses into the same events."""
    fake = fakes["chat"]
    body: dict[str, Any] = ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                            if path == "/v1/messages" else {"input": "hi", "max_output_tokens": 4})
    answer = await send(fake.url, "POST", path, {**body, "stream": True, "fake": {"error_after_tokens": 2}})
    last = parse(answer.body)[-1]
    if path == "/v1/messages":
        assert last.event == "error" and last.json() == {"code": 500, "message": "fake error", "type": "server_error"}
    else:
        assert last.event == "" and last.json()["error"]["type"] == "server_error"
    deltas = [e for e in parse(answer.body) if e.event.endswith("delta") and e.event != "message_delta"]
    assert len(deltas) == 2
    with pytest.raises(aiohttp.ClientPayloadError):
        await send(fake.url, "POST", path, {**body, "stream": True, "fake": {"drop_after_tokens": 1}})
    plain = await send(fake.url, "POST", path, {**body, "stream": True})
    chaos = await send(fake.url, "POST", path, {**body, "stream": True, "fake": {"wire": "chaos"}})
    # (chaos also drops llama-server's timings, a key of the last Responses event)
    assert [n for n, _ in stream_shape(chaos.body)] == [n for n, _ in stream_shape(plain.body)]
    assert b"event:response" in chaos.body or b"event:message_start\r\ndata:{" in chaos.body
    status, doc = await post_json(fake, path, {**body, "fake": {"status": 529, "message": "overloaded"}})
    assert status == 529 and doc["error"]["message"] == "overloaded"


async def test_tool_calls(fakes: dict[str, Fake]) -> None:
    """fake.tool_call on /v1/messages is a tool_use block (stop_reason tool_use), on
    /v1/responses a function_call item."""
    fake = fakes["chat"]
    tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                                    "required": ["city"]}}
    status, doc = await post_json(fake, "/v1/messages", {"messages": [{"role": "user", "content": "w?"}],
                                                         "max_tokens": 8, "tools": [tool], "fake": {"tool_call": True}})
    assert status == 200 and doc["stop_reason"] == "tool_use"
    (block,) = doc["content"]
    assert block["type"] == "tool_use" and block["name"] == "get_weather" and block["input"] == {"city": "t0"}
    stream = await send(fake.url, "POST", "/v1/messages", {"messages": [{"role": "user", "content": "w?"}],
                                                           "max_tokens": 8, "tools": [tool], "stream": True,
                                                           "fake": {"tool_call": True}})
    events = parse(stream.body)
    assert events[1].json()["content_block"]["type"] == "tool_use"
    assert "".join(e.json()["delta"]["partial_json"] for e in events if e.event == "content_block_delta") \
        == '{"city":"t0"}'
    rtool = {"type": "function", "name": "get_weather", "parameters": tool["input_schema"]}
    status, doc = await post_json(fake, "/v1/responses", {"input": "w?", "tools": [rtool],
                                                          "fake": {"tool_call": True}})
    (item,) = doc["output"]
    assert item["type"] == "function_call" and item["name"] == "get_weather" and item["arguments"] == '{"city":"t0"}'


async def test_tokenizer_helpers_and_rerank(fakes: dict[str, Fake]) -> None:
    fake = fakes["chat"]
    await fake.reset()
    _, tokens = await post_json(fake, "/tokenize", {"content": "hello  big world"})
    _, text = await post_json(fake, "/detokenize", {"tokens": [*tokens["tokens"], 7]})
    assert text == {"content": "hello big world [7]"}
    _, gen = await post_json(fake, "/tokenize", {"content": "t0 t1"})
    assert (await post_json(fake, "/detokenize", gen))[1] == {"content": "t0 t1"}
    status, count = await post_json(fake, "/v1/chat/completions/input_tokens",
                                    {"messages": [{"role": "user", "content": "a b"}]})
    assert (status, count["input_tokens"]) == (200, 6)
    status, doc = await post_json(fake, "/tokenize", {"content": "x", "fake": {"status": 503}})
    assert status == 503
    stats = await fake.stats()
    assert stats["requests"] == 0 and stats["by_path"]["/tokenize"] == 3  # helpers: not inference
    rerank = fakes["rerank"]
    status, doc = await post_json(rerank, "/v1/rerank", {"query": "capital of France",
                                                         "documents": ["Bananas", "Paris capital of France", "France"],
                                                         "top_n": 2})
    assert status == 200 and [r["index"] for r in doc["results"]] == [1, 2]
    assert doc["results"][0]["relevance_score"] == 1.0
    assert doc["usage"] == {"prompt_tokens": 3 * 3 + 1 + 4 + 1, "total_tokens": 15}


async def test_observed_files_are_complete() -> None:
    """Every capture has its file (a renamed capture must be re-captured, not left stale)."""
    names = {p.name for p in Path(OUT).glob("*.http.txt")}
    assert names == {f"{c.name}.http.txt" for c in CAPTURES}


# ---- the fake vLLM, against vLLM 0.32's own models (data/vllm-0.32-models/routes.json) ----

VLLM_SHAPES = json.loads((Path(__file__).resolve().parent / "data" / "vllm-0.32-models" / "routes.json").read_text())


@pytest.fixture(scope="module")
def vllm() -> Iterator[dict[str, str]]:
    """A generate runner and a pooling runner with a cross-encoder, both serving "m"."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    try:
        for kind, args in (("generate", ()), ("rerank", ("--runner", "pooling", "--fake-reranker"))):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, str(FAKE_VLLM), "m", "--served-model-name", "m", *args, *FAST, "--port", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            urls[kind] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        for url in urls.values():
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1):
                        break
                except OSError:
                    assert time.monotonic() < deadline, "fake_vllm.py not healthy"
                    time.sleep(0.05)
        yield urls
    finally:
        stop_fakes(procs)


def named_events(body: bytes) -> dict[str, Any]:
    return {e.event: e.json() for e in parse(body)}


async def test_vllm_messages_and_responses_in_vllms_shapes(vllm: dict[str, str]) -> None:
    url = vllm["generate"]
    msg = {"model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 3}
    answer = await send(url, "POST", "/v1/messages", msg)
    doc = json.loads(answer.body)
    assert not shape_gaps(shape(VLLM_SHAPES["messages"]), shape(doc))
    assert doc["usage"] == {"input_tokens": 6 + 6, "output_tokens": 3}
    answer = await send(url, "POST", "/v1/messages", {**msg, "stream": True})
    events = named_events(answer.body)
    assert [e.event for e in parse(answer.body)] == [
        "message_start", "content_block_start", *["content_block_delta"] * 3, "content_block_stop", "message_delta",
        "message_stop"]
    for name, ref in VLLM_SHAPES["messages_stream"]:
        assert not shape_gaps(shape(ref), shape(events[name])), name
    assert events["message_delta"]["usage"] == {"input_tokens": 12, "output_tokens": 3}
    count = json.loads((await send(url, "POST", "/v1/messages/count_tokens", msg)).body)
    assert count == {"input_tokens": 12, "context_management": {"original_input_tokens": 12}}
    missing = await send(url, "POST", "/v1/messages", {"model": "m", "messages": []})
    assert missing.status == 400 and json.loads(missing.body)["error"]["param"] == "body.max_tokens"
    # the handler's errors (and a status control) in Anthropic's envelope, pydantic's in OpenAI's
    unknown = await send(url, "POST", "/v1/messages", {**msg, "model": "nope"})
    assert unknown.status == 404 and json.loads(unknown.body) == {"type": "error", "error": {
        "type": "NotFoundError", "message": "The model `nope` does not exist. Valid aliases: m."}}
    busy = await send(url, "POST", "/v1/messages",
                      {**msg, "fake": {"status": 503, "message": "busy", "headers": {"Retry-After": "2"}}})
    assert busy.status == 503 and json.loads(busy.body)["error"] == {"type": "ServiceUnavailableError",
                                                                     "message": "busy"}

    req = {"model": "m", "input": "Say hello", "instructions": "Be brief.", "max_output_tokens": 3}
    doc = json.loads((await send(url, "POST", "/v1/responses", req)).body)
    assert not shape_gaps(shape(VLLM_SHAPES["responses"]), shape(doc))
    assert doc["status"] == "incomplete" and doc["incomplete_details"] == {"reason": "max_output_tokens"}
    assert (doc["usage"]["input_tokens"], doc["usage"]["output_tokens"]) == (12, 3)
    answer = await send(url, "POST", "/v1/responses", {**req, "stream": True})
    seq = [e.event for e in parse(answer.body)]
    assert seq == [name for name, _ in VLLM_SHAPES["responses_stream"][:4]] + ["response.output_text.delta"] * 3 + [
        name for name, _ in VLLM_SHAPES["responses_stream"][5:]]
    events = named_events(answer.body)
    for name, ref in VLLM_SHAPES["responses_stream"]:
        assert not shape_gaps(shape(ref), shape(events[name])), name
    assert [e.json()["sequence_number"] for e in parse(answer.body)] == list(range(len(seq)))


async def test_vllm_rerank_and_detokenize(vllm: dict[str, str]) -> None:
    body = {"model": "m", "query": "capital of France", "documents": ["Bananas", "Paris capital of France"]}
    answer = await send(vllm["rerank"], "POST", "/v1/rerank", body)
    doc = json.loads(answer.body)
    assert not shape_gaps(shape(VLLM_SHAPES["rerank"]), shape(doc))
    assert [r["index"] for r in doc["results"]] == [1, 0] and doc["usage"]["prompt_tokens"] == 3 * 2 + 1 + 4
    assert (await send(vllm["generate"], "POST", "/v1/rerank", body)).status == 404  # not a cross-encoder
    tokens = json.loads((await send(vllm["generate"], "POST", "/tokenize", {"model": "m", "prompt": "a b"})).body)
    answer = await send(vllm["generate"], "POST", "/detokenize", {"model": "m", "tokens": tokens["tokens"]})
    text = json.loads(answer.body)
    assert text == {"prompt": "a b"}
