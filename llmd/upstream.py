"""Upstreams: llmd's own HTTP/1.1 client to the replicas, keep-alive connections per origin.

Only what the relay needs: a POST with headers and a body; the answer's status, headers and body,
whole or as it arrives (SSE), Content-Length, chunked or framed by the connection's end, gzip or
deflate decoded. An ``asyncio.Protocol`` per connection and ``httptools``' parser (llhttp, in C)
do the work that aiohttp's client spreads over a connector, a request and a response object,
trace hooks, cookie jars and a stream reader per request: about 2/3 of llmd's upstream CPU
per request (bench/README.md, "A leaner upstream client"). Health checks and tokenization stay
on aiohttp's ClientSession: they are off the request path.

Failures are ``UpstreamError``s: ``ConnectFailed`` (no connection: refused, unreachable, DNS),
``BadResponse`` (not HTTP, or a body that cannot be decoded), ``Disconnected`` (the connection
ended before the answer did). Timeouts are the caller's (``asyncio.timeout`` around the awaits);
only the connect timeout is here, as ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from urllib.parse import urlsplit

import httptools

# An idle connection older than this is closed instead of reused: llama-server (cpp-httplib) and
# vLLM (uvicorn) close theirs after 5 s, and a request sent as the server closes would fail.
KEEPALIVE_S = 4.0
HIGH_WATER = 1 << 20  # buffered body bytes above which the socket is not read until the caller reads


class UpstreamError(Exception):
    """The replica did not give a whole HTTP answer."""


class ConnectFailed(UpstreamError):
    """No connection at all: the server is not there (yet, or any more)."""


class BadResponse(UpstreamError):
    """The bytes are not an HTTP answer (or its body cannot be decoded)."""


class Disconnected(UpstreamError):
    """The connection ended (closed or reset) before the answer did."""


class _Target:
    """A URL taken apart once: where to connect and what to ask for."""

    __slots__ = ("host", "host_header", "key", "path", "port", "tls")

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.tls else 80)
        self.key = (self.tls, self.host, self.port)
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        default = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default else f"{host}:{self.port}"


class Response:
    """One answer on one connection. ``read()`` the whole body or ``readany()`` until b"";
    ``release()`` always: a connection whose answer was read to its end goes back to the pool,
    any other is closed."""

    __slots__ = (
        "_complete",
        "_conn",
        "_decoder",
        "_exc",
        "_parts",
        "_released",
        "_size",
        "_whole",
        "headers",
        "status",
    )

    def __init__(self, conn: _Conn) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}  # lower-case names; a repeated header keeps its last value
        self._conn = conn
        self._parts: list[bytes] = []  # body bytes received and not yet read (still encoded)
        self._size = 0
        self._complete = False
        self._exc: UpstreamError | None = None
        self._decoder: zlib._Decompress | None = None
        self._released = False
        self._whole = False  # read() wants it all: no high-water mark

    @property
    def complete(self) -> bool:
        """The whole body is here (or the answer failed): reading it will not wait."""
        return self._complete or self._exc is not None

    async def read(self) -> bytes:
        """The whole body, decoded."""
        conn = self._conn
        self._whole = True
        conn.resume()
        while not self._complete:
            if self._exc is not None:
                raise self._exc
            await conn.wait()
        if self._exc is not None:
            raise self._exc
        raw = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts.clear()
        return self._decode(raw, True)

    async def readany(self) -> bytes:
        """Whatever body bytes have arrived (waiting for some), decoded; b"" once the body ended."""
        conn = self._conn
        while True:
            if self._parts:
                raw = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
                self._parts.clear()
                self._size = 0
                conn.resume()
                data = self._decode(raw, self._complete)
                if data or self._complete:  # a compressed read may decode to nothing yet
                    return data
                continue
            if self._exc is not None:
                raise self._exc
            if self._complete:
                return self._decode(b"", True) if self._decoder is not None else b""
            await conn.wait()

    def _decode(self, raw: bytes, last: bool) -> bytes:
        d = self._decoder
        if d is None:
            return raw
        try:
            data = d.decompress(raw)
            if last:
                self._decoder = None  # flushed: later reads have nothing more to decode
                data += d.flush()
            return data
        except zlib.error as e:
            raise BadResponse(f"undecodable {self.headers.get('content-encoding')} body: {e}") from None

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._conn.done(self._complete and self._exc is None)


class _Conn(asyncio.Protocol):
    """One keep-alive connection to one origin: at most one request at a time (no pipelining)."""

    def __init__(self, pool: Upstreams, key: tuple[bool, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None  # the answer being read
        self.closed = False
        self.keep_alive = True
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._framed = True  # False: the body ends with the connection (no length, not chunked)

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are API-compatible only

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None or resp._complete:  # nothing asked: a server that talks out of turn is not reused
            self._close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the upstream switched protocols"))
        except httptools.HttpParserError as e:
            self._fail(BadResponse(f"not an HTTP answer: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.resp
        if resp is not None and not resp._complete and resp._exc is None:
            if exc is None and resp.status and not self._framed:
                resp._complete = True  # a body framed by the connection: its end is the body's end
                self.keep_alive = False
                self._wake()
            elif exc is None:
                self._fail(Disconnected("the upstream closed the connection before its answer ended"))
            else:
                self._fail(Disconnected(f"the connection broke: {type(exc).__name__}: {exc}"))

    # --- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._names.append(name)
        self._values.append(value)

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is None or resp._complete:
            self.keep_alive = False  # a second answer to one request: not a server to reuse
            return
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self._names.clear()
            self._values.clear()
            return
        headers = resp.headers
        for n, v in zip(self._names, self._values, strict=True):
            headers[n.decode("latin-1").lower()] = v.decode("latin-1")
        self._names.clear()
        self._values.clear()
        enc = headers.get("content-encoding", "identity").strip().lower()
        if enc in ("gzip", "x-gzip"):
            resp._decoder = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or zlib header
        elif enc == "deflate":
            resp._decoder = _Deflate()  # type: ignore[assignment]
        elif enc not in ("identity", ""):
            self._fail(BadResponse(f"unsupported Content-Encoding {enc!r}"))  # br, zstd: not asked for
            return
        self._framed = (
            "content-length" in headers
            or "chunked" in headers.get("transfer-encoding", "").lower()
            or status in (204, 304)
        )
        resp.status = status
        self._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is None or resp._complete:
            return
        resp._parts.append(body)
        resp._size += len(body)
        if resp._size > HIGH_WATER and not resp._whole and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None or not resp.status:
            return  # the end of an interim answer
        if resp._complete:
            self.keep_alive = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        resp._complete = True
        self._wake()

    # --- for Response and Upstreams

    async def wait(self) -> None:
        """Until the parser or the connection has news for the current answer."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def done(self, whole: bool) -> None:
        """The caller is through with the answer: reuse the connection only if the answer was
        read to its end and both sides keep it alive."""
        self.resp = None
        if whole and self.keep_alive and not self.closed and not self._paused:
            self.idle_since = time.monotonic()
            self.pool._put(self)
        else:
            self._close()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: UpstreamError) -> None:
        resp = self.resp
        if resp is not None and resp._exc is None:
            resp._exc = exc
        self._close()
        self._wake()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Deflate:
    """Content-Encoding: deflate is zlib-wrapped by the RFC and raw in some servers: tell by the
    first two bytes (a zlib header is a multiple of 31), as browsers and aiohttp do."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: zlib._Decompress | None = None

    def decompress(self, data: bytes) -> bytes:
        if self._d is None:
            if len(data) < 2:
                return b"" if not data else self._start(-15).decompress(data)
            zlib_header = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._start(15 if zlib_header else -15)
        assert self._d is not None
        return self._d.decompress(data)

    def flush(self) -> bytes:
        return self._d.flush() if self._d is not None else b""

    def _start(self, wbits: int) -> zlib._Decompress:
        self._d = zlib.decompressobj(wbits=wbits)
        return self._d


class Upstreams:
    """Keep-alive connections per origin (scheme, host, port), unbounded like the relay's
    session was (admission bounds what is in flight)."""

    def __init__(self, keepalive_s: float = KEEPALIVE_S) -> None:
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple[bool, str, int], list[_Conn]] = {}
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(self, url: str, body: bytes, headers: dict[str, str], connect_s: float) -> Response:
        """Send the request and wait for the answer's head. Raises ``ConnectFailed``,
        ``BadResponse``, ``Disconnected``, or ``TimeoutError`` after ``connect_s`` connecting."""
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 4096:  # replicas come and go with new ports: do not grow forever
                self._targets.clear()
            target = self._targets[url] = _Target(url)
        conn = self._take(target.key)
        fresh = conn is None
        if conn is None:
            conn = await self._connect(target, connect_s)
        lines = [f"POST {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\nContent-Length: {len(body)}\r\n"]
        for k, v in headers.items():
            lines.append(f"{k}: {v}\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        if head.count("\n") != len(lines) + 2 or head.count("\r") != len(lines) + 2:
            conn.done(True)  # nothing was sent: the connection is as good as before
            raise ValueError("a header name or value contains a line break")
        resp = conn.resp = Response(conn)
        conn._framed = True
        assert conn.transport is not None
        raw = head.encode("utf-8", "surrogateescape")  # the bytes aiohttp's server decoded, as they came
        conn.transport.write(raw + body if len(body) < 65536 else raw)
        if len(body) >= 65536:
            conn.transport.write(body)  # no copy of a big body
        try:
            while not resp.status:
                if resp._exc is not None:
                    raise resp._exc
                await conn.wait()
        except Disconnected as e:
            resp.release()
            if fresh:
                # Accepted, then closed without a word: a dying server's listening socket still
                # takes connections for a moment. It is going away, as if it had refused.
                raise ConnectFailed(f"{target.host}:{target.port} closed a new connection unanswered: {e}") from e
            raise
        except BaseException:
            resp.release()  # cancelled or failed before the head: the connection cannot be reused
            raise
        return resp

    def _take(self, key: tuple[bool, str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        limit = time.monotonic() - self.keepalive_s
        while idle:
            conn = idle.pop()  # the most recent: the least likely to have been closed by the server
            if not conn.closed and conn.idle_since >= limit:
                return conn
            conn._close()
        return None

    def _put(self, conn: _Conn) -> None:
        self._idle.setdefault(conn.key, []).append(conn)

    async def _connect(self, target: _Target, connect_s: float) -> _Conn:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if target.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(connect_s):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, target.key),
                    target.host,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls else None,
                )
        except OSError as e:  # refused, unreachable, DNS (socket.gaierror), TLS handshake
            raise ConnectFailed(f"cannot connect to {target.host}:{target.port}: {e}") from e
        return conn

    def close(self) -> None:
        """Close every idle connection (those in use close when their answer is released)."""
        for idle in self._idle.values():
            for conn in idle:
                conn._close()
        self._idle.clear()
