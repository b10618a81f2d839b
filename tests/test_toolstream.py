"""Streamed tool loops as clients see them, beyond test_tools.py: an upstream that ignores
include_usage (no usage sum is told that the ledger would not match), the official openai SDK
reading every chunk of a loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web

from llmd.call import Call
from llmd.config import Config, ToolConfig
from llmd.toolloop import Plan, ToolLoop
from llmd.tools import MathError, Tool, Toolbox, ToolResult, math_eval
from tests.conftest import wait_for, write_config
from tests.fakeproc import FakeProc
from tests.test_tools import KEYS, chat, config, post, rows, run_llmd

CALL = {"tool_call": {"name": "math_eval", "arguments": {"expression": "2+2"}}}


async def test_an_upstream_without_usage_gets_no_made_up_sum(tmp_path: Path, fake: FakeProc) -> None:
    """The rounds' usage is not told by the upstream: their rows are counted from the chunks
    after the loop; a sum told to the client now (round 1 as 0 tokens) would not match them."""
    ctl = {**CALL, "wire": "no-usage", "after_tool": {"text": "it is four", "wire": "no-usage"}}
    async with run_llmd(config(tmp_path, fake)) as llmd:
        body = chat(["math.eval"], ctl, stream=True, stream_options={"include_usage": True})
        status, text, _ = await post(llmd.url, body, rid="nu")
        assert status == 200 and text.endswith("data: [DONE]\n\n")
        chunks = [json.loads(e[len("data: ") :]) for e in text.split("\n\n") if e.startswith("data: {")]
        assert not any("usage" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        await wait_for(lambda: len(rows(tmp_path)) >= 2)
        assert [r["token_method"] for r in rows(tmp_path)] == ["stream_chunks+estimate"] * 2


async def test_the_openai_sdk_reads_a_streamed_loop(tmp_path: Path, fake: FakeProc) -> None:
    """Every chunk parses; one id; the text, one finish and the summed usage equal the rows'."""
    ctl = {**CALL, "wire": "openai", "after_tool": {"text": "it is four", "wire": "openai"}}
    async with run_llmd(config(tmp_path, fake)) as llmd:
        client = openai.AsyncOpenAI(base_url=llmd.url + "/v1", api_key=KEYS["prem"], max_retries=0)
        for include in (True, False):
            stream = await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "2+2?"}],
                max_tokens=8,
                tools=[{"type": "server", "name": "math.eval"}],  # type: ignore[list-item]
                stream=True,
                stream_options={"include_usage": include},
                extra_body={"fake": ctl},
                extra_headers={"X-Request-ID": f"sdk-{include}"},
            )
            got = [c async for c in stream]
            assert len({c.id for c in got}) == 1
            assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "it is four"
            assert [c.choices[0].finish_reason for c in got if c.choices and c.choices[0].finish_reason] == ["stop"]
            usage = [c.usage for c in got if c.usage is not None]
            if not include:
                assert usage == []
                continue
            assert len(usage) == 1
            await wait_for(lambda: len(rows(tmp_path)) >= 2)
            mine = [r for r in rows(tmp_path) if r["request_id"].startswith("sdk-True")]
            assert len(mine) == 2
            assert usage[0].prompt_tokens == sum(r["prompt_tokens"] for r in mine)
            assert usage[0].completion_tokens == sum(r["completion_tokens"] for r in mine)


async def test_round_one_without_usage_still_counts_against_the_quota(tmp_path: Path, fake: FakeProc) -> None:
    """Round 1's grant is settled early (the next round needs its slot); with no usage from the
    upstream it must settle on what its row will say, not 0: the quota sees every round."""
    path = config(tmp_path, fake)
    doc = yaml.safe_load(path.read_text())
    doc["tiers"]["premium"] = {"monthly_tokens": 1_000_000}
    for k in doc["keys"]:
        k["admin"] = k["id"] == "prem"
    ctl = {**CALL, "wire": "no-usage", "after_tool": {"text": "it is four", "wire": "no-usage"}}
    async with run_llmd(write_config(path, doc)) as llmd:
        status, _, _ = await post(llmd.url, chat(["math.eval"], ctl, stream=True), rid="q")
        assert status == 200
        await wait_for(lambda: len(rows(tmp_path)) >= 2)
        billed = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows(tmp_path))
        h = {"Authorization": f"Bearer {KEYS['prem']}"}
        async with aiohttp.ClientSession() as s, s.get(llmd.url + "/admin/events", headers=h) as r:
            line = b""
            while not line.startswith(b"data: "):
                line = await r.content.readline()
        limits = {k["key_id"]: k for k in json.loads(line[len(b"data: ") :])["limits"]}
        assert limits["prem"]["monthly_tokens"]["used"] == billed


async def test_default_tools_yield_to_a_client_function_of_their_name(tmp_path: Path, fake: FakeProc) -> None:
    """A tier's default math.eval reaches the model as math_eval; a client that brings its own
    math_eval function (it never named a server tool) gets its call back, not a 400; a streamed
    plain request of the tier runs the default loop."""
    path = config(tmp_path, fake)
    doc = yaml.safe_load(path.read_text())
    doc["tiers"]["premium"] = {"default_tools": ["math.eval"]}
    mine = {"type": "function", "function": {"name": "math_eval", "parameters": {"type": "object"}}}
    plain = {"model": "m", "messages": [{"role": "user", "content": "3*3?"}], "max_tokens": 8, "fake": {**CALL}}
    async with run_llmd(write_config(path, doc)) as llmd:
        status, body, _ = await post(llmd.url, {**plain, "tools": [mine]})
        assert status == 200, body
        assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "math_eval"
        sent = [b for b in (await fake.stats())["bodies"] if isinstance(b, dict)][-1]
        assert sent["tools"] == [mine]
        ctl = {**CALL, "after_tool": {"echo_tool": True}}
        status, text, _ = await post(llmd.url, {**plain, "fake": ctl, "stream": True})
        assert status == 200 and ": tool math.eval ok" in text and text.endswith("data: [DONE]\n\n")


async def test_a_forced_tool_choice_holds_for_round_one_only(tmp_path: Path, fake: FakeProc) -> None:
    """tool_choice "required" (or a function named) is met by round 1's call; the next rounds go
    with "auto", else the model could never answer with what the tool told it."""
    forced = {"type": "function", "function": {"name": "math_eval"}}
    async with run_llmd(config(tmp_path, fake)) as llmd:
        for choice in ("required", forced):
            n0 = len((await fake.stats())["bodies"])
            ctl = {**CALL, "after_tool": {"text": "four"}}
            status, body, _ = await post(llmd.url, chat(["math.eval"], ctl, tool_choice=choice))
            assert status == 200 and body["choices"][0]["message"]["content"] == "four"
            sent = [b for b in (await fake.stats())["bodies"] if isinstance(b, dict)][n0:]
            assert [b["tool_choice"] for b in sent] == [choice, "auto"]


async def test_a_later_rounds_error_is_the_requests_outcome(tmp_path: Path, fake: FakeProc) -> None:
    """Round 2 answers 400: the client gets that 400, and the request's row says so (status 400
    with outcome upstream_error, as a relayed 400 is written), not "ok"; streamed, in-band."""
    ctl = {**CALL, "after_tool": {"status": 400, "message": "nope"}}
    async with run_llmd(config(tmp_path, fake)) as llmd:
        status, body, _ = await post(llmd.url, chat(["math.eval"], ctl), rid="w")
        assert status == 400 and body["error"]["message"] == "nope"
        status, text, _ = await post(llmd.url, chat(["math.eval"], ctl, stream=True), rid="s")
        assert status == 200 and json.loads(text.split("\n\n")[-2][len("data: ") :])["error"]["type"]
        await wait_for(lambda: len(rows(tmp_path)) >= 4)
        got = {r["request_id"]: (r["status"], r["outcome"]) for r in rows(tmp_path)}
        assert got == {
            "w": (400, "upstream_error"),
            "w.r2": (400, "upstream_error"),
            "s": (200, "upstream_error"),
            "s.r2": (400, "upstream_error"),
        }


async def test_a_malformed_client_tool_is_not_llmds_500(tmp_path: Path, fake: FakeProc) -> None:
    """{"type": "function", "function": "oops"} beside a server tool, or sent by a tier with
    default tools: the request goes on (the upstream judges the client's tool), never a 500."""
    path = config(tmp_path, fake)
    doc = yaml.safe_load(path.read_text())
    doc["tiers"]["premium"] = {"default_tools": ["math.eval"]}
    odd = {"type": "function", "function": "oops"}
    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "fake": {"text": "hi"}}
    async with run_llmd(write_config(path, doc)) as llmd:
        named = {**plain, "tools": [odd, {"type": "server", "name": "time.now"}]}
        for body in ({**plain, "tools": [odd]}, named):
            status, got, _ = await post(llmd.url, body)
            assert status == 200, got


async def test_tool_call_arguments_sent_as_an_object_are_read_as_json() -> None:
    """An upstream whose answer carries a tool call's arguments as a JSON object (not the text
    OpenAI's format has): the tool gets them as text and the next round's history is valid,
    where the object used to reach Toolbox.run and fail the request with a 500."""
    call = Call(request=None, request_id="r", client_ip="127.0.0.1")  # type: ignore[arg-type]
    box = Toolbox(Config(tools={"time.now": ToolConfig(builtin="time.now")}))
    tool = box.get("time.now")
    assert tool is not None
    seen: list[Any] = []
    later: list[bytes] = []

    async def run_tool(t: Tool, arguments: str) -> ToolResult:
        seen.append(arguments)
        return await box.run(t, arguments, None)  # type: ignore[arg-type]

    def answer(message: dict[str, Any]) -> web.Response:
        return web.Response(body=json.dumps({"choices": [{"message": message, "finish_reason": "stop"}]}).encode())

    async def serve_main() -> web.StreamResponse:
        fn = {"name": "time_now", "arguments": {"timezone": "UTC"}}
        calls = [{"id": "a", "type": "function", "function": fn}]
        return answer({"role": "assistant", "content": None, "tool_calls": calls})

    async def serve_round(sub: Call) -> web.StreamResponse:
        later.append(sub.upstream_body)
        return answer({"role": "assistant", "content": "noon"})

    loop = ToolLoop(call, Plan({"messages": [{"role": "user", "content": "time?"}]}, {"time_now": tool}), 3, run_tool)
    loop._round_call = lambda n, body: Call(request=None, request_id=f"r.r{n}", client_ip="x", upstream_body=body)  # type: ignore[method-assign,arg-type]
    resp = await loop.run(serve_main, serve_round)
    assert resp.status == 200 and json.loads(resp.body)["choices"][0]["message"]["content"] == "noon"  # type: ignore[attr-defined]
    assert [json.loads(a) for a in seen] == [{"timezone": "UTC"}]
    history = json.loads(later[0])["messages"]
    assert history[1]["tool_calls"][0]["function"]["arguments"] == '{"timezone":"UTC"}'
    assert json.loads(history[2]["content"])["time"]


class _Gone:
    """A client stream whose peer has left: aiohttp raises ClientConnectionResetError on write."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    async def write(self, data: bytes) -> None:
        if data.startswith(b": tool"):
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        self.data.append(data)


async def test_a_client_gone_between_rounds_is_a_client_abort() -> None:
    """Round 1 streamed only a tool call (held: nothing written); the client left; the tool's
    comment is the first write to fail. That is the client's leaving (CancelledError: the row
    says client_abort, 499), not an exception of llmd's (a 500, upstream_error)."""
    call = Call(request=None, request_id="r", client_ip="127.0.0.1")  # type: ignore[arg-type]
    box = Toolbox(Config(tools={"time.now": ToolConfig(builtin="time.now")}))
    tool = box.get("time.now")
    assert tool is not None
    out = _Gone()
    loop = ToolLoop(call, Plan({"messages": [], "stream": True}, {"time_now": tool}), 3,
                    lambda t, a: box.run(t, a, None))  # type: ignore[arg-type]

    async def opened() -> Any:
        loop.out = out  # type: ignore[assignment]
        return out

    async def serve_main() -> Any:
        assert call.sink is not None
        piece = {"index": 0, "id": "a", "type": "function", "function": {"name": "time_now", "arguments": "{}"}}
        chunk = {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}]}
        assert call.sink.event(json.dumps(chunk).encode()) is None  # held, nothing for the client
        return out

    loop._open = opened  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await loop.run(serve_main, serve_main)  # type: ignore[arg-type]


@pytest.mark.parametrize("expr", ["1e308*10", "-1e308*10", "1e308*10-1e308*10", "1e308+1e308"])
def test_math_eval_has_no_infinite_results(expr: str) -> None:
    """inf and nan have no JSON: the model would read {"result": null}; it reads an error."""
    with pytest.raises(MathError):
        math_eval(expr)


async def test_deeply_nested_arguments_are_the_tools_error() -> None:
    """The model's arguments nested thousands deep: msgspec raises RecursionError, which used
    to leave Toolbox.run (documented never to raise) and fail the request with a 500."""
    box = Toolbox(Config(tools={"math.eval": ToolConfig(builtin="math.eval")}))
    tool = box.get("math.eval")
    assert tool is not None
    for text in ("[" * 100_000 + "]" * 100_000, '{"expression": ' + "[" * 5000 + "]" * 5000 + "}"):
        result = await box.run(tool, text, None)  # type: ignore[arg-type]
        assert not result.ok and "not valid JSON" in result.text


@pytest.mark.parametrize(
    "args",
    [
        {"time": "9999-12-31T23:59:59+00:00", "to_timezone": "Pacific/Kiritimati"},
        {"time": "0001-01-01T00:00:00", "from_timezone": "Asia/Tokyo", "to_timezone": "UTC"},
    ],
)
async def test_time_convert_out_of_range_is_the_tools_error(args: dict[str, str]) -> None:
    """A conversion past year 9999 or before year 1 (OverflowError) is the tool's error for the
    model to read; it used to leave Toolbox.run and fail the request with a 500."""
    box = Toolbox(Config(tools={"time.convert": ToolConfig(builtin="time.convert")}))
    tool = box.get("time.convert")
    assert tool is not None
    result = await box.run(tool, json.dumps(args), None)  # type: ignore[arg-type]
    assert not result.ok and "out of range" in result.text
