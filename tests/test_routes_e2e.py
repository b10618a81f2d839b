"""Every route of the route table through llmd, over supervised fake llama-servers: the
answer the client gets, and a ledger row equal to the usage that answer reports.

llmd supervises two fakes: model ``m`` (chat with FIM, two replicas, for affinity) and ``r``
(``--reranking``), and knows a remote model that serves chat only. Keys: ``dev``, ``other``
(its default_model is ``r``) and ``tight`` (requests_per_minute 1); ``server.default_model``
is ``m``. The wire profile of the
fakes is a parameter: llama-server's own and a chaotic one (CRLF, ``data:`` without a space,
events cut anywhere).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Llmd, base_config, run_llmd, wait_for, write_config
from tests.fakeproc import FAKE_LLAMA
from tests.sse import parse

DEV, TIGHT, OTHER = "sk-dev-e2e", "sk-tight-e2e", "sk-other-e2e"
MESSAGES = [{"role": "user", "content": "one two three"}]


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


@pytest.fixture(params=["native", "chaos"])
async def llmd(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Llmd]:
    wire = request.param
    models = {
        "m": {"backend": "llama-server", "model": "fake.gguf", "replicas": 2, "aliases": ["claude-test"],
              "args": ["-np", "2", "--fake-wire", wire, "--load-delay-s", "0"]},
        "r": {"backend": "llama-server", "model": "fake.gguf",
              "args": ["--reranking", "-np", "1", "--fake-wire", wire, "--load-delay-s", "0"]},
        "remote": {"backend": "openai", "urls": ["http://127.0.0.1:9/v1"], "routes": ["chat"]},
    }  # fmt: skip
    doc = base_config(
        tmp_path,
        models,
        server={"default_model": "m"},
        tiers={"std": {"requests_per_minute": 10_000}, "tight": {"requests_per_minute": 1}},
        keys=[{"id": "dev", "tier": "std", "sha256": sha(DEV)},
              {"id": "other", "tier": "std", "sha256": sha(OTHER), "default_model": "r"},
              {"id": "tight", "tier": "tight", "sha256": sha(TIGHT)}],
        launchers={"llama-server": {"command": [sys.executable, str(FAKE_LLAMA)]}},
    )  # fmt: skip
    async with run_llmd(write_config(tmp_path / "config.yaml", doc)) as d:
        await wait_for(lambda: all(r.state.value == "ready" for n in ("m", "r")
                                   for r in d.services.supervisor.replicas(n)), 20)  # fmt: skip
        yield d


async def post(llmd: Llmd, path: str, body: dict[str, Any], key: str = DEV, **headers: str) -> tuple[int, Any, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(llmd.url + path, json=body, headers={"Authorization": f"Bearer {key}", **headers}) as r,
    ):
        raw = await r.read()
        ctype = r.headers.get("Content-Type", "")
        doc = json.loads(raw) if ctype.startswith("application/json") else None
        return r.status, (doc, dict(r.headers)), raw


async def last_row(llmd: Llmd, n: int) -> dict[str, Any]:
    """The n-th row (1-based) once written and settled."""
    db = llmd.services.runtime.cfg.usage.path
    for _ in range(400):
        await llmd.services.ledger.flush()
        con = sqlite3.connect(db)
        con.row_factory = sqlite3.Row
        rows = [dict(r) for r in con.execute("select * from requests order by id")]
        con.close()
        if len(rows) >= n and not llmd.services._background:
            return rows[n - 1]
        await asyncio.sleep(0.025)
    raise AssertionError(f"no row {n}")


def events(raw: bytes) -> list[tuple[str, Any]]:
    out = []
    for e in parse(raw):
        if e.data and e.data != "[DONE]":
            out.append((e.event, json.loads(e.data)))
    return out


async def test_anthropic_messages_whole_stream_and_count_tokens(llmd: Llmd) -> None:
    body = {"model": "claude-test", "max_tokens": 4, "system": "be brief", "messages": MESSAGES}
    status, (doc, headers), _ = await post(llmd, "/v1/messages", body, **{"anthropic-version": "2023-06-01"})
    assert status == 200 and doc["type"] == "message" and headers["request-id"]
    u = doc["usage"]
    row = await last_row(llmd, 1)
    assert (row["route"], row["model"], row["token_method"]) == ("messages", "m", "upstream")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        u["input_tokens"] + u.get("cache_read_input_tokens", 0), u["output_tokens"])  # fmt: skip
    st = await post(llmd, "/v1/messages", {**body, "stream": True})
    evs = events(st[2])
    types = [e["type"] for _, e in evs]
    assert (types[0], types[-1]) == ("message_start", "message_stop")
    start = next(e for _, e in evs if e["type"] == "message_start")["message"]["usage"]
    out = next(e for _, e in evs if e["type"] == "message_delta")["usage"]["output_tokens"]
    deltas = sum(1 for _, e in evs if e["type"] == "content_block_delta")
    row = await last_row(llmd, 2)
    assert (row["stream"], row["prompt_tokens"], row["completion_tokens"]) == (
        1, start["input_tokens"] + start.get("cache_read_input_tokens", 0), out)  # fmt: skip
    assert out == deltas == 4
    status, (doc, _), _ = await post(llmd, "/v1/messages/count_tokens", {"model": "m", "messages": MESSAGES})
    assert status == 200 and doc["input_tokens"] > 0
    row = await last_row(llmd, 3)
    assert (row["route"], row["prompt_tokens"], row["completion_tokens"]) == ("count_tokens", 0, 0)


async def test_an_anthropic_stream_cut_mid_way_bills_the_prompt_it_was_told(llmd: Llmd) -> None:
    body = {"model": "m", "max_tokens": 8, "messages": MESSAGES, "stream": True, "fake": {"drop_after_tokens": 3}}
    _, _, raw = await post(llmd, "/v1/messages", body)
    evs = events(raw)
    start = next(e for _, e in evs if e["type"] == "message_start")["message"]["usage"]
    row = await last_row(llmd, 1)
    assert (row["outcome"], row["completion_tokens"], row["token_method"]) == (
        "upstream_error", 3, "stream_chunks+upstream")  # fmt: skip
    assert row["prompt_tokens"] == start["input_tokens"] + start.get("cache_read_input_tokens", 0)
    assert evs[-1][1].get("type") == "error" or "error" in evs[-1][1]


async def test_openai_responses_whole_and_stream(llmd: Llmd) -> None:
    body = {"model": "m", "input": "one two three", "instructions": "be brief", "max_output_tokens": 5}
    status, (doc, _), _ = await post(llmd, "/v1/responses", body)
    assert status == 200 and doc["object"] == "response"
    row = await last_row(llmd, 1)
    assert (row["route"], row["prompt_tokens"], row["completion_tokens"]) == (
        "responses", doc["usage"]["input_tokens"], doc["usage"]["output_tokens"])  # fmt: skip
    _, _, raw = await post(llmd, "/v1/responses", {**body, "stream": True})
    done = next(e for _, e in events(raw) if e.get("type") == "response.completed")["response"]["usage"]
    row = await last_row(llmd, 2)
    assert (row["stream"], row["prompt_tokens"], row["completion_tokens"]) == (
        1, done["input_tokens"], done["output_tokens"])  # fmt: skip
    status, (doc, _), _ = await post(llmd, "/v1/responses/input_tokens", {"model": "m", "input": "one two"})
    assert status == 200 and doc["input_tokens"] > 0
    assert (await last_row(llmd, 3))["route"] == "input_tokens"


async def test_llama_native_routes_without_a_model(llmd: Llmd) -> None:
    """llama.vscode's /infill and a /completion script name no model: server.default_model
    serves them; usage from tokens_evaluated/tokens_predicted; the helpers count 0 tokens."""
    infill = {"input_prefix": "def f(", "input_suffix": ")\n", "input_extra": [{"filename": "a.py", "text": "x = 1\n"}],
              "prompt": "", "n_predict": 3, "cache_prompt": True}  # fmt: skip
    status, (doc, _), _ = await post(llmd, "/infill", infill)
    assert status == 200
    row = await last_row(llmd, 1)
    assert (row["route"], row["model"]) == ("infill", "m")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (doc["tokens_evaluated"], doc["tokens_predicted"])
    _, _, raw = await post(llmd, "/completion", {"prompt": "one two three", "n_predict": 4, "stream": True})
    final = [e for _, e in events(raw)][-1]
    assert final["stop"] is True
    row = await last_row(llmd, 2)
    assert (row["route"], row["stream"], row["prompt_tokens"], row["completion_tokens"]) == (
        "completion", 1, final["tokens_evaluated"], final["tokens_predicted"])  # fmt: skip
    status, (doc, _), _ = await post(llmd, "/tokenize", {"content": "one two three"})
    tokens = doc["tokens"]
    status2, (doc2, _), _ = await post(llmd, "/detokenize", {"tokens": tokens})
    status3, (doc3, _), _ = await post(llmd, "/apply-template", {"messages": MESSAGES})
    assert (status, status2, status3) == (200, 200, 200) and doc2["content"] and "one two three" in doc3["prompt"]
    for n, route in ((3, "tokenize"), (4, "detokenize"), (5, "apply_template")):
        row = await last_row(llmd, n)
        assert (row["route"], row["prompt_tokens"], row["completion_tokens"]) == (route, 0, 0)


async def test_rerank_default_model_per_key_and_unprefixed_paths(llmd: Llmd) -> None:
    body = {"query": "one two", "documents": ["one two three", "four five"], "top_n": 2}
    status, (doc, _), _ = await post(llmd, "/v1/rerank", body, key=OTHER)  # key's default_model: r
    assert status == 200 and doc["results"][0]["index"] == 0
    row = await last_row(llmd, 1)
    assert (row["route"], row["model"], row["prompt_tokens"], row["completion_tokens"]) == (
        "rerank", "r", doc["usage"]["prompt_tokens"], 0)  # fmt: skip
    status, (doc, _), _ = await post(llmd, "/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 2})
    assert status == 200 and doc["usage"]["completion_tokens"] == 2
    async with (
        aiohttp.ClientSession() as s,
        s.get(llmd.url + "/models", headers={"Authorization": f"Bearer {DEV}"}) as r,
    ):
        assert {m["id"] for m in (await r.json())["data"]} >= {"m", "r", "claude-test"}


async def test_errors_on_anthropic_routes_use_its_envelope(llmd: Llmd) -> None:
    body = {"model": "m", "max_tokens": 1, "messages": MESSAGES}
    status, (doc, headers), _ = await post(llmd, "/v1/messages", body, key="sk-wrong")
    assert status == 401 and doc == {"type": "error", "error": {"type": "authentication_error",
                                                                "message": "Incorrect API key provided."}}  # fmt: skip
    assert (await post(llmd, "/v1/messages", body, key=TIGHT))[0] == 200
    status, (doc, headers), _ = await post(llmd, "/v1/messages", body, key=TIGHT)
    assert status == 429 and doc["error"]["type"] == "rate_limit_error" and int(headers["Retry-After"]) > 0
    status, (doc, _), _ = await post(llmd, "/v1/messages", {**body, "model": "nope"})
    assert status == 404 and doc["error"]["type"] == "not_found_error"
    status, (doc, _), _ = await post(llmd, "/v1/messages", {"model": "m", "max_tokens": 0, "messages": MESSAGES})
    assert status == 400 and doc["error"]["type"] == "invalid_request_error" and "max_tokens" in doc["error"]["message"]
    # the same error on an OpenAI route keeps OpenAI's envelope
    status, (doc, _), _ = await post(llmd, "/v1/chat/completions", {**body, "model": "nope"})
    assert status == 404 and doc["error"]["code"] == "model_not_found"


async def test_a_route_the_backend_does_not_serve_is_a_clear_404(llmd: Llmd) -> None:
    status, (doc, _), _ = await post(llmd, "/v1/messages", {"model": "remote", "max_tokens": 1, "messages": MESSAGES})
    assert status == 404 and "remote" in doc["error"]["message"] and "/v1/messages" in doc["error"]["message"]


async def test_requests_without_a_model_and_no_default_name_the_setting(tmp_path: Path) -> None:
    doc = base_config(tmp_path, {"m": {"backend": "openai", "urls": ["http://127.0.0.1:9/v1"]}})
    async with run_llmd(write_config(tmp_path / "c.yaml", doc)) as d, aiohttp.ClientSession() as s:
        async with s.post(d.url + "/v1/chat/completions", json={"messages": MESSAGES}) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["param"] == "model"
            assert "server.default_model" in body["error"]["message"]


async def test_legacy_function_calling_through_tools(llmd: Llmd) -> None:
    """An old client sends functions/function_call; the engine gets tools/tool_choice and the
    client gets function_call back, whole and streamed."""
    fn = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    body = {"model": "m", "messages": MESSAGES, "functions": [fn], "function_call": {"name": "get_weather"},
            "fake": {"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}}  # fmt: skip
    status, (doc, _), _ = await post(llmd, "/v1/chat/completions", body)
    choice = doc["choices"][0]
    assert status == 200 and choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'} or (
        choice["message"]["function_call"]["name"] == "get_weather"
        and json.loads(choice["message"]["function_call"]["arguments"]) == {"city": "Oslo"})  # fmt: skip
    assert "tool_calls" not in choice["message"]
    _, _, raw = await post(llmd, "/v1/chat/completions", {**body, "stream": True})
    deltas = [c["delta"] for _, e in events(raw) for c in e.get("choices", [])]
    assert any("function_call" in d for d in deltas) and not any("tool_calls" in d for d in deltas)
    args = "".join(d["function_call"].get("arguments", "") for d in deltas if "function_call" in d)
    assert json.loads(args) == {"city": "Oslo"}


async def test_prefix_affinity_keeps_an_anthropic_conversation_on_one_replica(llmd: Llmd) -> None:
    system = "You are a helpful assistant. " * 40  # several 128-byte blocks of shared prefix
    history = list(MESSAGES)
    for turn in range(4):
        body = {"model": "m", "max_tokens": 2, "system": system, "messages": history}
        status, (doc, _), _ = await post(llmd, "/v1/messages", body)
        assert status == 200
        history = [*history, {"role": "assistant", "content": doc["content"][0]["text"]},
                   {"role": "user", "content": f"turn {turn}"}]  # fmt: skip
    replicas = {(await last_row(llmd, n))["replica"] for n in range(1, 5)}
    assert len(replicas) == 1, replicas
