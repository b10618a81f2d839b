"""resp.py against a hostile Redis: a tiny asyncio server in this process that answers with
garbage, drops the connection mid-reply, or refuses AUTH. Every case is a StoreError for the
caller (the limiter then fails open or closed as configured), never a hang or another error,
and the client leaves no connection behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from llmd.resp import ReplyError, RespClient, StoreError

# request bytes -> reply bytes, then close the connection when the reply ends with CLOSE
Answer = Callable[[bytes], bytes]
CLOSE = b"<close>"


@contextlib.asynccontextmanager
async def fake_redis(answer: Answer) -> AsyncIterator[tuple[int, list[asyncio.Future[None]]]]:
    """A server on a free port; yields it with one future per connection, done at its EOF."""
    closed: list[asyncio.Future[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        eof = asyncio.get_running_loop().create_future()
        closed.append(eof)
        try:
            while data := await reader.read(65536):
                reply = answer(data)
                writer.write(reply.removesuffix(CLOSE))
                await writer.drain()
                if reply.endswith(CLOSE):
                    break
            else:
                eof.set_result(None)
                return
            writer.transport.abort()
        except ConnectionError:
            pass
        finally:
            if not eof.done():
                eof.set_result(None)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], closed
    finally:
        server.close()
        for fut in closed:
            fut.cancel()


@pytest.mark.parametrize(
    "reply",
    [
        b"!not resp at all\r\n",  # an unknown type byte: hiredis.ProtocolError
        b"$-5\r\n",  # a bad bulk length
        b"$100\r\nabc" + CLOSE,  # the connection drops in the middle of a reply
        CLOSE,  # dropped before any reply
    ],
)
async def test_malformed_or_dropped_reply_is_a_store_error(reply: bytes) -> None:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []  # asyncio's "Fatal error: protocol.data_received() call failed"
    loop.set_exception_handler(lambda _, ctx: unhandled.append(ctx))
    async with fake_redis(lambda _: reply) as (port, _):
        client = RespClient(f"redis://127.0.0.1:{port}", timeout_s=30)
        try:
            with pytest.raises(StoreError):
                await asyncio.wait_for(client.call("PING"), 10)
        finally:
            await client.close()
            loop.set_exception_handler(None)
    assert unhandled == []


async def test_unasked_reply_closes_the_connection() -> None:
    """Two replies to one call: the stream is out of step, so it is closed; the next call
    connects afresh instead of reading the stale reply as its own."""
    async with fake_redis(lambda _: b"+OK\r\n:1\r\n") as (port, closed):
        client = RespClient(f"redis://127.0.0.1:{port}", timeout_s=5)
        assert await client.call("PING") == b"OK"
        await asyncio.wait_for(closed[0], 10)
        assert await client.call("PING") == b"OK"
        assert len(closed) == 2
        await client.close()


async def test_refused_auth_closes_the_connection() -> None:
    """A wrong password is a StoreError, and each retry's connection is closed, not leaked."""
    async with fake_redis(lambda _: b"-WRONGPASS invalid username-password pair\r\n") as (port, closed):
        client = RespClient(f"redis://:secret@127.0.0.1:{port}", timeout_s=5)
        for _ in range(3):
            with pytest.raises(StoreError, match="WRONGPASS"):
                await client.call("PING")
        await asyncio.wait_for(asyncio.gather(*closed), 10)  # the server saw every one close
        assert len(closed) == 3
        await client.close()


async def test_reply_error_keeps_the_connection() -> None:
    async with fake_redis(lambda _: b"-ERR unknown command\r\n") as (port, closed):
        client = RespClient(f"redis://127.0.0.1:{port}", timeout_s=5)
        for _ in range(2):
            with pytest.raises(ReplyError, match="unknown command"):
                await client.call("NOPE")
        assert len(closed) == 1
        await client.close()
