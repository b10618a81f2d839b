"""Server-side tools end to end against the fake llama-server: the loop's rounds, usage summed
over them and their linked ledger rows, who may use which tool, schema-failing arguments as a
tool error, HTTP tools on an allowed host (and a refused one), math.eval against hostile input,
the streamed final round with its SSE comments, and GET /v1/tools."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from llmd import configfile
from llmd.config import Config, ConfigError, ToolConfig, ToolLoopConfig
from llmd.tools import MathError, Toolbox, math_eval, validate
from tests.conftest import base_config, run_llmd, wait_for, write_config
from tests.fakeproc import FakeProc

KEYS = {"basic": "sk-tools-basic-0123456789", "prem": "sk-tools-prem-0123456789"}
TIER = {"basic": "basic", "prem": "premium"}
TICKETS = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"], "additionalProperties": False}


@pytest.fixture
async def tool_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A local HTTP tool: POST /search answers the tickets matching q; /slow never in time."""
    seen: list[dict[str, Any]] = []

    async def search(request: web.Request) -> web.Response:
        doc = await request.json()
        seen.append({"body": doc, "auth": request.headers.get("Authorization")})
        return web.json_response({"tickets": [f"T-1 about {doc['q']}"]})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b'{"tickets": ', b'["T-1", ', b'"T-2"]}'):
            await resp.write(part)
            await asyncio.sleep(0.05)  # each part its own chunk on the wire
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/search", search)
    app.router.add_post("/slow", slow)
    app.router.add_post("/chunked", chunked)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def config(tmp_path: Path, fake: FakeProc, tool_url: str = "http://127.0.0.1:9/search", **extra: Any) -> Path:
    os.environ["LLMD_TEST_TOOL_AUTH"] = "Bearer tool-secret"  # headers_env: the tool's credential
    keys = [{"id": k, "tier": TIER[k], "sha256": hashlib.sha256(s.encode()).hexdigest()} for k, s in KEYS.items()]
    host = tool_url.split("/")[2]
    tools = {
        "time.now": {"builtin": "time.now"},
        "math.eval": {"builtin": "math.eval"},
        "time.convert": {"builtin": "time.convert", "tiers": ["premium"]},
        "tickets.search": {
            "url": tool_url,
            "method": "POST",
            "parameters": TICKETS,
            "timeout_s": 5,
            "tiers": ["premium"],
            "headers_env": {"Authorization": "LLMD_TEST_TOOL_AUTH"},
        },
        "tickets.slow": {"url": tool_url.rsplit("/", 1)[0] + "/slow", "parameters": TICKETS, "timeout_s": 0.3},
    }
    doc = base_config(
        tmp_path,
        {"m": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 4}},
        tiers={"basic": {}, "premium": {}},
        keys=keys,
        tools=tools,
        tool_loop={"max_rounds": 3, "allowed_hosts": [host]},
        **extra,
    )
    return write_config(tmp_path / "config.yaml", doc)


def chat(tools: list[str], fake: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "what time is it"}],
        "max_tokens": 8,
        "tools": [{"type": "server", "name": n} for n in tools],
        "fake": fake,
        **extra,
    }


async def post(url: str, body: dict[str, Any], key: str = "prem", rid: str | None = None) -> tuple[int, Any, str]:
    h = {"Authorization": f"Bearer {KEYS[key]}"}
    if rid:
        h["X-Request-ID"] = rid
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body, headers=h) as r:
        raw = await r.read()
        try:
            return r.status, json.loads(raw), r.headers.get("Content-Type", "")
        except ValueError:
            return r.status, raw.decode(), r.headers.get("Content-Type", "")


def rows(tmp_path: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(tmp_path / "usage.sqlite3")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM requests ORDER BY id")]
    finally:
        con.close()


def upstream_messages(fake_stats: dict[str, Any]) -> list[list[dict[str, Any]]]:
    return [b["messages"] for b in fake_stats["bodies"] if isinstance(b, dict) and "messages" in b]


# --- pure: the schema subset and math.eval ----------------------------------------------------------


def test_validate_subset() -> None:
    assert validate(TICKETS, {"q": "x"}) == []
    assert validate(TICKETS, {}) == ["$: missing required property 'q'"]
    assert validate(TICKETS, {"q": 1}) == ["$.q: expected string, got integer"]
    assert validate(TICKETS, {"q": "x", "z": 1}) == ["$: unexpected property 'z'"]
    assert validate({"type": "integer", "minimum": 1}, 0) == ["$: must be >= 1"]
    assert validate({"type": "array", "items": {"type": "number"}}, [1, "a"]) == ["$[1]: expected number, got string"]
    assert validate({"enum": ["a", "b"]}, "c")
    assert validate({"type": "integer"}, True)  # a boolean is no integer


@pytest.mark.parametrize(
    ("expr", "value"),
    [("1+2*3", 7), ("2**10", 1024), ("(1+2)/4", 0.75), ("7//2", 3), ("7%3", 1), ("sqrt(16)", 4.0), ("-3+abs(-2)", -1)],
)
def test_math_eval(expr: str, value: float) -> None:
    assert math_eval(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        '__import__("os").system("id")',
        "9**9**9",
        "2**100000",
        "(1).__class__.__bases__",
        "().__class__",
        "[x for x in range(10**9)]",
        "lambda: 1",
        "open('/etc/passwd')",
        "10**300*10**300*10**300*10**300*10**300*10**300*10**300*10**300*10**300*10**300*10**300*10**300*10**300*10**300",
        "1/0",
        "x",
        "-" * 200 + "1",
        "(" * 1000 + "1" + ")" * 1000,
        "1+" * 400 + "1",
    ],
)
def test_math_eval_refuses_hostile_input(expr: str) -> None:
    with pytest.raises(MathError):
        math_eval(expr)


async def test_builtins_run_and_fail_as_tool_errors() -> None:
    cfg = Config(
        tools={n: ToolConfig(builtin=n) for n in ("time.now", "time.convert", "math.eval")}  # type: ignore[arg-type]
    )
    box = Toolbox(cfg)
    now, convert, calc = (box.tools[n] for n in ("time.now", "time.convert", "math.eval"))
    session: Any = None  # built-ins never touch the network
    r = await box.run(now, '{"timezone": "Asia/Tokyo"}', session)
    assert r.ok and json.loads(r.text)["time"].endswith("+09:00")
    paris = '{"time": "2025-01-31T09:30", "from_timezone": "UTC", "to_timezone": "Europe/Paris"}'
    r = await box.run(convert, paris, session)
    assert r.ok and json.loads(r.text) == {"time": "2025-01-31T10:30:00+01:00", "timezone": "Europe/Paris"}
    r = await box.run(now, '{"timezone": "Mars/Olympus"}', session)
    assert not r.ok and "unknown time zone" in json.loads(r.text)["error"]
    r = await box.run(calc, '{"expression": "__import__(\'os\')"}', session)
    assert not r.ok and "__import__ is not allowed" in json.loads(r.text)["error"]
    r = await box.run(calc, "not json", session)
    assert not r.ok and json.loads(r.text) == {"error": "arguments are not valid JSON"}


async def test_http_tool_result_in_several_chunks_is_read_whole(tool_server) -> None:
    """content.read(n) returns what has arrived so far: a result sent in chunks was cut
    after the first one, and the model saw '{"tickets": '."""
    url, _ = tool_server
    tool = ToolConfig(url=url + "/chunked", parameters=TICKETS)
    cfg = Config(tools={"t": tool}, tool_loop=ToolLoopConfig(allowed_hosts=[url.split("/")[2]]))
    box = Toolbox(cfg)
    async with aiohttp.ClientSession() as session:
        r = await box.run(box.tools["t"], '{"q": "x"}', session)
    assert r.ok and json.loads(r.text) == {"tickets": ["T-1", "T-2"]}


def test_config_refuses_disallowed_host_and_unknown_tier(tmp_path: Path) -> None:
    doc = base_config(
        tmp_path,
        {},
        tools={
            "evil": {"url": "http://169.254.169.254/latest", "parameters": {"type": "object"}},
            "both": {"builtin": "time.now", "url": "http://127.0.0.1:1/x"},
            "t": {"builtin": "time.now", "tiers": ["nope"]},
        },
        tool_loop={"allowed_hosts": ["127.0.0.1:1"]},
    )
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "c.yaml", doc))
    text = str(e.value)
    assert "tools.evil.url: host 169.254.169.254:80 is not in tool_loop.allowed_hosts" in text
    assert "tools.both: exactly one of builtin or url" in text
    assert "tools.t.tiers[0]: unknown tier 'nope'" in text


# --- end to end ---------------------------------------------------------------------------------


async def test_two_round_loop_answers_with_usage_summed_and_rows_linked(tmp_path: Path, fake: FakeProc) -> None:
    ctl = {"tool_call": {"name": "math_eval", "arguments": {"expression": "6*7"}}, "after_tool": {"echo_tool": True}}
    async with run_llmd(config(tmp_path, fake)) as llmd:
        status, doc, _ = await post(llmd.url, chat(["math.eval", "time.now"], ctl), rid="loop-1")
        assert status == 200, doc
        msg = doc["choices"][0]["message"]
        assert json.loads(msg["content"]) == {"result": 42}  # the fake answered what the tool told it
        assert doc["choices"][0]["finish_reason"] == "stop"
        await wait_for(lambda: len(rows(tmp_path)) >= 2)
        got = {r["request_id"]: r for r in rows(tmp_path)}
        assert set(got) == {"loop-1", "loop-1.r2"}
        r1, r2 = got["loop-1"], got["loop-1.r2"]
        assert doc["usage"]["prompt_tokens"] == r1["prompt_tokens"] + r2["prompt_tokens"]
        assert doc["usage"]["completion_tokens"] == r1["completion_tokens"] + r2["completion_tokens"]
        assert doc["usage"]["total_tokens"] == doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"]
        assert r1["status"] == r2["status"] == 200 and r1["outcome"] == r2["outcome"] == "ok"
        # what the model saw: the server tools as function tools, then the tool's result
        stats = await fake.stats()
        bodies = [b for b in stats["bodies"] if isinstance(b, dict)]
        assert [t["function"]["name"] for t in bodies[0]["tools"]] == ["math_eval", "time_now"]  # OpenAI-safe
        assert bodies[0]["tools"][0]["function"]["parameters"]["required"] == ["expression"]
        assert bodies[0]["stream"] is False
        second = bodies[1]["messages"]
        assert second[-2]["role"] == "assistant" and second[-2]["tool_calls"][0]["function"]["name"] == "math_eval"
        assert second[-1]["role"] == "tool" and json.loads(second[-1]["content"]) == {"result": 42}


async def test_rounds_stop_at_max_rounds(tmp_path: Path, fake: FakeProc) -> None:
    ctl = {"tool_call": {"name": "time_now", "arguments": {}}}  # the model never stops calling
    async with run_llmd(config(tmp_path, fake)) as llmd:
        status, doc, _ = await post(llmd.url, chat(["time.now"], ctl), rid="loop-max")
        assert status == 200, doc
        assert "tool_calls" not in doc["choices"][0]["message"]  # never the server's calls to the client
        await wait_for(lambda: len(rows(tmp_path)) >= 3)
        assert sorted(r["request_id"] for r in rows(tmp_path)) == ["loop-max", "loop-max.r2", "loop-max.r3"]
        bodies = [b for b in (await fake.stats())["bodies"] if isinstance(b, dict)]
        assert bodies[-1]["tool_choice"] == "none"


async def test_disallowed_and_unknown_tools_are_refused(tmp_path: Path, fake: FakeProc) -> None:
    async with run_llmd(config(tmp_path, fake)) as llmd:
        before = (await fake.stats())["requests"]
        status, doc, _ = await post(llmd.url, chat(["tickets.search"], {}), key="basic")
        assert status == 403 and doc["error"]["code"] == "tool_not_allowed"
        assert "tickets.search" in doc["error"]["message"]
        status, doc, _ = await post(llmd.url, chat(["nope"], {}), key="basic")
        assert status == 404 and doc["error"]["code"] == "tool_not_found"
        assert (await fake.stats())["requests"] == before  # nothing reached the model
        # GET /v1/tools: what each key may use, with schemas, never the url
        async with aiohttp.ClientSession() as s:
            async with s.get(llmd.url + "/v1/tools", headers={"Authorization": f"Bearer {KEYS['basic']}"}) as r:
                basic = await r.json()
            async with s.get(llmd.url + "/v1/tools", headers={"Authorization": f"Bearer {KEYS['prem']}"}) as r:
                prem = await r.json()
            async with s.get(llmd.url + "/v1/tools") as r:
                assert r.status == 401
        assert sorted(t["name"] for t in basic["data"]) == ["math.eval", "tickets.slow", "time.now"]
        names = sorted(t["name"] for t in prem["data"])
        assert names == ["math.eval", "tickets.search", "tickets.slow", "time.convert", "time.now"]
        search = next(t for t in prem["data"] if t["name"] == "tickets.search")
        assert search["parameters"] == TICKETS and search["type"] == "http" and "url" not in search


async def test_schema_failing_arguments_reach_the_model_as_a_tool_error(
    tmp_path: Path, fake: FakeProc, tool_server: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = tool_server
    ctl = {"tool_call": {"name": "tickets_search", "arguments": {"query": 3}}, "after_tool": {"echo_tool": True}}
    async with run_llmd(config(tmp_path, fake, url + "/search")) as llmd:
        status, doc, _ = await post(llmd.url, chat(["tickets.search"], ctl))
        assert status == 200, doc
        err = json.loads(doc["choices"][0]["message"]["content"])["error"]
        assert "missing required property 'q'" in err and "unexpected property 'query'" in err
        assert seen == []  # not executed


async def test_http_tool_on_an_allowed_host(
    tmp_path: Path, fake: FakeProc, tool_server: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = tool_server
    ctl = {"tool_call": {"name": "tickets_search", "arguments": {"q": "login"}}, "after_tool": {"echo_tool": True}}
    async with run_llmd(config(tmp_path, fake, url + "/search")) as llmd:
        status, doc, _ = await post(llmd.url, chat(["tickets.search"], ctl))
        assert status == 200, doc
        assert json.loads(doc["choices"][0]["message"]["content"]) == {"tickets": ["T-1 about login"]}
        assert seen == [{"body": {"q": "login"}, "auth": "Bearer tool-secret"}]
        # a tool that does not answer within its timeout_s is a tool error for the model
        ctl = {"tool_call": {"name": "tickets_slow", "arguments": {"q": "x"}}, "after_tool": {"echo_tool": True}}
        status, doc, _ = await post(llmd.url, chat(["tickets.slow"], ctl))
        assert status == 200, doc
        assert json.loads(doc["choices"][0]["message"]["content"]) == {"error": "timed out after 0.3s"}


async def test_http_tool_host_not_allowed_is_refused(
    tmp_path: Path, fake: FakeProc, tool_server: tuple[str, list[dict[str, Any]]]
) -> None:
    """The config with the tool's host outside allowed_hosts does not load; a runtime whose
    allowed_hosts changed under the tool (the second lock) refuses the call as a tool error."""
    url, seen = tool_server
    path = config(tmp_path, fake, url + "/search")
    doc = yaml.safe_load(path.read_text())
    doc["tool_loop"]["allowed_hosts"] = ["tools.internal:443"]
    with pytest.raises(ConfigError, match=r"is not in tool_loop\.allowed_hosts"):
        configfile.load(write_config(tmp_path / "bad.yaml", doc))
    ctl = {"tool_call": {"name": "tickets_search", "arguments": {"q": "a"}}, "after_tool": {"echo_tool": True}}
    async with run_llmd(path) as llmd:
        llmd.services.runtime.cfg.tool_loop.allowed_hosts = ["tools.internal:443"]
        status, body, _ = await post(llmd.url, chat(["tickets.search"], ctl))
        assert status == 200, body
        assert "not in tool_loop.allowed_hosts" in json.loads(body["choices"][0]["message"]["content"])["error"]
        assert seen == []


async def test_client_function_tools_go_back_to_the_client(tmp_path: Path, fake: FakeProc) -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = chat(["time.now"], {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}})
    body["tools"].append(weather)
    async with run_llmd(config(tmp_path, fake)) as llmd:
        status, doc, _ = await post(llmd.url, body, rid="client-tools")
        assert status == 200, doc
        call = doc["choices"][0]["message"]["tool_calls"][0]
        assert call["function"]["name"] == "get_weather" and doc["choices"][0]["finish_reason"] == "tool_calls"
        assert (await fake.stats())["requests"] == 1


async def test_streamed_rounds_reach_the_client_live_as_one_completion(tmp_path: Path, fake: FakeProc) -> None:
    """Every round streams upstream; the client reads one completion: one role chunk, the tool
    run as a comment, the final round's text as the model's own chunks (not re-chunked), one
    finish, the usage of both rounds summed, [DONE]; one id on every chunk."""
    ctl = {"tool_call": {"name": "math_eval", "arguments": {"expression": "2+2"}}, "after_tool": {"text": "it is four"}}
    body = chat(["math.eval"], ctl, stream=True, stream_options={"include_usage": True})
    async with run_llmd(config(tmp_path, fake)) as llmd:
        status, text, ctype = await post(llmd.url, body, rid="stream-1")
        assert status == 200 and ctype.startswith("text/event-stream")
        events = [e for e in text.split("\n\n") if e]
        assert ": tool math.eval ok" in events
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
        assert len({c["id"] for c in chunks}) == 1
        assert [c["choices"][0]["delta"].get("role") for c in chunks if c["choices"]].count("assistant") == 1
        deltas = [c["choices"][0] for c in chunks if c["choices"]]
        pieces = [d["delta"]["content"] for d in deltas if d["delta"].get("content")]
        assert pieces == ["it", " is", " four"]  # the model's own tokens, as it wrote them
        assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks if c["choices"])
        finishes = [d["finish_reason"] for d in deltas if d["finish_reason"]]
        assert finishes == ["stop"]
        assert chunks[-1]["usage"]["total_tokens"] > 0 and chunks[-1]["choices"] == []
        await wait_for(lambda: len(rows(tmp_path)) >= 2)
        got = {r["request_id"]: r for r in rows(tmp_path)}
        assert chunks[-1]["usage"]["completion_tokens"] == sum(r["completion_tokens"] for r in got.values())
        assert chunks[-1]["usage"]["prompt_tokens"] == sum(r["prompt_tokens"] for r in got.values())
        assert got["stream-1"]["stream"] == 1 and got["stream-1.r2"]["stream"] == 1
        assert all(r["token_method"] == "upstream" for r in got.values())
        bodies = [b for b in (await fake.stats())["bodies"] if isinstance(b, dict)]
        assert [b["stream"] for b in bodies] == [True, True]
        assert json.loads(bodies[1]["messages"][-1]["content"]) == {"result": 4}  # what the tool told
        assert all(b["stream_options"] == {"include_usage": True} for b in bodies)


async def test_streamed_loop_hands_client_tool_calls_over_at_the_end(tmp_path: Path, fake: FakeProc) -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = chat(["time.now"], {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}, stream=True)
    body["tools"].append(weather)
    async with run_llmd(config(tmp_path, fake)) as llmd:
        status, text, _ = await post(llmd.url, body)
        assert status == 200
        chunks = [json.loads(e[len("data: ") :]) for e in text.split("\n\n") if e.startswith("data: {")]
        calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
        assert len(calls) == 1 and calls[0][0]["index"] == 0  # the held pieces, joined, in one delta
        fn = calls[0][0]["function"]
        assert fn["name"] == "get_weather" and json.loads(fn["arguments"]) == {"city": "Paris"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert "usage" not in chunks[-1]  # the client did not ask for it
        assert text.endswith("data: [DONE]\n\n")


async def test_a_round_broken_mid_stream_ends_the_clients_stream_in_band(tmp_path: Path, fake: FakeProc) -> None:
    """Round 2 dies after some tokens: the client got round 2's first text live, then the
    error event; both rows are written, round 2's an upstream error."""
    ctl = {"tool_call": {"name": "time_now", "arguments": {}},
           "after_tool": {"text": "it is noon now and so on", "drop_after_tokens": 2}}
    async with run_llmd(config(tmp_path, fake)) as llmd:
        status, text, _ = await post(llmd.url, chat(["time.now"], ctl, stream=True), rid="broken")
        assert status == 200
        events = [e for e in text.split("\n\n") if e]
        assert json.loads(events[-1][len("data: ") :])["error"]["type"]
        assert "data: [DONE]" not in events
        await wait_for(lambda: len(rows(tmp_path)) >= 2)
        got = {r["request_id"]: r for r in rows(tmp_path)}
        assert got["broken.r2"]["outcome"] == "upstream_error" and got["broken"]["outcome"] == "upstream_error"
        assert got["broken.r2"]["completion_tokens"] >= 1


async def test_every_round_goes_through_the_keys_limits(tmp_path: Path, fake: FakeProc) -> None:
    """requests_per_minute 1: round 1 is admitted, round 2 is refused (429), not run around it."""
    ctl = {"tool_call": {"name": "time_now", "arguments": {}}, "after_tool": {"text": "noon"}}
    path = config(tmp_path, fake)
    doc = yaml.safe_load(path.read_text())
    doc["tiers"]["premium"] = {"requests_per_minute": 1, "max_concurrent": 1}
    async with run_llmd(write_config(path, doc)) as llmd:
        status, body, _ = await post(llmd.url, chat(["time.now"], ctl), rid="lim")
        assert status == 429, body
        assert (await fake.stats())["requests"] == 1
        await wait_for(lambda: len(rows(tmp_path)) >= 2)
        got = {r["request_id"]: r for r in rows(tmp_path)}
        assert got["lim.r2"]["outcome"] == "rejected_rate"
    # max_concurrent 1 alone: the rounds are sequential, each finds the slot of the last free
    doc["tiers"]["premium"] = {"max_concurrent": 1}
    async with run_llmd(write_config(path, doc)) as llmd:
        status, body, _ = await post(llmd.url, chat(["time.now"], ctl))
        assert status == 200 and body["choices"][0]["message"]["content"] == "noon"


async def test_stream_refused_round_is_an_in_band_error_and_names_must_not_collide(
    tmp_path: Path, fake: FakeProc
) -> None:
    ctl = {"tool_call": {"name": "time_now", "arguments": {}}, "after_tool": {"text": "noon"}}
    path = config(tmp_path, fake)
    doc = yaml.safe_load(path.read_text())
    doc["tiers"]["premium"] = {"requests_per_minute": 1}
    async with run_llmd(write_config(path, doc)) as llmd:
        status, text, ctype = await post(llmd.url, chat(["time.now"], ctl, stream=True))
        assert status == 200 and ctype.startswith("text/event-stream")
        events = [e for e in text.split("\n\n") if e]
        assert ": tool time.now ok" in events
        assert json.loads(events[-1][len("data: ") :])["error"]["code"] == "rate_limit_exceeded"
        # a client function tool under the name the model would see a server tool by
        clash = chat(["time.now"], {})
        clash["tools"].append({"type": "function", "function": {"name": "time_now", "parameters": {"type": "object"}}})
        status, body, _ = await post(llmd.url, clash, key="basic")
        assert status == 400 and body["error"]["param"] == "tools"


async def test_a_tiers_default_tools_run_for_requests_naming_none(tmp_path: Path, fake: FakeProc) -> None:
    """tiers.premium.default_tools: a plain chat request of the tier runs the loop; one with
    tool_choice "none", or of another tier, is relayed as sent; /v1/tools marks the defaults."""
    path = config(tmp_path, fake)
    doc = yaml.safe_load(path.read_text())
    doc["tiers"]["premium"] = {"default_tools": ["math.eval"]}
    ctl = {"tool_call": {"name": "math_eval", "arguments": {"expression": "3*3"}}, "after_tool": {"echo_tool": True}}
    plain = {"model": "m", "messages": [{"role": "user", "content": "3*3?"}], "max_tokens": 8, "fake": ctl}
    async with run_llmd(write_config(path, doc)) as llmd:
        status, body, _ = await post(llmd.url, plain, rid="dflt")
        assert status == 200, body
        assert json.loads(body["choices"][0]["message"]["content"]) == {"result": 9}
        bodies = [b for b in (await fake.stats())["bodies"] if isinstance(b, dict)]
        assert [t["function"]["name"] for t in bodies[0]["tools"]] == ["math_eval"]
        n = len(bodies)
        # tool_choice none: no tools added, the fake's tool call goes to the client as it is
        status, body, _ = await post(llmd.url, {**plain, "tool_choice": "none"})
        bodies = [b for b in (await fake.stats())["bodies"] if isinstance(b, dict)]
        assert status == 200 and len(bodies) == n + 1 and "tools" not in bodies[-1]
        status, body, _ = await post(llmd.url, plain, key="basic")  # another tier: relayed as sent
        bodies = [b for b in (await fake.stats())["bodies"] if isinstance(b, dict)]
        assert status == 200 and "tools" not in bodies[-1]
        async with aiohttp.ClientSession() as s:
            h = {"Authorization": f"Bearer {KEYS['prem']}"}
            async with s.get(llmd.url + "/v1/tools", headers=h) as r:
                listed = {t["name"]: t["default"] for t in (await r.json())["data"]}
        assert listed["math.eval"] is True and listed["time.now"] is False
    # a default the tier may not use, or that does not exist, is a config error
    doc["tiers"]["basic"] = {"default_tools": ["time.convert", "nope"]}
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "bad.yaml", doc))
    assert "tiers.basic.default_tools[0]: tool 'time.convert' is not allowed for tier 'basic'" in str(e.value)
    assert "tiers.basic.default_tools[1]: unknown tool 'nope'" in str(e.value)
