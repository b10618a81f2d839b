"""A small pipelined Redis client for the limit scripts: one connection, every call written in the
tick it is made (calls of one tick leave in one write), replies matched in order (RESP2, parsed
by ``hiredis``, Redis's own C parser).

Why not redis-py's asyncio client: at c=16 it cost llmd ~180 us of CPU per admission + settle
(connection pool checkout, per-call timeouts, command packing in Python), as much as the whole
relay; this costs a fraction (bench/stores_bench.py). It does only what llmd needs: EVALSHA with
a SCRIPT LOAD on NOSCRIPT, AUTH and SELECT from the URL, and plain commands for ``llmd check``.

Failures are ``StoreError``: a refused or lost connection, or no reply within the timeout (the
connection is then closed, failing every call on it: a Redis that does not answer one call is
not trusted with the next). The next call connects afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis


class StoreError(ConnectionError):
    """Redis cannot be reached or did not answer in time, or refused a command."""


class ReplyError(StoreError):
    """Redis answered with an error (a script's bug, a wrong type): it is reachable."""


def pack(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._replies(data)
        except (hiredis.ProtocolError, IndexError) as e:
            # Not RESP, or a reply nobody asked for: nothing later on this stream can be matched
            # to its call. Close it; the pending calls fail as StoreErrors and the next connects anew.
            self.fail(f"malformed reply from Redis: {type(e).__name__}: {e or 'unexpected reply'}")

    def fail(self, why: str) -> None:
        self.lost = True
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(StoreError(why))
        self.close()

    def _replies(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            fut = self.waiters.popleft()
            if fut.done():
                continue  # its caller gave up (cancelled)
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(ReplyError(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(StoreError(f"connection lost: {exc or 'closed by the server'}"))

    def call(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self.lost or self.transport is None:
            raise StoreError("not connected")
        fut = asyncio.get_running_loop().create_future()
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(pack(args))
        self.waiters.append(fut)
        return fut

    def _flush(self) -> None:
        data, self.out = b"".join(self.out), []
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class RespClient:
    def __init__(self, url: str, timeout_s: float) -> None:
        u = urlsplit(url)
        if u.scheme not in ("redis", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {u.scheme!r} (redis:// or unix://)")
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 6379
        self.path = u.path if u.scheme == "unix" else None
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password) if u.password else None
        db = u.path.strip("/") if u.scheme == "redis" else ""
        self.db = int(db) if db else 0
        self.timeout_s = timeout_s
        self._conn: _Conn | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()
        self._shas: dict[str, str] = {}
        self.connections = 0  # made since start: more than one means Redis was away (maybe restarted)
        self.on_connect: Callable[[int], None] | None = None  # called with ``connections`` after each

    async def _connection(self) -> _Conn:
        conn = self._conn
        if conn is not None and not conn.lost:
            return conn
        async with self._connecting:
            if self._conn is not None and not self._conn.lost:
                return self._conn
            loop = asyncio.get_running_loop()
            conn = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    if self.path is not None:
                        _, conn = await loop.create_unix_connection(_Conn, self.path)
                    else:
                        _, conn = await loop.create_connection(_Conn, self.host, self.port)
                    if self.password is not None:
                        auth = (self.username, self.password) if self.username else (self.password,)
                        await conn.call(("AUTH", *auth))
                    if self.db:
                        await conn.call(("SELECT", self.db))
            except (OSError, TimeoutError) as e:
                if conn is not None:  # AUTH or SELECT refused, or no answer: not kept, so closed
                    conn.close()
                raise StoreError(f"cannot connect: {type(e).__name__}: {e}") from e
            self._conn = conn
            self.connections += 1
            if self.on_connect is not None:
                self.on_connect(self.connections)
            return conn

    async def call(self, *args: Any) -> Any:
        conn = await self._connection()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await conn.call(args)
        except TimeoutError:
            conn.close()
            raise StoreError(f"no reply within {self.timeout_s * 1000:g} ms") from None

    async def script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script first when Redis does not know it (a restarted Redis)."""
        sha = self._shas.get(source) or self._shas.setdefault(source, hashlib.sha1(source.encode()).hexdigest())
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except ReplyError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        await self.call("SCRIPT", "LOAD", source)
        return await self.call("EVALSHA", sha, len(keys), *keys, *args)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
