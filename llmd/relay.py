"""Forward one request to one replica over the shared ClientSession and relay the answer.

Non-stream answers are relayed with the upstream's status and bytes, untouched. Streams
are relayed event by event as they arrive (no buffering beyond one partial event), with
two jobs done on the way: note the time of the first token, and read the upstream's usage
(llmd asks for ``stream_options.include_usage`` when the client did not, and then drops
that usage-only chunk, so the client sees exactly what the upstream would have sent it).

Failures before the first byte reached the client raise ``UpstreamFailed`` (the caller may
retry on another replica); after it, the client gets an SSE error event and the stream ends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from .config import TimeoutsConfig
from .errors import ApiError, sse_error_event, upstream_timeout, upstream_unreachable
from .replica import Replica
from .sse import EventSplitter, data_of


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: _Details | None = None


class _Timings(msgspec.Struct):
    cache_n: int = 0
    prompt_n: int = 0
    predicted_n: int = 0


class _Body(msgspec.Struct):
    usage: Usage | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[msgspec.Raw] | None = None
    function_call: msgspec.Raw | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None  # /v1/completions


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: Usage | None = None
    timings: _Timings | None = None  # llama-server's, on its last chunk even without include_usage


class _Message(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[msgspec.Raw] | None = None


class _WholeChoice(msgspec.Struct):
    message: _Message | None = None
    text: str | None = None


class _WholeBody(msgspec.Struct):
    choices: list[_WholeChoice] | None = None


_decode_body = msgspec.json.Decoder(_Body).decode
_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_whole = msgspec.json.Decoder(_WholeBody).decode

DONE = b"[DONE]"
# Response headers a client may see from an upstream; the rest (cookies, the upstream
# account's rate limits and organization, server banners, hop-by-hop) stay behind.
RELAYED_HEADERS = frozenset({"content-type", "retry-after"})
# After total_s, a client that reads too slowly to take the in-band error and the end of
# the stream within this long is cut off (the row still says "timeout").
EOF_GRACE_S = 5.0


def tokens_in_chunk(chunk: _Chunk) -> int:
    """Generated tokens a stream chunk carries: one per choice whose delta holds text, a
    tool call piece or a refusal (llama-server and vLLM send one token per delta). Role-only
    and usage-only chunks carry none; a last chunk with a token and its finish_reason does."""
    n = 0
    for c in chunk.choices or ():
        d = c.delta
        if c.text or (
            d is not None and (d.content or d.reasoning_content or d.refusal or d.tool_calls or d.function_call)
        ):
            n += 1
    return n


def estimate_completion_tokens(data: bytes) -> int:
    """A whole answer's generated tokens when the upstream reported none: ~4 bytes a token."""
    try:
        body = _decode_whole(data)
    except msgspec.DecodeError:
        return 0
    n = 0
    for c in body.choices or ():
        m = c.message
        n += len(c.text or "")
        if m is not None:
            n += len(m.content or "") + len(m.reasoning_content or "") + sum(len(t) for t in m.tool_calls or ())
    return (n + 3) // 4


@dataclass
class Exchange:
    """What happened on the wire; the handler turns it into a usage row, metrics and a log line."""

    replica: str = ""
    backend: str = ""
    origin: str = ""  # the replica's scheme://host:port, for /tokenize after an abort
    status: int = 0
    outcome: str = "ok"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    usage_seen: bool = False
    token_method: str = "none"  # upstream | tokenize | estimate, with stream_chunks+ for streams
    chunks: int = 0  # token-bearing stream events relayed (one generated token each on llama-server/vLLM)
    t_start: float = 0.0  # time.monotonic() when the request arrived; ttft counts from here
    ttft_s: float | None = None
    upstream_s: float = 0.0  # time spent waiting on the upstream (connect, headers, body reads)
    client_bytes: int = 0
    first_byte_sent: bool = False
    streamed: bool = False  # 200 event-stream headers went out

    def take_usage(self, u: Usage) -> None:
        self.usage_seen = True
        self.token_method = "upstream"
        self.prompt_tokens = u.prompt_tokens or 0
        self.completion_tokens = u.completion_tokens or 0
        if u.prompt_tokens_details and u.prompt_tokens_details.cached_tokens:
            self.cached_tokens = u.prompt_tokens_details.cached_tokens


class UpstreamFailed(Exception):
    """Nothing reached the client yet. ``retryable``: another replica may answer instead.
    ``response``: the upstream's own answer (e.g. its 503) to relay if no retry is left."""

    def __init__(self, error: ApiError, retryable: bool, response: web.Response | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable
        self.response = response


class Relay:
    def __init__(self, session: aiohttp.ClientSession, timeouts: TimeoutsConfig) -> None:
        self.session = session
        self.timeouts = timeouts

    async def forward(
        self,
        request: web.Request,
        replica: Replica,
        path: str,
        body: bytes,
        headers: dict[str, str],
        response_headers: dict[str, str],
        hide_usage: bool,
        ex: Exchange,
    ) -> web.StreamResponse:
        ex.replica, ex.backend, ex.origin = replica.name, replica.backend, replica.origin()
        loop = asyncio.get_running_loop()
        t = self.timeouts
        deadline = loop.time() + t.total_s
        start = time.monotonic()  # loop.time() is cached per iteration under uvloop: too coarse
        try:
            async with asyncio.timeout(min(t.first_byte_s, t.total_s)):
                resp = await self.session.post(
                    replica.url + path,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, connect=t.connect_s),
                )
        except TimeoutError:
            ex.upstream_s += time.monotonic() - start
            msg = f"no response from {replica.name} within {t.first_byte_s:g}s"
            raise UpstreamFailed(upstream_timeout(msg), False) from None
        except (aiohttp.ClientError, OSError) as e:
            # Refused, reset, or not HTTP at all (a bad status line is a ClientResponseError):
            # nothing reached the client, so another replica may answer.
            ex.upstream_s += time.monotonic() - start
            raise UpstreamFailed(upstream_unreachable(f"{replica.name}: {type(e).__name__}"), True) from e
        ex.upstream_s += time.monotonic() - start
        try:
            ex.status = resp.status
            ctype = resp.headers.get("Content-Type", "")
            if resp.status != 200 or not ctype.startswith("text/event-stream"):
                return await self._whole(resp, replica, ex, deadline, response_headers)
            return await self._stream(request, resp, ex, deadline, response_headers, hide_usage)
        finally:
            resp.release()

    async def _whole(
        self,
        resp: aiohttp.ClientResponse,
        replica: Replica,
        ex: Exchange,
        deadline: float,
        response_headers: dict[str, str],
    ) -> web.Response:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout_at(deadline):
                data = await resp.read()  # decompressed by the session if the upstream compressed anyway
        except TimeoutError:
            raise UpstreamFailed(upstream_timeout(f"{replica.name} did not finish in time"), False) from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamFailed(upstream_unreachable(f"{replica.name}: {type(e).__name__}"), True) from e
        finally:
            ex.upstream_s += time.monotonic() - t0
        headers = CIMultiDict(response_headers)
        for k, v in resp.headers.items():
            if k.lower() in RELAYED_HEADERS:
                headers.setdefault(k, v)
        out = web.Response(status=resp.status, body=data, headers=headers)
        if resp.status in (502, 503):
            # The replica itself is failing (loading, overloaded, crashed worker): another may answer.
            raise UpstreamFailed(
                ApiError(resp.status, f"{replica.name} answered {resp.status}", type="upstream_error"), True, out
            )
        if resp.status == 200 and b'"usage"' in data:
            try:
                u = _decode_body(data).usage
            except msgspec.DecodeError:
                u = None
            if u is not None:
                ex.take_usage(u)
        if resp.status == 200 and not ex.usage_seen:
            ex.completion_tokens = estimate_completion_tokens(data)
        ex.outcome = "ok" if resp.status < 400 else "upstream_error"
        ex.client_bytes = len(data)
        return out

    async def _stream(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        ex: Exchange,
        deadline: float,
        response_headers: dict[str, str],
        hide_usage: bool,
    ) -> web.StreamResponse:
        out = web.StreamResponse(status=200)
        out.headers.update(response_headers)
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
        started = ex.t_start or time.monotonic()
        splitter = EventSplitter()
        tail: bytes | None = None  # what is still owed to the client after an upstream failure
        try:
            async with asyncio.timeout_at(deadline):
                reader = resp.content
                while True:
                    t0 = time.monotonic()
                    data = await reader.readany()
                    ex.upstream_s += time.monotonic() - t0
                    if not data:
                        events = splitter.close()
                    else:
                        events = splitter.feed(data)
                    if events:
                        relay = self._events(events, ex, hide_usage, started)
                        if relay:
                            await out.write(relay)
                            ex.client_bytes += len(relay)
                    if not data:
                        break
        except TimeoutError:
            ex.outcome = "timeout"
            tail = sse_error_event(upstream_timeout("stream exceeded routing.timeouts.total_s"))
        except (aiohttp.ClientError, OSError) as e:
            if _client_gone(request):
                # A write to the client failed (aiohttp raises ClientConnectionResetError there too).
                ex.outcome = "client_abort"  # the client went away; leaving here closes the upstream
                return out
            # The replica died mid-stream (e.g. kill -9): tell the client in-band, then end.
            ex.outcome = "upstream_error"
            tail = sse_error_event(upstream_unreachable(f"{ex.replica} broke the stream: {type(e).__name__}"))
        # The end of the stream is bounded too: a client that cannot take it within the grace
        # period is cut off, and the row keeps the reason the stream ended (timeout, error, ok).
        try:
            async with asyncio.timeout(EOF_GRACE_S):
                if tail is not None:
                    await out.write(tail)
                    ex.client_bytes += len(tail)
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
            if ex.outcome == "ok":
                ex.outcome = "client_abort"
        return out

    @staticmethod
    def _events(events: list[bytes], ex: Exchange, hide_usage: bool, started: float) -> bytes:
        parts: list[bytes] = []
        for ev in events:
            payload = data_of(ev)
            if payload is not None and payload != DONE:
                try:
                    chunk = _decode_chunk(payload)
                except msgspec.DecodeError:
                    chunk = None  # not JSON: relayed as it is, counted as nothing
                if chunk is not None:
                    if chunk.usage is not None:
                        ex.take_usage(chunk.usage)
                        if hide_usage and not chunk.choices:
                            continue  # the client did not ask for it; llmd did
                    elif chunk.timings is not None and not ex.usage_seen:
                        ex.prompt_tokens = chunk.timings.prompt_n + chunk.timings.cache_n
                        ex.completion_tokens = chunk.timings.predicted_n
                        ex.cached_tokens = chunk.timings.cache_n
                        ex.usage_seen = True
                        ex.token_method = "upstream"
                    n = tokens_in_chunk(chunk)
                    if n:
                        ex.chunks += n
                        if ex.ttft_s is None:
                            ex.ttft_s = time.monotonic() - started
            parts.append(ev)
            parts.append(b"\n\n")
        return b"".join(parts)


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
            elif route == "completions" and isinstance(doc.get("prompt"), str):
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


async def _try_write(out: web.StreamResponse, data: bytes) -> None:
    try:
        await out.write(data)
    except ConnectionResetError:
        pass
