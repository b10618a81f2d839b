"""Forward one call to one replica over llmd's upstream client and relay the answer.

Non-stream answers are relayed with the upstream's status and bytes (only an allow-list of
its headers). Streams are relayed event by event as they arrive (no buffering beyond one
partial event), whatever the wire (``sse.EventSplitter``); each event's data goes through
the route's meter, which counts tokens, notes the first one and reads usage.

Failures before the first byte reached the client raise ``UpstreamFailed`` (the pool may
retry on another replica); after it, the client gets an SSE error event and the stream ends.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from .call import Call
from .config import TimeoutsConfig
from .errors import ApiError, sse_error_event, upstream_failed, upstream_timeout, upstream_unreachable
from .outcome import Outcome
from .replica import Replica
from .sse import EventSplitter, data_of
from .upstream import ConnectFailed, Response, UpstreamError, Upstreams

# Response headers a client may see from an upstream (lower-case name -> as sent); the rest
# (cookies, the upstream account's rate limits and organization, server banners, hop-by-hop)
# stay behind.
RELAYED_HEADERS = {"content-type": "Content-Type", "retry-after": "Retry-After"}
# After total_s, a client that reads too slowly to take the in-band error and the end of
# the stream within this long is cut off (the row still says "timeout").
EOF_GRACE_S = 5.0


class UpstreamFailed(Exception):
    """Nothing reached the client yet. ``retryable``: another replica may answer instead.
    ``response``: the upstream's own answer (e.g. its 503) to relay if no retry is left."""

    def __init__(
        self, error: ApiError, retryable: bool, response: web.Response | None = None, refused: bool = False
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable
        self.response = response
        self.refused = refused  # no connection at all: the server is not there (yet, or any more)


class Relay:
    def __init__(self, upstreams: Upstreams, timeouts: TimeoutsConfig) -> None:
        self.upstreams = upstreams
        self.timeouts = timeouts

    async def forward(self, call: Call, replica: Replica) -> web.StreamResponse:
        assert call.route is not None
        ex = call.exchange
        ex.replica, ex.backend, ex.origin = replica.name, replica.backend, replica.origin()
        loop = asyncio.get_running_loop()
        t = self.timeouts
        deadline = loop.time() + t.total_s
        start = time.monotonic()  # loop.time() is cached per iteration under uvloop: too coarse
        try:
            async with asyncio.timeout(min(t.first_byte_s, t.total_s)):
                route = call.route
                resp = await self.upstreams.post(
                    (replica.origin() if route.native else replica.url) + route.upstream_path,
                    call.upstream_body,
                    call.upstream_headers,
                    t.connect_s,
                )
        except TimeoutError:
            ex.upstream_s += time.monotonic() - start
            msg = f"no response from {replica.name} within {t.first_byte_s:g}s"
            raise UpstreamFailed(upstream_timeout(msg), False) from None
        except (UpstreamError, OSError) as e:
            # Refused, reset, or not HTTP at all: nothing reached the client, so another
            # replica may answer.
            ex.upstream_s += time.monotonic() - start
            refused = isinstance(e, ConnectFailed)
            raise UpstreamFailed(
                upstream_unreachable(f"{replica.name}: {type(e).__name__}"), True, None, refused
            ) from e
        ex.upstream_s += time.monotonic() - start
        try:
            ex.status = resp.status
            ctype = resp.headers.get("content-type", "")
            if resp.status != 200 or not ctype.startswith("text/event-stream"):
                return await self._whole(call, resp, replica, deadline)
            return await self._stream(call, resp, deadline)
        finally:
            resp.release()

    async def _whole(self, call: Call, resp: Response, replica: Replica, deadline: float) -> web.Response:
        ex = call.exchange
        t0 = time.monotonic()
        try:
            if resp.complete:  # a small answer comes with its head: no timer to arm and cancel
                data = await resp.read()  # decompressed if the upstream compressed anyway
            else:
                async with asyncio.timeout_at(deadline):
                    data = await resp.read()
        except TimeoutError:
            raise UpstreamFailed(upstream_timeout(f"{replica.name} did not finish in time"), False) from None
        except (UpstreamError, OSError) as e:
            raise UpstreamFailed(upstream_unreachable(f"{replica.name}: {type(e).__name__}"), True) from e
        finally:
            ex.upstream_s += time.monotonic() - t0
        headers = CIMultiDict(call.response_headers)
        for k, name in RELAYED_HEADERS.items():
            v = resp.headers.get(k)
            if v is not None:
                headers.setdefault(name, v)
        out = web.Response(status=resp.status, body=data, headers=headers)
        if resp.status in (502, 503):
            # The replica itself is failing (loading, overloaded, crashed worker): another may answer.
            raise UpstreamFailed(upstream_failed(resp.status, f"{replica.name} answered {resp.status}"), True, out)
        if resp.status == 200:
            call.route.meter.whole(data, ex)  # type: ignore[union-attr]
            if call.rewrite is not None:
                data = call.rewrite.whole(data)
                out.body = data
        ex.outcome = Outcome.OK if resp.status < 400 else Outcome.UPSTREAM_ERROR
        ex.client_bytes = len(data)
        return out

    async def _stream(self, call: Call, resp: Response, deadline: float) -> web.StreamResponse:
        request, ex = call.request, call.exchange
        meter = call.route.meter  # type: ignore[union-attr]
        sink = call.sink
        if sink is not None:  # the client's stream is open already; the sink picks what it gets
            out = sink.out
        else:
            out = web.StreamResponse(status=200)
            out.headers.update(call.response_headers)
            out.headers["Content-Type"] = "text/event-stream; charset=utf-8"
            out.headers["Cache-Control"] = "no-cache"
            out.headers["X-Accel-Buffering"] = "no"  # nginx must not buffer SSE
            try:
                await out.prepare(request)
            except ConnectionResetError:
                # The client left while the upstream answered: its FIN closed the transport in the
                # same loop iteration, before aiohttp's cancellation reached this task. Take the
                # path aiohttp's cancellation would have taken (client_abort, 499).
                raise asyncio.CancelledError from None
        ex.first_byte_sent = True
        ex.streamed = True
        splitter = EventSplitter()
        hide_usage, rewrite = call.hide_usage, call.rewrite
        tail: bytes | None = None  # what is still owed to the client after an upstream failure
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    t0 = time.monotonic()
                    data = await resp.readany()
                    ex.upstream_s += time.monotonic() - t0
                    events = splitter.feed(data) if data else splitter.close()
                    if events:
                        parts: list[bytes] = []
                        for ev in events:
                            payload = data_of(ev)
                            if payload is None or meter.event(payload, ex, hide_usage):
                                if sink is not None and payload is not None:
                                    picked = sink.event(payload)
                                    if picked is not None:
                                        parts.append(picked)
                                    continue
                                if rewrite is not None and payload is not None:
                                    ev = b"data: " + rewrite.event(payload)
                                parts.append(ev)
                                parts.append(b"\n\n")
                        if parts:
                            relay = b"".join(parts)
                            await out.write(relay)
                            ex.client_bytes += len(relay)
                            if call.capture is not None:  # the completion cache keeps what the client got
                                call.capture.append(relay)
                    if not data:
                        break
            if not ex.finished and ex.outcome is Outcome.OK:
                # A clean end of the body without the protocol's last event: the upstream broke
                # off (a body framed by the connection reads a reset as its end).
                ex.outcome = Outcome.UPSTREAM_ERROR
                tail = sse_error_event(upstream_unreachable(f"{ex.replica} ended the stream before its last event"))
        except TimeoutError:
            ex.outcome = Outcome.TIMEOUT
            tail = sse_error_event(upstream_timeout("stream exceeded routing.timeouts.total_s"))
        except (UpstreamError, aiohttp.ClientError, OSError) as e:
            if _client_gone(request):
                # A write to the client failed (aiohttp raises ClientConnectionResetError there too).
                ex.outcome = Outcome.CLIENT_ABORT  # leaving here closes the upstream
                return out
            # The replica died mid-stream (e.g. kill -9): tell the client in-band, then end.
            ex.outcome = Outcome.UPSTREAM_ERROR
            tail = sse_error_event(upstream_unreachable(f"{ex.replica} broke the stream: {type(e).__name__}"))
        # The end of the stream is bounded too: a client that cannot take it within the grace
        # period is cut off, and the row keeps the reason the stream ended (timeout, error, ok).
        try:
            async with asyncio.timeout(EOF_GRACE_S):
                if tail is not None:
                    await out.write(tail)
                    ex.client_bytes += len(tail)
                if sink is None:  # a sink's stream goes on: its owner ends it
                    await out.write_eof()
        except TimeoutError:
            _abort(request)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # a real cancellation: the client left, or shutdown
            # Not this task's: aiohttp's drain future, cancelled when total_s interrupted a write
            # to a client that does not read. That client cannot take the end either.
            _abort(request)
        except ConnectionResetError:
            if ex.outcome is Outcome.OK:
                ex.outcome = Outcome.CLIENT_ABORT
        return out


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _client_gone(request: web.Request) -> bool:
    t = request.transport
    return t is None or t.is_closing()


class _Template(msgspec.Struct):
    prompt: str


class _Tokens(msgspec.Struct):
    tokens: list[msgspec.Raw] | None = None
    count: int | None = None


async def count_prompt_tokens(
    session: aiohttp.ClientSession, backend: str, origin: str, model: str, route: str, body: bytes
) -> int | None:
    """The prompt's token count, asked of the replica that served it: used when a client
    abandoned a stream before the upstream's usage arrived. llama-server: POST /apply-template
    (chat) then /tokenize with special tokens, as its own prompt is built; vLLM: POST /tokenize
    with the messages or prompt. None when the backend cannot tell (remote urls, errors)."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        doc = msgspec.json.decode(body)
        if backend == "llama-server":
            if route == "chat":
                async with session.post(
                    origin + "/apply-template", json={"messages": doc.get("messages")}, timeout=timeout
                ) as r:
                    if r.status != 200:
                        return None
                    text = msgspec.json.decode(await r.read(), type=_Template).prompt
            elif route in ("completions", "completion") and isinstance(doc.get("prompt"), str):
                text = doc["prompt"]
            else:
                return None
            async with session.post(
                origin + "/tokenize", json={"content": text, "add_special": True}, timeout=timeout
            ) as r:
                if r.status != 200:
                    return None
                toks = msgspec.json.decode(await r.read(), type=_Tokens)
                return len(toks.tokens) if toks.tokens is not None else None
        if backend == "vllm":
            key = "messages" if route == "chat" else "prompt"
            async with session.post(
                origin + "/tokenize", json={"model": model, key: doc.get(key)}, timeout=timeout
            ) as r:
                if r.status != 200:
                    return None
                return msgspec.json.decode(await r.read(), type=_Tokens).count
    except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError, AttributeError):
        return None
    return None
