"""ToolLoop: a chat request that names server tools, run by llmd as rounds of model calls.

``{"tools": [{"type": "server", "name": "time.now"}, ...]}`` in a ``/v1/chat/completions``
body names tools of config ``tools:`` (tools.py). llmd sends them to the model as ordinary
function tools, runs the model's calls of them, appends the results as ``role: tool``
messages and calls the model again, until it answers without calling a server tool, or
``tool_loop.max_rounds`` model calls were made (the last one is sent with ``tool_choice:
"none"`` so it answers in text). Function tools of the client in the same request travel as
they are: an answer calling one goes back to the client (without the server tool calls it may
also carry: the client could not answer them).

Every round is one model call that goes through the key's limits like a request of its own
(the previous round's grant is settled first, so ``max_concurrent: 1`` still works) and has its
own ledger row: the client's request id for round 1, ``<id>.r2``, ``<id>.r3``... for the next.
The client's answer carries every round's usage summed.

A streamed request gets its 200 and SSE headers at once and every round is streamed upstream
too: the model's text reaches the client live in every round, its tool calls are held until
the round ends (toolstream.py), each tool run is an SSE comment (``: tool time.now ok``), and
the stream ends with the client's own tool calls if any, one finish chunk and the usage of
every round summed. A non-streamed request's rounds go upstream whole.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from . import envelope
from .call import Call
from .errors import ApiError, bad_request, sse_error_event, tool_not_allowed, unknown_tool, upstream_failed
from .exchange import Exchange
from .outcome import Outcome
from .tools import Tool, Toolbox, ToolResult
from .toolstream import ToolStream

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

# round 1 is the client's Call; later rounds are Calls of their own, admitted, served, settled
ServeMain = Callable[[], Awaitable[web.StreamResponse]]
ServeRound = Callable[[Call], Awaitable[web.StreamResponse]]
RunTool = Callable[[Tool, str], Awaitable[ToolResult]]


@dataclass(slots=True)
class Plan:
    """What a request asks: its body (tools expanded), the server tools by the name the model
    calls them (``Tool.wire_name``)."""

    doc: dict[str, Any]
    server: dict[str, Tool]


def plan(call: Call, toolbox: Toolbox) -> Plan | None:
    """The loop's plan when the request names server tools, else None (relayed as always).
    400 for a body the loop cannot run, 404 for an unknown tool, 403 for one the key may not use."""
    route, principal = call.route, call.principal
    if route is None or route.name != "chat" or principal is None:
        return None
    defaults = principal.limits.default_tools
    if not defaults and b'"server"' not in call.upstream_body:
        return None
    try:
        doc = _decode(call.upstream_body)
    except (msgspec.DecodeError, RecursionError):  # not the loop's to judge: relayed, the upstream answers
        return None
    if not isinstance(doc, dict):
        return None
    tools = doc.get("tools")
    named = isinstance(tools, list) and any(isinstance(t, dict) and t.get("type") == "server" for t in tools)
    if not named:
        # The tier's (or key's) default set, unless the client wants no tools at all.
        if (
            not defaults
            or doc.get("tool_choice") == "none"
            or (tools is not None and not isinstance(tools, list))
            or call.rewrite is not None  # legacy "functions": the client's own, as it sent them
            or (doc.get("n") or 1) != 1
        ):
            return None
        # A client function of the name a default reaches the model by is the client's: that
        # default stays out (the client did not ask for it; its own request must not fail on it).
        own = {_name(t) for t in tools or ()}
        extra = [{"type": "server", "name": n} for n in defaults if (t := toolbox.get(n)) and t.wire_name not in own]
        if not extra:
            return None
        tools = [*(tools or []), *extra]
        doc["tools"] = tools
    if call.rewrite is not None:
        raise bad_request("Server tools cannot be combined with legacy 'functions'; use 'tools'.", param="functions")
    if (doc.get("n") or 1) != 1:
        raise bad_request("Server tools run one conversation: 'n' must be 1.", param="n")
    server: dict[str, Tool] = {}
    out: list[Any] = []
    client_names = {_name(t) for t in tools if isinstance(t, dict) and t.get("type") == "function"}
    for t in tools:
        if not (isinstance(t, dict) and t.get("type") == "server"):
            out.append(t)
            continue
        name = t.get("name")
        if not isinstance(name, str):
            raise bad_request("A server tool needs its 'name' (GET /v1/tools lists them).", param="tools")
        tool = toolbox.get(name)
        if tool is None:
            raise unknown_tool(name)
        if not tool.allowed(principal):
            raise tool_not_allowed(principal.key_id, name)
        wire = tool.wire_name
        if wire in client_names or (wire in server and server[wire] is not tool):
            raise bad_request(f"Tool '{name}' reaches the model as '{wire}', a name already in 'tools'.", param="tools")
        if wire not in server:
            server[wire] = tool
            out.append(tool.function())
    doc["tools"] = out
    return Plan(doc, server)


class ToolLoop:
    def __init__(self, call: Call, p: Plan, max_rounds: int, run_tool: RunTool) -> None:
        self.call = call
        self.plan = p
        self.max_rounds = max_rounds
        self.run_tool = run_tool
        self.exchanges: list[Exchange] = []  # every round's, for the summed usage
        self.stream = bool(p.doc.get("stream"))
        self.include_usage = bool((p.doc.get("stream_options") or {}).get("include_usage")) and not call.hide_usage
        self.out: web.StreamResponse | None = None
        self.written = 0  # bytes the client got on the stream

    async def run(self, serve_main: ServeMain, serve_round: ServeRound) -> web.StreamResponse:
        messages: list[Any] = list(self.plan.doc.get("messages") or [])
        live: ToolStream | None = None
        if self.stream:
            live = ToolStream(await self._open())
        answer: dict[str, Any] = {}
        for n in range(1, self.max_rounds + 1):
            if live is not None:
                live.new_round()
            body = self._round_body(messages, last=n == self.max_rounds)
            try:
                resp = await self._serve(n, body, live, serve_main, serve_round)
            except ApiError as e:
                if self.out is None:
                    raise
                return await self._fail(e)
            ex = self.exchanges[-1]
            if live is not None and resp is self.out:  # the round streamed into the client's stream
                if ex.outcome is not Outcome.OK:  # the relay told the client in-band (or it left)
                    return await self._broken(ex)
                answer = {}
                message = live.message()
                finish = live.finish or "stop"
            else:
                if resp.status != 200 or not isinstance(resp, web.Response) or not isinstance(resp.body, bytes):
                    if self.out is None:
                        if self.call.exchange.outcome is Outcome.OK:  # round n's error is the request's
                            self.call.exchange.outcome = ex.outcome
                        return resp  # the upstream's own error, as any request would get it
                    text = resp.body.decode(errors="replace") if isinstance(resp.body, bytes) else ""
                    return await self._fail(upstream_failed(resp.status, f"round {n}: {text[:500]}"))
                try:
                    answer = _decode(resp.body)
                    choice = (answer.get("choices") or [{}])[0]
                    message = choice.get("message") or {}
                    finish = choice.get("finish_reason") or "stop"
                except (msgspec.DecodeError, RecursionError, AttributeError, TypeError):
                    err = upstream_failed(502, f"round {n}: the model's answer is not a chat completion")
                    if self.out is None:
                        raise err from None
                    return await self._fail(err)
            calls = message.get("tool_calls") or []
            mine = [c for c in calls if _name(c) in self.plan.server]
            theirs = [c for c in calls if _name(c) not in self.plan.server]
            if not mine or theirs or n == self.max_rounds:
                if mine:  # the client cannot answer llmd's tools: it gets its own calls only
                    if theirs:
                        message["tool_calls"] = theirs
                    else:
                        message.pop("tool_calls")
                        finish = "stop"
                    if answer:
                        answer["choices"][0]["finish_reason"] = finish
                break
            for c in mine:  # arguments are a JSON text; an upstream that sent an object gets it as one
                fn = c["function"]
                if not isinstance(fn.get("arguments"), str):
                    fn["arguments"] = _encode(fn["arguments"]).decode() if fn.get("arguments") is not None else "{}"
            messages.append({"role": "assistant", "content": message.get("content") or "", "tool_calls": mine})
            for c in mine:
                fn = c.get("function") or {}
                result = await self.run_tool(self.plan.server[fn["name"]], fn.get("arguments") or "{}")
                messages.append({"role": "tool", "tool_call_id": c.get("id") or "", "content": result.text})
                if self.out is not None:
                    tool = self.plan.server[fn["name"]]
                    await self._write(f": tool {tool.name} {'ok' if result.ok else 'error'}\n\n".encode())
        usage = self._usage()
        if live is not None and not answer:  # the last round streamed: end the client's stream
            told = usage if self.include_usage else None
            await self._write(live.ending(message.get("tool_calls") or [], finish, told))
            return await self._end()
        if usage is None:
            answer.pop("usage", None)  # one round's alone is not the answer's
        else:
            answer["usage"] = usage
        return await self._deliver(answer)

    async def _serve(
        self, n: int, body: bytes, live: ToolStream | None, serve_main: ServeMain, serve_round: ServeRound
    ) -> web.StreamResponse:
        """Round n, one model call: round 1 on the client's Call, the next on Calls of their own."""
        call = self.call
        if n == 1:
            call.upstream_body = body
            call.sink = live
            self.exchanges.append(call.exchange)
            resp = await serve_main()
            # Settled now, not when the request ends: the next round is admitted on its own and
            # must find this one's concurrency slot free.
            if call.grant is not None:
                call.grant.release(_spent(call))
            return resp
        sub = self._round_call(n, body)
        sub.sink = live
        self.exchanges.append(sub.exchange)
        return await serve_round(sub)

    # --- bodies and calls of the rounds ------------------------------------------------------------------

    def _round_body(self, messages: list[Any], last: bool) -> bytes:
        doc = {**self.plan.doc, "messages": messages, "stream": self.stream}
        doc.pop("stream_options", None)
        if self.stream:  # every round's usage, for its row and the client's sum
            doc["stream_options"] = {"include_usage": True}
        later = len(messages) > len(self.plan.doc.get("messages") or [])
        if last and later:
            doc["tool_choice"] = "none"  # rounds are spent: answer with what the tools told
        elif later and doc.get("tool_choice") not in (None, "auto", "none"):
            # "required" or one function forced: round 1 called a tool as asked; forced again,
            # the model could only call tools until the rounds are spent, never answer.
            doc["tool_choice"] = "auto"
        return _encode(doc)

    def _round_call(self, n: int, body: bytes) -> Call:
        call = self.call
        sub = Call(request=call.request, request_id=f"{call.request_id}.r{n}", client_ip=call.client_ip)
        sub.route, sub.principal, sub.model = call.route, call.principal, call.model
        sub.env = envelope.decode(body, "messages")  # this round's prompt sizes its reservation
        sub.upstream_body = body
        sub.upstream_headers = {**call.upstream_headers, "X-Request-ID": sub.request_id}
        return sub

    def _usage(self) -> dict[str, int] | None:
        """Every round's usage summed; None when a round's upstream did not tell its own (an
        upstream that ignores include_usage): its row is counted later (pipeline.settle, from
        the chunks and a tokenize), so no sum told now would match the ledger; the client gets
        none, as a relayed stream of that upstream would."""
        if not all(ex.usage_seen for ex in self.exchanges):
            return None
        prompt = sum(ex.prompt_tokens for ex in self.exchanges)
        completion = sum(ex.completion_tokens for ex in self.exchanges)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # --- the client's answer -----------------------------------------------------------------------------

    async def _deliver(self, answer: dict[str, Any]) -> web.StreamResponse:
        call = self.call
        call.exchange.status = 200
        if self.out is None:
            data = _encode(answer)
            call.exchange.client_bytes = len(data)
            return web.Response(
                body=data, headers={**call.response_headers, "Content-Type": "application/json"}, status=200
            )
        for chunk in _chunks(answer, self.include_usage):
            await self._write(b"data: " + _encode(chunk) + b"\n\n")
        await self._write(b"data: [DONE]\n\n")
        return await self._end()

    async def _open(self) -> web.StreamResponse:
        call = self.call
        out = web.StreamResponse(status=200)
        out.headers.update(call.response_headers)
        out.headers["Content-Type"] = "text/event-stream; charset=utf-8"
        out.headers["Cache-Control"] = "no-cache"
        out.headers["X-Accel-Buffering"] = "no"
        await out.prepare(call.request)
        self.out = out
        return out

    async def _write(self, data: bytes) -> None:
        assert self.out is not None
        if self.call.exchange.ttft_s is None and data.startswith(b"data: "):
            self.call.exchange.ttft_s = time.monotonic() - self.call.exchange.t_start
        try:
            await self.out.write(data)
        except ConnectionResetError:
            # The client left and this write saw it before aiohttp's cancellation reached the
            # task (its FIN in the same loop iteration): the path that cancellation takes
            # (client_abort, 499), not a 500 of llmd's.
            raise asyncio.CancelledError from None
        self.written += len(data)

    async def _end(self) -> web.StreamResponse:
        """The client's stream ends; its bytes: what the loop wrote and what rounds streamed."""
        assert self.out is not None
        streamed = sum(ex.client_bytes for ex in self.exchanges if ex.streamed)
        self.call.exchange.client_bytes = self.written + streamed
        try:
            await self.out.write_eof()
        except ConnectionResetError:
            raise asyncio.CancelledError from None  # as in _write
        return self.out

    async def _broken(self, ex: Exchange) -> web.StreamResponse:
        """A round's stream broke off: the relay told the client in-band (or the client left)."""
        if self.call.exchange.outcome is Outcome.OK:
            self.call.exchange.outcome = ex.outcome
        if ex.outcome is Outcome.CLIENT_ABORT:
            return self.out  # type: ignore[return-value]
        return await self._end()

    async def _fail(self, e: ApiError) -> web.StreamResponse:
        """A stream's 200 is out: the error is told in-band, then the stream ends."""
        assert self.out is not None
        if self.call.exchange.outcome is Outcome.OK:
            self.call.exchange.outcome = e.outcome
        await self._write(sse_error_event(e))
        return await self._end()


def _spent(call: Call) -> int:
    """Round 1's tokens as its row will count them (pipeline.settle): the upstream's usage, or,
    when it told none, the streamed chunks and the prompt's estimate. The grant settles on this
    now, and only once: 0 here would leave round 1 out of tokens_per_minute and the quota."""
    ex = call.exchange
    if ex.usage_seen or call.env is None:
        return ex.prompt_tokens + ex.completion_tokens
    completion = ex.chunks if ex.streamed or ex.outcome is Outcome.CLIENT_ABORT else ex.completion_tokens
    prompt = ex.prompt_tokens if ex.prompt_seen else call.env.prompt_estimate()
    return prompt + completion


def _name(c: Any) -> str | None:
    """The function name of a tool (or of a tool call); None for anything not shaped like one
    (a client's malformed tool is the upstream's to refuse, not llmd's 500)."""
    fn = c.get("function") if isinstance(c, dict) else None
    return fn.get("name") if isinstance(fn, dict) else None


def _chunks(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A whole chat.completion as the chunks a stream of it would have carried."""
    base = {k: answer.get(k) for k in ("id", "created", "model", "system_fingerprint") if k in answer}
    base["object"] = "chat.completion.chunk"
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
    chunks = [
        {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}]},
    ]
    if include_usage and answer.get("usage") is not None:
        chunks.append({**base, "choices": [], "usage": answer.get("usage")})
    return chunks
