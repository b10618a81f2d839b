"""llmd/upstream.py on a real loopback socket: framing (Content-Length, chunked, the connection's
end), encodings, keep-alive reuse, and each way an answer can fail, as the relay sees them."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from llmd.upstream import BadResponse, ConnectFailed, Disconnected, Upstreams
from tests.fakeproc import free_port

HEADERS = {"Content-Type": "application/json", "X-Request-ID": "r1", "Accept-Encoding": "identity"}

# What the server does after reading one request: write these pieces (bytes, or a float to sleep),
# then "keep" the connection, "close" it or "reset" it.
Script = Callable[[int], tuple[list[bytes | float], str]]


@dataclass
class Server:
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0


def answer(body: bytes, extra: str = "", status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def chunked(*parts: bytes, extra: str = "") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n{extra}\r\n".encode()
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@contextlib.asynccontextmanager
async def serve(script: Script) -> AsyncIterator[Server]:
    srv = Server()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        srv.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                srv.requests.append(head + await reader.readexactly(length))
                pieces, then = script(len(srv.requests))
                for p in pieces:
                    if isinstance(p, float):
                        await writer.drain()
                        await asyncio.sleep(p)
                    else:
                        writer.write(p)
                await writer.drain()
                if then == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if then == "close":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        server.close()


def url(srv: Server) -> str:
    return f"http://127.0.0.1:{srv.port}/v1/chat/completions"


async def test_whole_answer_and_reuse() -> None:
    ups = Upstreams()
    async with serve(lambda n: ([answer(b'{"n":%d}' % n, "Content-Type: application/json\r\n")], "keep")) as srv:
        for i in range(1, 4):
            resp = await ups.post(url(srv), b'{"x":1}', HEADERS, 5)
            assert resp.status == 200 and resp.headers["content-type"] == "application/json"
            assert await resp.read() == b'{"n":%d}' % i
            resp.release()
        assert srv.connections == 1  # one keep-alive connection for all three
        req = srv.requests[0]
        assert req.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nContent-Length: 7\r\n" in req and b"\r\nX-Request-ID: r1\r\n" in req and req.endswith(b'{"x":1}')
    ups.close()


async def test_chunked_stream_arrives_as_it_is_sent() -> None:
    ups = Upstreams()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces: list[bytes | float] = [head, b"7\r\ndata: 1\r\n", 0.2, b"7\r\ndata: 2\r\n0\r\n\r\n"]
    async with serve(lambda n: (pieces, "keep")) as srv:
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        first = await asyncio.wait_for(resp.readany(), 0.15)  # before the server's pause ends
        assert first == b"data: 1"
        rest = b""
        while data := await resp.readany():
            rest += data
        assert rest == b"data: 2" and await resp.readany() == b""
        resp.release()
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)  # the connection was reused
        assert await resp.read() == b"data: 1data: 2"
        resp.release()
        assert srv.connections == 1
    ups.close()


async def test_body_framed_by_the_connection_end() -> None:
    ups = Upstreams()
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: a\n\n"
    async with serve(lambda n: ([raw, 0.05, b"data: b\n\n"], "close")) as srv:
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        assert await resp.read() == b"data: a\n\ndata: b\n\n"
        resp.release()
    ups.close()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
async def test_compressed_answers_are_decoded(encoding: str) -> None:
    ups = Upstreams()
    text = b'{"choices": []}' * 50
    if encoding == "gzip":
        body = gzip.compress(text)
    elif encoding == "deflate":
        body = zlib.compress(text)
    else:
        c = zlib.compressobj(wbits=-15)
        body = c.compress(text) + c.flush()
    name = "gzip" if encoding == "gzip" else "deflate"
    async with serve(lambda n: ([answer(body, f"Content-Encoding: {name}\r\n")], "keep")) as srv:
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        assert await resp.read() == text
        resp.release()
    # A compressed stream, cut in small chunks: decoded piece by piece, nothing lost at the end.
    gz = gzip.compress(text)
    parts = [gz[i : i + 7] for i in range(0, len(gz), 7)]
    async with serve(lambda n: ([chunked(*parts, extra="Content-Encoding: gzip\r\n")], "keep")) as srv:
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        out = b""
        while data := await resp.readany():
            out += data
        assert out == text
        resp.release()
    ups.close()


async def test_refused_is_connect_failed() -> None:
    ups = Upstreams()
    with pytest.raises(ConnectFailed):
        await ups.post(f"http://127.0.0.1:{free_port()}/v1/x", b"{}", HEADERS, 5)


@pytest.mark.parametrize(
    ("pieces", "then", "error"),
    [
        ([b"SSH-2.0-OpenSSH_9.2p1 garbage\r\n\r\n"], "keep", BadResponse),
        ([], "close", ConnectFailed),  # a new connection closed unanswered: a server going away
        ([], "reset", ConnectFailed),
        ([answer(b"x", "Content-Encoding: br\r\n")], "keep", BadResponse),
    ],
)
async def test_failures_before_the_head(pieces: list[bytes | float], then: str, error: type[Exception]) -> None:
    ups = Upstreams()
    async with serve(lambda n: (pieces, then)) as srv:
        with pytest.raises(error):
            await asyncio.wait_for(ups.post(url(srv), b"{}", HEADERS, 5), 5)


@pytest.mark.parametrize("then", ["close", "reset"])
async def test_failures_mid_body(then: str) -> None:
    ups = Upstreams()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    async with serve(lambda n: ([head, b"x" * 100, 0.05], then)) as srv:
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        with pytest.raises(Disconnected):
            await asyncio.wait_for(resp.read(), 5)
        resp.release()
    async with serve(lambda n: ([chunked(b"data: 1\n\n")[:-5], 0.05], then)) as srv:
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        with pytest.raises(Disconnected):
            while await asyncio.wait_for(resp.readany(), 5):
                pass
        resp.release()


async def test_a_kept_connection_closed_unanswered_is_disconnected() -> None:
    # The first answer keeps the connection; the second request on it gets nothing: the server
    # was there, so it is not "refused" (the relay may retry elsewhere, not wait for a restart).
    ups = Upstreams()
    async with serve(lambda n: ([answer(b"ok")], "keep") if n == 1 else ([], "reset")) as srv:
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        assert await resp.read() == b"ok"
        resp.release()
        with pytest.raises(Disconnected):
            await ups.post(url(srv), b"{}", HEADERS, 5)
        assert srv.connections == 1
    ups.close()


async def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    ups = Upstreams()
    async with serve(lambda n: ([answer(b"partly")[:-2], 0.3, b"ly"], "keep")) as srv:
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.read(), 0.05)  # as the relay's total_s would
        resp.release()
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        assert await resp.read() == b"partly"
        resp.release()
        assert srv.connections == 2
    ups.close()


async def test_interim_answer_and_connection_close() -> None:
    ups = Upstreams()
    pieces: list[bytes | float] = [b"HTTP/1.1 100 Continue\r\n\r\n", answer(b"ok", "Connection: close\r\n")]
    async with serve(lambda n: (pieces, "close")) as srv:
        for _ in range(2):
            resp = await ups.post(url(srv), b"{}", HEADERS, 5)
            assert resp.status == 200 and await resp.read() == b"ok"
            resp.release()
        assert srv.connections == 2  # Connection: close is not reused
    ups.close()


async def test_status_and_headers_of_an_error_answer() -> None:
    ups = Upstreams()
    async with serve(lambda n: ([answer(b"busy", "Retry-After: 3\r\n", "503 Service Unavailable")], "keep")) as srv:
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        assert resp.status == 503 and resp.headers["retry-after"] == "3" and await resp.read() == b"busy"
        resp.release()
    ups.close()


async def test_a_header_with_a_line_break_is_refused() -> None:
    ups = Upstreams()
    async with serve(lambda n: ([answer(b"ok")], "keep")) as srv:
        with pytest.raises(ValueError):
            await ups.post(url(srv), b"{}", {**HEADERS, "X-Evil": "a\r\nHost: other"}, 5)
        assert srv.requests == []
    ups.close()


async def test_big_bodies_whole_and_streamed() -> None:
    # Past the high-water mark a stream is read only as fast as the caller reads; a whole read
    # takes it all. Both get every byte, in order.
    ups = Upstreams()
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB
    streamed = chunked(*[big[i : i + 65536] for i in range(0, len(big), 65536)])
    async with serve(lambda n: ([answer(big) if n == 1 else streamed], "keep")) as srv:
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        assert await resp.read() == big
        resp.release()
        resp = await ups.post(url(srv), b"{}", HEADERS, 5)
        out = []
        while data := await resp.readany():
            out.append(data)
            await asyncio.sleep(0.001)  # a slow client
        assert b"".join(out) == big
        resp.release()
        assert srv.connections == 1
    ups.close()


async def test_an_idle_connection_past_keepalive_is_not_reused() -> None:
    ups = Upstreams(keepalive_s=0.05)
    async with serve(lambda n: ([answer(b"ok")], "keep")) as srv:
        for _ in range(2):
            resp = await ups.post(url(srv), b"{}", HEADERS, 5)
            assert await resp.read() == b"ok"
            resp.release()
            await asyncio.sleep(0.1)
        assert srv.connections == 2
    ups.close()
