"""Regression tests for the exactness holes of issue 13: each failed on the code before its fix.

Upstreams here are small aiohttp or raw-socket servers on real loopback sockets, built to
misbehave in one precise way (no usage event, CRLF cut across reads, gzip, garbage status
line, cookies); the fake llama-server covers the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from llmd import configfile
from llmd.admission import Admission
from llmd.auth import Principal
from llmd.balancer import MAX_HASHED_BYTES, Balancer, block_hashes
from llmd.config import ConfigError, LimitFields
from llmd.limits import Limiter, MonthlyCounter
from llmd.months import month_of
from llmd.replica import Replica, ReplicaState
from tests.conftest import base_config, run_llmd, wait_for, write_config
from tests.fakeproc import FakeProc

T0 = 1_800_000_000.0
CHAT = {"model": "m", "messages": [{"role": "user", "content": "one two three four"}]}


# --- helpers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def upstream(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """An OpenAI-compatible upstream on a real socket whose every POST is ``handler``."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


def chunk(content: str | None, finish: str | None = None, *, spaced: bool = False, **extra: Any) -> bytes:
    doc = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"content": content} if content is not None else {}, "finish_reason": finish}
        ],
        **extra,
    }
    return json.dumps(doc, separators=(", ", ": ") if spaced else (",", ":")).encode()


def llmd_config(tmp_path: Path, urls: list[str], **sections: Any) -> Path:
    model = {"backend": "openai", "urls": urls, "slots": 4}
    return write_config(tmp_path / "config.yaml", base_config(tmp_path, {"m": model}, **sections))


def rows(llmd: Any) -> list[dict[str, Any]]:
    con = sqlite3.connect(llmd.services.runtime.cfg.usage.path)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("select * from requests order by ts")]
    finally:
        con.close()


async def wait_rows(llmd: Any, n: int, timeout_s: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        await llmd.services.ledger.flush()
        got = rows(llmd)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


async def sse_contents(resp: aiohttp.ClientResponse) -> tuple[list[str], list[dict[str, Any]]]:
    """(the content pieces, every JSON event) of a stream as a strict client reads it."""
    raw = await resp.read()
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    docs = [json.loads(e.removeprefix("data: ")) for e in events if e != "data: [DONE]"]
    pieces = [c["delta"].get("content") or "" for d in docs for c in d.get("choices", [])]
    return pieces, docs


# --- 1. max_tokens < 1 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value", [("max_tokens", -1_000_000_000), ("max_tokens", 0), ("max_completion_tokens", -5), ("n", 0)]
)
async def test_non_positive_max_tokens_and_n_are_400_and_reach_no_limit(
    fake: FakeProc, tmp_path: Path, field: str, value: int
) -> None:
    """1. A key with tokens_per_minute. 2. A body with a negative (or zero) max_tokens / n.
    3. 400 naming the field; no row, nothing reserved: the next request sees the full window."""
    path = llmd_config(
        tmp_path,
        [fake.url + "/v1"],
        tiers={"t": {"tokens_per_minute": 1000}},
        keys=[{"id": "k", "tier": "t", "sha256": _sha("sk-k")}],
    )
    async with run_llmd(path) as llmd, aiohttp.ClientSession() as s:
        hdr = {"Authorization": "Bearer sk-k"}
        async with s.post(llmd.url + "/v1/chat/completions", json={**CHAT, field: value}, headers=hdr) as r:
            body = await r.json()
            assert r.status == 400, body
            assert body["error"]["param"] == field and body["error"]["type"] == "invalid_request_error"
        async with s.post(llmd.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}, headers=hdr) as r:
            assert r.status == 200
            remaining = int(r.headers["x-ratelimit-remaining-tokens"])
            assert 0 < remaining < 1000
        assert len(await wait_rows(llmd, 1)) == 1


def test_a_reservation_is_never_below_the_prompt_estimate() -> None:
    lim = Limiter()
    p = Principal("k", "", LimitFields(tokens_per_minute=10_000), None)
    assert lim.reserve_for(p, 300, -1_000_000_000) >= 300
    assert lim.reserve_for(p, 300, 10, n=3) == 330


# --- 2. streams that end without a usage event ------------------------------------------------


async def test_stream_options_null_still_gets_usage_from_the_upstream(fake: FakeProc, tmp_path: Path) -> None:
    """``"stream_options": null`` in the client's body: llmd must re-encode (an inserted
    include_usage in front of the null would be overridden by the upstream's JSON parser, which
    keeps the last duplicate key) and then hide the usage chunk it asked for."""
    async with run_llmd(llmd_config(tmp_path, [fake.url + "/v1"])) as llmd, aiohttp.ClientSession() as s:
        body = {**CHAT, "stream": True, "stream_options": None, "max_tokens": 3}
        async with s.post(llmd.url + "/v1/chat/completions", json=body) as r:
            _pieces, docs = await sse_contents(r)
        assert all("usage" not in d or d["usage"] is None for d in docs)
        st = await fake.stats()
        assert st["last_body"]["stream_options"] == {"include_usage": True}
        assert json.loads(st["last_raw"])["stream_options"] == {"include_usage": True}
        (row,) = await wait_rows(llmd, 1)
        assert row["completion_tokens"] == 3 and row["token_method"] == "upstream"


def _stream_writer(
    parts: list[bytes], *, delay_s: float = 0.0
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for p in parts:
            await resp.write(p)
            await asyncio.sleep(delay_s)
        await resp.write_eof()
        return resp

    return handler


WIRE_SHAPES = {
    # compact JSON, "data: ", \n\n, one event per write: what llama-server sends (minus usage)
    "plain": [b"data: " + chunk(w) + b"\n\n" for w in ("a", "b", "c")] + [b"data: " + chunk(None, "stop") + b"\n\n"],
    # Python's default separators: "finish_reason": null with a space
    "spaced": [b"data: " + chunk(w, spaced=True) + b"\n\n" for w in ("a", "b", "c")]
    + [b"data: " + chunk(None, "stop", spaced=True) + b"\n\n"],
    # data: without the space, CRLF, and a \r\n pair cut across two writes
    "crlf-cut": [
        b"data:" + chunk("a") + b"\r",
        b"\n\r\n",
        b"data:" + chunk("b") + b"\r\n\r",
        b"\n",
        b"data: " + chunk("c") + b"\r\n\r\n",
        b"data: " + chunk(None, "stop") + b"\r\n\r\n",
    ],
    # several events in one write; the last token comes with its finish_reason (as vLLM may)
    "batched": [
        b"data: " + chunk("a") + b"\n\ndata: " + chunk("b") + b"\n\n",
        b"data: " + chunk("c", "stop") + b"\n\n",
    ],
}


@pytest.mark.parametrize("shape", sorted(WIRE_SHAPES))
async def test_stream_without_usage_is_billed_chunks_plus_prompt_whatever_the_wire(tmp_path: Path, shape: str) -> None:
    """1. An upstream streams three tokens in the given wire shape, with no usage event and no
    llama.cpp timings. 2. The client gets all three. 3. The row bills 3 completion tokens and a
    prompt estimate (a remote url cannot tokenize), and TTFT was observed."""
    parts = [*WIRE_SHAPES[shape], b"data: [DONE]\n\n"]
    async with upstream(_stream_writer(parts, delay_s=0.01)) as url:
        async with run_llmd(llmd_config(tmp_path, [url])) as llmd, aiohttp.ClientSession() as s:
            async with s.post(llmd.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status == 200
                raw = await r.read()
            text = raw.decode()
            events = b"".join(WIRE_SHAPES[shape]).replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n\n")
            assert text.count("data:") == events + 1 and "\r" not in text
            (row,) = await wait_rows(llmd, 1)
            assert row["completion_tokens"] == 3, row
            # the estimate: the raw messages bytes (aiohttp's json.dumps) / 4
            assert row["prompt_tokens"] == len(json.dumps(CHAT["messages"])) // 4
            assert row["token_method"] == "stream_chunks+estimate" and row["outcome"] == "ok"
            assert row["ttft_ms"] is not None


async def test_stream_cut_by_total_s_is_billed_what_was_relayed(tmp_path: Path) -> None:
    """1. An upstream sends two tokens then hangs. 2. routing.timeouts.total_s ends it: the
    client gets the in-band 504 error event. 3. The row says timeout with 2 completion tokens."""

    async def hang(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + chunk("a") + b"\n\ndata: " + chunk("b") + b"\n\n")
        await asyncio.sleep(30)
        return resp

    async with upstream(hang) as url:
        path = llmd_config(tmp_path, [url], routing={"timeouts": {"connect_s": 1, "first_byte_s": 5, "total_s": 1}})
        async with run_llmd(path) as llmd, aiohttp.ClientSession() as s:
            async with s.post(llmd.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                raw = (await r.read()).decode()
            assert '"code":"upstream_timeout"' in raw
            (row,) = await wait_rows(llmd, 1)
            assert (row["outcome"], row["completion_tokens"]) == ("timeout", 2)
            assert row["prompt_tokens"] > 0


# --- 3. compressed upstream answers ------------------------------------------------------------


async def test_gzip_upstream_answers_reach_the_client_decoded_and_billed(tmp_path: Path) -> None:
    """1. An upstream that gzips its answer whatever the request asks. 2. The client gets plain
    JSON without Content-Encoding. 3. The ledger has the usage. 4. llmd asked for identity."""
    seen: list[str] = []
    answer = {
        "id": "x",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
    }

    async def gz(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request.headers.get("Accept-Encoding", ""))
        return web.Response(
            body=gzip.compress(json.dumps(answer).encode()),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    async with upstream(gz) as url:
        async with run_llmd(llmd_config(tmp_path, [url])) as llmd, aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.post(llmd.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200 and "Content-Encoding" not in r.headers
                assert json.loads(await r.read()) == answer
            assert seen == ["identity"]
            (row,) = await wait_rows(llmd, 1)
            assert (row["prompt_tokens"], row["completion_tokens"]) == (7, 1)


# --- 4. admission head-of-line blocking ---------------------------------------------------------


def _replicas(*names: str) -> list[Replica]:
    return [Replica("m", n, "openai", url="http://x", slots=1, state=ReplicaState.READY) for n in names]


async def test_an_unplaceable_waiter_does_not_block_the_ones_behind_it() -> None:
    """1. Replicas a (busy) and b (free). 2. A retry waits, excluding b. 3. A new request
    arrives: it gets b at once instead of queueing behind the retry."""
    reps = _replicas("a", "b")
    adm = Admission("m", lambda: reps, Balancer("least-loaded"), max_queue=8, queue_timeout_s=2)
    first = await adm.acquire("k1", 0, [])
    busy, free = first.replica.name, ({"a", "b"} - {first.replica.name}).pop()
    retry = asyncio.create_task(adm.acquire("k1", 0, [], frozenset({free})))
    await asyncio.sleep(0.01)
    assert adm.depth == 1
    newcomer = await asyncio.wait_for(adm.acquire("k2", 0, []), 0.5)
    assert newcomer.replica.name == free
    adm.release(first.replica, "k1", 0.1)
    assert (await asyncio.wait_for(retry, 0.5)).replica.name == busy


async def test_a_replica_whose_ejection_runs_out_serves_the_queue() -> None:
    """1. The only replica is ejected for 0.2 s (and panic mode does not apply: a second one
    is busy). 2. A request queues. 3. When the ejection runs out it is served, with no other
    event to wake the queue."""
    reps = _replicas("a", "b")
    reps[0].ejected_until = time.monotonic() + 0.3
    adm = Admission("m", lambda: reps, Balancer("least-loaded"), max_queue=8, queue_timeout_s=3)
    busy = await adm.acquire("k1", 0, [])
    assert busy.replica.name == "b"  # a is ejected
    got = await asyncio.wait_for(adm.acquire("k2", 0, []), 2)
    assert got.replica.name == "a"


# --- 5. settling after the tpm window -----------------------------------------------------------


def test_tokens_of_a_request_longer_than_the_window_still_count() -> None:
    """1. A request reserves 100 tokens at T0. 2. It settles 5,000 tokens two minutes later.
    3. The window at that time holds the 4,900 beyond the reservation."""
    lim = Limiter()
    p = Principal("k", "", LimitFields(tokens_per_minute=100_000), None)
    g = lim.admit(p, 100, now=T0)
    g.release(5_000, now=T0 + 120)
    st = lim.states["k"]
    st.prune(T0 + 121)
    assert st.tokens_in_window == 4_900


def test_month_rolls_for_keys_without_a_monthly_limit() -> None:
    """Tokens settled after the month boundary by a key without a monthly limit belong to the
    new month, and a later admission of a limited key does not wipe them."""
    m = MonthlyCounter()
    later = T0 + 40 * 86400  # more than a month after T0
    lim = Limiter(monthly=m)
    unlimited = Principal("free", "", LimitFields(), None)
    limited = Principal("capped", "", LimitFields(monthly_tokens=10**9), None)
    lim.admit(limited, 10, now=T0).release(10, now=T0)
    g = lim.admit(unlimited, 10, now=T0)
    g.release(40, now=later)
    assert m.month == month_of(later) and m.used == {"free": 40}
    lim.admit(limited, 10, now=later + 1)
    assert m.used["free"] == 40


# --- 6. a reload that removes a model with queued requests ---------------------------------------


async def test_queued_requests_of_a_removed_model_get_503_not_500(fake: FakeProc, tmp_path: Path) -> None:
    """1. Model m2 with one slot, held by a slow request. 2. Another request waits in m2's
    queue. 3. A reload removes m2: the waiter gets 503 server_overloaded, not a 500."""
    models = {
        "m": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 4},
        "m2": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 1},
    }
    path = write_config(tmp_path / "config.yaml", base_config(tmp_path, models))
    async with run_llmd(path) as llmd, aiohttp.ClientSession() as s:
        slow = asyncio.create_task(
            s.post(llmd.url + "/v1/chat/completions", json={**CHAT, "model": "m2", "fake": {"delay_ms": 1500}})
        )
        await wait_for(lambda: llmd.services.pools["m2"].admission._replicas()[0].in_flight == 1)
        queued = asyncio.create_task(s.post(llmd.url + "/v1/chat/completions", json={**CHAT, "model": "m2"}))
        await wait_for(lambda: llmd.services.pools["m2"].admission.depth == 1)
        write_config(path, base_config(tmp_path, {"m": models["m"]}))
        assert await llmd.daemon.reload()
        r = await queued
        body = await r.json()
        assert r.status == 503 and body["error"]["code"] == "server_overloaded", body
        (await slow).release()


# --- 7. garbage from the upstream ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def garbage_server() -> AsyncIterator[str]:
    """Answers every connection with bytes that are not HTTP, then closes."""

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"BANANA 200 definitely not http\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(talk, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()


async def test_a_garbage_upstream_is_retried_and_alone_is_a_502(fake: FakeProc, tmp_path: Path) -> None:
    async with garbage_server() as bad:
        path = llmd_config(tmp_path, [bad, fake.url + "/v1"], routing={"strategy": "round-robin"})
        async with run_llmd(path) as llmd, aiohttp.ClientSession() as s:
            for _ in range(4):  # round-robin: some of these hit the garbage one first
                async with s.post(llmd.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}) as r:
                    assert r.status == 200, await r.text()
        (tmp_path / "2").mkdir()
        async with run_llmd(llmd_config(tmp_path / "2", [bad])) as llmd, aiohttp.ClientSession() as s:
            async with s.post(llmd.url + "/v1/chat/completions", json=CHAT) as r:
                body = await r.json()
                assert r.status == 502 and body["error"]["code"] == "upstream_unreachable"
            (row,) = await wait_rows(llmd, 1)
            assert (row["status"], row["outcome"]) == (502, "upstream_error")


# --- 8 + 11. headers on streams; upstream headers allow-listed -----------------------------------


async def test_streams_carry_cors_and_request_id_and_upstream_headers_stay_behind(tmp_path: Path) -> None:
    leaky = {
        "Set-Cookie": "session=upstream-secret",
        "openai-organization": "upstream-org",
        "x-ratelimit-remaining-requests": "9",
    }

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **leaky})
            await resp.prepare(request)
            await resp.write(b"data: " + chunk("a", "stop") + b"\n\ndata: [DONE]\n\n")
            return resp
        return web.json_response({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0}}, headers=leaky)

    async with upstream(handler) as url:
        path = llmd_config(tmp_path, [url], server={"cors_origins": ["https://ide.example"]})
        async with run_llmd(path) as llmd, aiohttp.ClientSession() as s:
            for stream in (True, False):
                async with s.post(
                    llmd.url + "/v1/chat/completions",
                    json={**CHAT, "stream": stream},
                    headers={"Origin": "https://ide.example", "X-Request-ID": "rid-1"},
                ) as r:
                    await r.read()
                    assert r.status == 200
                    assert r.headers["Access-Control-Allow-Origin"] == "https://ide.example"
                    assert r.headers["X-Request-ID"] == "rid-1"
                    for h in leaky:
                        assert h not in r.headers, (stream, h)


# --- 9. reload applies max_body_bytes, says what needs a restart -------------------------------


async def test_reload_applies_max_body_bytes_and_names_restart_only_settings(fake: FakeProc, tmp_path: Path) -> None:
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())  # type: ignore[method-assign]
    logging.getLogger("llmd").addHandler(handler)  # the reload resets the root's handlers
    doc = base_config(tmp_path, {"m": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 4}})
    path = write_config(tmp_path / "config.yaml", doc)
    big = {**CHAT, "padding": "x" * 5000}
    async with run_llmd(path) as llmd, aiohttp.ClientSession() as s:
        async with s.post(llmd.url + "/v1/chat/completions", json=big) as r:
            assert r.status == 200
        doc["server"]["max_body_bytes"] = 4096
        doc["usage"]["path"] = str(tmp_path / "other.sqlite3")
        write_config(path, doc)
        assert await llmd.daemon.reload()
        async with s.post(llmd.url + "/v1/chat/completions", json=big) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"

        # chunked (no Content-Length): counted while reading
        async def gen() -> AsyncIterator[bytes]:
            yield json.dumps(big).encode()

        async with s.post(
            llmd.url + "/v1/chat/completions", data=gen(), headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 413
    logging.getLogger("llmd").removeHandler(handler)
    assert any(m.startswith("usage.path changed") for m in seen), seen


# --- 10. open mode ------------------------------------------------------------------------------


def test_open_mode_on_a_non_loopback_address_is_refused(tmp_path: Path) -> None:
    doc = base_config(tmp_path, {}, server={"host": "0.0.0.0"})
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "config.yaml", doc))
    assert any(err.startswith("keys:") for err in e.value.errors)
    doc["server"]["host"] = "::1"
    configfile.load(write_config(tmp_path / "config.yaml", doc))


async def test_open_mode_admin_routes_answer_local_clients_only(fake: FakeProc, tmp_path: Path) -> None:
    """Without keys, /admin/* answers a client on this host, not one nginx forwards."""
    async with run_llmd(llmd_config(tmp_path, [fake.url + "/v1"])) as llmd, aiohttp.ClientSession() as s:
        async with s.get(llmd.url + "/admin/status") as r:
            assert r.status == 200
        async with s.get(llmd.url + "/admin/status", headers={"X-Forwarded-For": "203.0.113.7"}) as r:
            body = await r.json()
            assert r.status == 403 and body["error"]["code"] == "admin_required"


# --- 12. a slow-reading client hit by total_s --------------------------------------------------


async def test_a_slow_reader_cut_by_total_s_is_a_timeout_not_a_client_abort(tmp_path: Path) -> None:
    """1. The upstream streams big events fast. 2. The client never reads (small receive
    buffer), so llmd's writes block. 3. total_s passes: llmd ends the stream within its grace
    period and the row says timeout (the client did not leave)."""
    big = "x" * 60_000

    async def firehose(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(400):
                await resp.write(b"data: " + chunk(big) + b"\n\n")
        return resp

    async with upstream(firehose) as url:
        path = llmd_config(tmp_path, [url], routing={"timeouts": {"connect_s": 1, "first_byte_s": 5, "total_s": 1.5}})
        async with run_llmd(path) as llmd:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", llmd.daemon.port))
            body = json.dumps({**CHAT, "stream": True}).encode()
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            try:
                got = await wait_rows(llmd, 1, timeout_s=15)
            finally:
                sock.close()
            assert len(got) == 1, "llmd never ended the stream of a client that does not read"
            assert got[0]["outcome"] == "timeout" and got[0]["status"] == 200
            assert got[0]["completion_tokens"] > 0


# --- 13. prefix hashing of huge prompts ---------------------------------------------------------


def test_prefix_hashing_is_capped_and_forget_is_exact() -> None:
    huge = b"a" * (8 * 1024 * 1024)
    assert len(block_hashes(huge)) == MAX_HASHED_BYTES // 128
    reps = _replicas("a", "b")
    bal = Balancer("prefix-affinity")
    hashes = block_hashes(b"q" * 4096)
    bal.record(reps[0], hashes)
    assert bal.choose(reps, hashes).affinity == "hit"  # type: ignore[union-attr]
    bal.forget("a")
    assert bal.choose(reps, hashes).affinity == "miss"  # type: ignore[union-attr]
    bal.record(reps[0], hashes)  # it learns the prompt again after its restart
    assert bal.choose(reps, hashes).affinity == "hit"  # type: ignore[union-attr]


def _sha(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode()).hexdigest()


def test_a_deeply_nested_body_is_a_400_not_a_500() -> None:
    """msgspec raises RecursionError past its depth limit, in fields llmd skips too."""
    from llmd import envelope
    from llmd.errors import ApiError

    for body in (
        b'{"model":"m","messages":[],"x":' + b"[" * 30000 + b"]" * 30000 + b"}",
        b'{"model":"m","messages":[' + b"[" * 30000 + b"]" * 30000 + b"]}",
    ):
        with pytest.raises(ApiError) as e:
            envelope.decode(body, "messages")
        assert (e.value.status, e.value.code) == (400, "invalid_json")
