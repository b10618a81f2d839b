"""The upstream side of relay_bench.py, each run as its own process:

    relay_upstreams.py mock                  # the raw mock: prints MOCK_PORT <port> once listening
    relay_upstreams.py floor UPSTREAM_PORT   # the bare aiohttp relay: prints FLOOR_PORT <port>

The mock answers POST /v1/chat/completions with a fixed body, or a fixed 8-event SSE stream when
the request has ``"stream": true`` (plus the usage chunk when ``include_usage`` is asked, like
llama-server). It must cost far less per request than any proxy in front of it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any, cast

MODEL = "bench"

# --- the fixed answers -----------------------------------------------------------------------------


def _completion_body() -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench0000000000000000000000",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "system_fingerprint": "b0-bench",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {
                        "role": "assistant",
                        "content": 'def reverse(s: str) -> str:\n    """Return s reversed."""\n    return s[::-1]\n',
                    },
                }
            ],
            "usage": {
                "prompt_tokens": 38,
                "completion_tokens": 24,
                "total_tokens": 62,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        },
        separators=(",", ":"),
    ).encode()


def _chunk(delta: dict[str, Any], finish: str | None, usage: dict[str, int] | None = None) -> bytes:
    doc: dict[str, Any] = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "system_fingerprint": "b0-bench",
        "choices": [] if usage else [{"index": 0, "finish_reason": finish, "delta": delta}],
    }
    if usage:
        doc["usage"] = usage
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def _stream_events(include_usage: bool) -> list[bytes]:
    """llama-server's shape: a role-only chunk, 6 token chunks, a finish chunk (8 events), then the
    usage-only chunk when asked for, then [DONE]."""
    events = [_chunk({"role": "assistant", "content": None}, None)]
    events += [_chunk({"content": piece}, None) for piece in ("def", " reverse", "(s", "):", " return", " s[::-1]")]
    events.append(_chunk({}, "stop"))
    if include_usage:
        events.append(_chunk({}, None, {"prompt_tokens": 38, "completion_tokens": 6, "total_tokens": 44}))
    events.append(b"data: [DONE]\n\n")
    return events


# --- the mock upstream (`relay_upstreams.py mock`) -------------------------------------------------


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def run_mock(host: str, port: int) -> None:
    """A deliberately minimal HTTP/1.1 server: no framework, precomputed responses, keep-alive.
    It must cost far less per request than any proxy in front of it, or it would be what we
    measure. Supports Content-Length request bodies only (wrk, aiohttp and nginx all send one)."""
    import uvloop

    body = _completion_body()
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    sse_head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    # One HTTP chunk per SSE event and one write per chunk: the proxy sees (close to) the
    # event-by-event arrival pattern of a real server instead of one coalesced blob.
    sse_plain = [_http_chunk(e) for e in _stream_events(False)] + [b"0\r\n\r\n"]
    sse_usage = [_http_chunk(e) for e in _stream_events(True)] + [b"0\r\n\r\n"]
    health = b'{"status":"ok"}'
    ok_health = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(health),
        health,
    )
    not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    unsupported = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    class Mock(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = b""
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's TCPTransport is not an asyncio.Transport subclass, only API-compatible.
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            t = self.transport
            assert t is not None
            buf = self.buf + data if self.buf else data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end].lower()
                if b"transfer-encoding:" in head:
                    t.write(unsupported)
                    t.close()
                    return
                length = 0
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    length = int(head[i + 17 : j if j >= 0 else len(head)])
                total = end + 4 + length
                if len(buf) < total:
                    break
                req = buf[end + 4 : total]
                buf = buf[total:]
                line = head[: head.find(b"\r\n")]
                if line.startswith(b"post /v1/chat/completions"):
                    if b'"stream":true' in req or b'"stream": true' in req:
                        t.write(sse_head)
                        for piece in sse_usage if b'"include_usage":true' in req else sse_plain:
                            t.write(piece)
                    else:
                        t.write(ok)
                elif line.startswith((b"get /health", b"get /v1/models")):
                    t.write(ok_health)
                else:
                    t.write(not_found)
                if b"\r\nconnection: close" in head:
                    t.close()
                    return
            self.buf = buf

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Mock, host, port, backlog=1024, reuse_address=True)
        bound = server.sockets[0].getsockname()[1]
        print(f"MOCK_PORT {bound}", flush=True)  # the parent reads the port from here
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        server.close()

    uvloop.run(main())


# --- the aiohttp floor (`relay_upstreams.py floor UPSTREAM_PORT`) ----------------------------------


def run_floor(upstream_port: int) -> None:
    """The least an aiohttp-on-uvloop relay can do: read the body, POST it upstream over one shared
    ClientSession, relay the answer (streams chunk by chunk). No auth, limits, ledger, metrics or
    logs. What llmd costs above this is llmd's own code; what this costs is aiohttp's."""
    import aiohttp
    import uvloop
    from aiohttp import web

    url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"

    async def relay(request: web.Request) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app["session"]
        body = await request.read()
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as up:
            if not up.headers.get("Content-Type", "").startswith("text/event-stream"):
                data = await up.read()
                return web.Response(body=data, status=up.status, content_type="application/json")
            out = web.StreamResponse()
            out.content_type = "text/event-stream"
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        app.router.add_post("/v1/chat/completions", relay)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        server = getattr(site, "_server", None)
        assert server is not None and server.sockets
        print(f"FLOOR_PORT {server.sockets[0].getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await app["session"].close()
        await runner.cleanup()

    uvloop.run(main())


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "mock":
        run_mock("127.0.0.1", 0)
    elif len(sys.argv) >= 3 and sys.argv[1] == "floor":
        run_floor(int(sys.argv[2]))
    else:
        sys.exit(__doc__)
