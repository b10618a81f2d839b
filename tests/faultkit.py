"""Tools for tests/test_fault_matrix.py: a misbehaving upstream, an SSE client, ledger and leak checks.

* ``RawUpstream``: an OpenAI-compatible upstream written on raw asyncio streams (not aiohttp's
  server), on a real loopback socket, so that it can do what no well-behaved HTTP server does:
  hang before or after its headers, reset the connection mid-body, send garbage instead of a
  status line, compress an answer nobody asked to be compressed. Its behaviour is ``mode``,
  set by the test; every request it reads is counted in ``requests``.
* ``call``: one request through llmd as a client sees it (status, headers, body, SSE events,
  token chunks, in-band errors), each with its own ``X-Request-ID`` to find its ledger row.
* ``ledger_rows`` / ``assert_no_leaks``: the rows of given request ids once written, and the
  in-flight counters (replicas, limiter, admission queues) back to zero.
* ``Matrix``: one line per fault row, appended as JSON to the file named by
  ``$LLMD_FAULT_MATRIX`` (bench/fault_matrix.py prints it as a table); a no-op without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import socket
import sqlite3
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

MATRIX_ENV = "LLMD_FAULT_MATRIX"
MSG = [{"role": "user", "content": "one two three four five six seven eight"}]
STREAM_TOKENS = 6  # token chunks a good stream of RawUpstream carries
GOOD_USAGE = {"prompt_tokens": 12, "completion_tokens": STREAM_TOKENS, "total_tokens": 12 + STREAM_TOKENS}


# --- the upstream ---------------------------------------------------------------------------------


@dataclass
class UpstreamRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def include_usage(self) -> bool:
        opts = self.body.get("stream_options")
        return isinstance(opts, dict) and bool(opts.get("include_usage"))


def chunk(i: int) -> bytes:
    """Stream event ``i``: one token, like llama-server's (``t0``, `` t1``, ...)."""
    doc = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"content": f"t{i}" if i == 0 else f" t{i}"}, "finish_reason": None}]}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def usage_chunk() -> bytes:
    doc = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
           "usage": GOOD_USAGE}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def whole_answer() -> bytes:
    text = " ".join(f"t{i}" for i in range(STREAM_TOKENS))
    doc = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
           "usage": GOOD_USAGE}
    return json.dumps(doc).encode()


def head(status: str = "200 OK", ctype: str = "application/json", length: int | None = None,
         extra: str = "") -> bytes:
    """A response head: with ``length`` a Content-Length body, else a chunked one (as
    llama-server and vLLM send their streams; see ``piece``)."""
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {ctype}"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def piece(data: bytes) -> bytes:
    """One chunk of a chunked body (an empty ``data`` is the last chunk)."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed or firewalled peer would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


Behaviour = Callable[["RawUpstream", UpstreamRequest, asyncio.StreamWriter], Awaitable[None]]


async def _ok(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter) -> None:
    if req.stream:
        w.write(head(ctype="text/event-stream"))
        for i in range(STREAM_TOKENS):
            w.write(piece(chunk(i)))
            await w.drain()
        if req.include_usage:
            w.write(piece(usage_chunk()))
        w.write(piece(b"data: [DONE]\n\n") + piece(b""))
    else:
        body = whole_answer()
        w.write(head(length=len(body)) + body)
    await w.drain()


async def _hang_headers(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter) -> None:
    await up.released.wait()


async def _hang_body(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter) -> None:
    # Headers promise a body (a stream, or 1000 bytes of JSON) that never comes.
    w.write(head(ctype="text/event-stream") if req.stream else head(length=1000))
    await w.drain()
    await up.released.wait()


async def _three_then(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter, end: str) -> None:
    """Headers and part of the body (3 token chunks, or 100 of 1000 promised bytes), then ``end``."""
    if req.stream:
        w.write(head(ctype="text/event-stream") + b"".join(piece(chunk(i)) for i in range(3)))
    else:
        w.write(head(length=1000) + whole_answer()[:100])
    await w.drain()
    if end == "hang":
        await up.released.wait()
    else:
        await asyncio.sleep(0.05)  # let the chunks leave before the RST discards the send buffer
        reset(w)


async def _hang_mid(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter) -> None:
    await _three_then(up, req, w, "hang")


async def _reset_mid(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter) -> None:
    await _three_then(up, req, w, "reset")


async def _reset_mid_unframed(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter) -> None:
    # HTTP/1.0-style framing (no Content-Length, not chunked: the body ends when the connection
    # does), 3 token chunks, then a RST: on the wire only the missing [DONE] tells it from an end.
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
    w.write(b"".join(chunk(i) for i in range(3)))
    await w.drain()
    await asyncio.sleep(0.05)
    reset(w)


async def _malformed_sse(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter) -> None:
    # Garbage lines, a non-JSON data field, binary junk, an unknown field, a JSON array, an
    # event with no blank line before the next: then two good token chunks and [DONE].
    events = [
        b"this is not sse at all\n\n",
        b"data: {not json\n\n",
        b"data: \xff\xfe\x00garbage\n\n",
        b"event: weird\nid: 7\nretry: x\n\n",
        b"data: [1, 2, 3]\n\n",
        b'data: {"choices": "not a list"}\n\n',
        b": a comment\n\n",
        chunk(0) + chunk(1),
        b"data: [DONE]\n\n",
    ]
    w.write(head(ctype="text/event-stream") + b"".join(piece(e) for e in events) + piece(b""))
    await w.drain()


async def _gzip(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter) -> None:
    # Compressed although llmd asked for identity (Accept-Encoding: identity).
    if req.stream:
        parts = [chunk(i) for i in range(STREAM_TOKENS)]
        if req.include_usage:
            parts.append(usage_chunk())
        body = gzip.compress(b"".join(parts) + b"data: [DONE]\n\n")
        w.write(head(ctype="text/event-stream", length=len(body), extra="Content-Encoding: gzip") + body)
    else:
        body = gzip.compress(whole_answer())
        w.write(head(length=len(body), extra="Content-Encoding: gzip") + body)
    await w.drain()


HTML = b"<html><body><h1>Welcome to nginx!</h1></body></html>\n"


async def _html(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter) -> None:
    w.write(head(ctype="text/html", length=len(HTML)) + HTML)
    await w.drain()


async def _garbage_status(up: RawUpstream, req: UpstreamRequest, w: asyncio.StreamWriter) -> None:
    w.write(b"SSH-2.0-OpenSSH_9.2p1 garbage\r\n\r\n")
    await w.drain()


BEHAVIOURS: dict[str, Behaviour] = {
    "ok": _ok,
    "hang_headers": _hang_headers,
    "hang_body": _hang_body,
    "hang_mid": _hang_mid,
    "reset_mid": _reset_mid,
    "reset_mid_unframed": _reset_mid_unframed,
    "malformed_sse": _malformed_sse,
    "gzip": _gzip,
    "html": _html,
    "garbage_status": _garbage_status,
}


@dataclass
class RawUpstream:
    """An upstream on a real loopback socket that behaves as ``mode`` says (see BEHAVIOURS)."""

    mode: str = "ok"
    requests: list[UpstreamRequest] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)  # set at close: hangs end
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.released.set()
        for w in list(self._writers):
            w.transport.abort()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> RawUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:  # keep-alive: llmd's pool may send several requests on one connection
                req = await _read_request(reader)
                if req is None:
                    return
                self.requests.append(req)
                await BEHAVIOURS[self.mode](self, req, writer)
                if self.mode != "ok" or writer.transport.is_closing():
                    return  # every fault ends its connection
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.close()


async def _read_request(reader: asyncio.StreamReader) -> UpstreamRequest | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = raw.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return UpstreamRequest(method, path, headers, json.loads(body) if body else {})


# --- the client -----------------------------------------------------------------------------------


@dataclass
class Seen:
    """What one client saw."""

    request_id: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    events: list[bytes] = field(default_factory=list)  # SSE data payloads, in order
    tokens: int = 0  # token-bearing chunks (delta content)
    errors: list[dict[str, Any]] = field(default_factory=list)  # in-band error objects
    done: bool = False  # data: [DONE] arrived
    elapsed_s: float = 0.0
    exception: str | None = None  # the client's own failure (connection reset...), if any

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def envelope(self) -> dict[str, Any]:
        doc = self.json()
        assert set(doc) == {"error"} and {"message", "type", "param", "code"} <= set(doc["error"]), doc
        return doc["error"]


async def call(session: aiohttp.ClientSession, base_url: str, *, stream: bool = False, model: str = "m",
               headers: dict[str, str] | None = None, body: dict[str, Any] | None = None,
               timeout_s: float = 30.0, on_event: Callable[[Seen], None] | None = None) -> Seen:
    """One chat completion through llmd; an SSE answer is read to its end, event by event
    (``on_event(seen)`` after each, e.g. to kill a replica once some tokens arrived)."""
    rid = f"fm-{uuid.uuid4().hex}"
    doc: dict[str, Any] = {"model": model, "messages": MSG, "max_tokens": STREAM_TOKENS}
    if stream:
        doc["stream"] = True
    doc.update(body or {})
    seen = Seen(rid)
    t0 = time.monotonic()
    try:
        async with session.post(base_url + "/v1/chat/completions", json=doc,
                                headers={"X-Request-ID": rid, **(headers or {})},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            seen.status = resp.status
            seen.headers = {k.lower(): v for k, v in resp.headers.items()}
            if resp.content_type == "text/event-stream":
                buf = b""
                async for data in resp.content.iter_any():
                    buf += data
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        _take_event(seen, ev)
                        if on_event is not None:
                            on_event(seen)
                if buf.strip():
                    _take_event(seen, buf)
            else:
                seen.body = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        seen.exception = f"{type(e).__name__}: {e}"
    seen.elapsed_s = time.monotonic() - t0
    return seen


def _take_event(seen: Seen, ev: bytes) -> None:
    for line in ev.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        seen.events.append(data)
        if data == b"[DONE]":
            seen.done = True
            continue
        try:
            doc = json.loads(data)
        except ValueError:
            continue
        if isinstance(doc, dict) and "error" in doc:
            seen.errors.append(doc["error"])
        elif isinstance(doc, dict) and isinstance(doc.get("choices"), list):
            seen.tokens += sum(
                1 for c in doc["choices"] if isinstance(c, dict) and (c.get("delta") or {}).get("content")
            )


# --- the ledger and leaks -------------------------------------------------------------------------


def read_rows(db_path: Path | str, request_ids: list[str]) -> dict[str, dict[str, Any]]:
    """request_id -> its row, for those already in the file."""
    if not Path(db_path).exists():
        return {}
    with contextlib.closing(sqlite3.connect(db_path, timeout=5)) as db:
        db.row_factory = sqlite3.Row
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(request_ids), 500):
            part = request_ids[i:i + 500]
            q = f"SELECT * FROM requests WHERE request_id IN ({','.join('?' * len(part))})"
            for r in db.execute(q, part):
                out[r["request_id"]] = dict(r)
        return out


async def ledger_rows(services: Any, db_path: Path | str, request_ids: list[str],
                      timeout_s: float = 10.0, expect: int | None = None) -> dict[str, dict[str, Any]]:
    """The rows of ``request_ids`` once they are all written (flushing as it waits: a row of an
    aborted stream is recorded only after its prompt is counted, off the request path);
    what was there when ``timeout_s`` ran out otherwise (the caller counts the missing).
    ``expect``: return once that many are there (some rows are meant to be missing)."""
    deadline = time.monotonic() + timeout_s
    want = len(set(request_ids)) if expect is None else expect
    while True:
        await services.ledger.flush()
        rows = read_rows(db_path, request_ids)
        if len(rows) >= want or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


def in_flight(services: Any) -> dict[str, int]:
    """Everything that must be back at zero once no request runs."""
    reps = [r for name in services.pools for r in services.supervisor.replicas(name)]
    return {
        "replica_in_flight": sum(r.in_flight for r in reps),
        "limiter_in_flight": sum(s.in_flight for s in services.runtime.limiter.states.values()),
        "admission_depth": sum(p.admission.depth for p in services.pools.values()),
        "background_tasks": len(services._background),
    }


async def assert_no_leaks(services: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(in_flight(services).values()):
        assert time.monotonic() < deadline, f"leaked: {in_flight(services)}"
        await asyncio.sleep(0.02)


# --- the matrix -----------------------------------------------------------------------------------


class Matrix:
    """Appends one JSON line per row to $LLMD_FAULT_MATRIX (nothing when it is unset)."""

    @staticmethod
    def row(fault: str, expected: str, seen: str, rows_lost: int) -> None:
        path = os.environ.get(MATRIX_ENV)
        if not path:
            return
        line = json.dumps({"fault": fault, "expected": expected, "seen": seen, "rows_lost": rows_lost})
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
