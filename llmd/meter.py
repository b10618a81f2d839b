"""Meters: how usage and generated tokens are read from one protocol's answers.

A route declares its meter (routes.py); the relay hands it every whole answer and every
stream event and never looks inside them itself. A meter writes what it learns into the
call's ``Exchange``: the upstream's own usage when there is one, else the token chunks it
saw (the pipeline then bills those plus the prompt, see ``pipeline.settle``).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from .exchange import Exchange
from .outcome import Outcome


class Meter(Protocol):
    def whole(self, data: bytes, ex: Exchange) -> None:
        """A whole 200 answer: take its usage, or estimate what it generated."""

    def event(self, payload: bytes, ex: Exchange, hide_usage: bool) -> bool:
        """One stream event's data: count tokens, take usage; False drops the event (a usage
        chunk llmd asked for on the client's behalf)."""


# --- OpenAI's shapes (chat, completions, embeddings; llama-server and vLLM speak them) -------


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
    finish_reason: str | None = None


class Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: Usage | None = None
    error: msgspec.Raw = msgspec.Raw(b"")  # an upstream's in-band error: the stream failed
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
decode_chunk = msgspec.json.Decoder(Chunk).decode
_decode_whole = msgspec.json.Decoder(_WholeBody).decode

DONE = b"[DONE]"


def tokens_in_chunk(chunk: Chunk) -> int:
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


def _take(ex: Exchange, u: Usage) -> None:
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else None
    ex.take_usage(u.prompt_tokens or 0, u.completion_tokens or 0, cached)


class OpenAIMeter:
    """``usage`` on a whole answer; on a stream, the usage chunk (llmd asks for it with
    ``stream_options.include_usage``) or llama-server's ``timings`` on its last chunk."""

    def whole(self, data: bytes, ex: Exchange) -> None:
        if b'"usage"' in data:
            try:
                u = _decode_body(data).usage
            except msgspec.DecodeError:
                u = None
            if u is not None:
                _take(ex, u)
                return
        ex.completion_tokens = estimate_completion_tokens(data)

    def event(self, payload: bytes, ex: Exchange, hide_usage: bool) -> bool:
        if payload == DONE:
            ex.finished = True
            return True
        try:
            chunk = decode_chunk(payload)
        except msgspec.DecodeError:
            return True  # not JSON: relayed as it is, counted as nothing
        if chunk.error:
            ex.outcome = Outcome.UPSTREAM_ERROR
        if chunk.usage is not None:
            _take(ex, chunk.usage)
            if hide_usage and not chunk.choices:
                return False  # the client did not ask for it; llmd did
        elif chunk.timings is not None and not ex.usage_seen:
            t = chunk.timings
            ex.take_usage(t.prompt_n + t.cache_n, t.predicted_n, t.cache_n)
        n = tokens_in_chunk(chunk)
        if n:
            ex.token_relayed(n)
        if chunk.choices and any(c.finish_reason for c in chunk.choices):
            ex.finished = True  # an upstream that omits [DONE] still said it was done
        return True


OPENAI = OpenAIMeter()


# --- Anthropic Messages ----------------------------------------------------------------------


class _AnthropicUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None

    def prompt(self) -> int:
        # Anthropic's input_tokens exclude the cached part; the ledger's prompt is all of it.
        return (self.input_tokens or 0) + (self.cache_read_input_tokens or 0) + (self.cache_creation_input_tokens or 0)


class _AnthropicMessage(msgspec.Struct):
    usage: _AnthropicUsage | None = None
    content: list[msgspec.Raw] | None = None


class _AnthropicEvent(msgspec.Struct):
    type: str = ""
    message: _AnthropicMessage | None = None  # message_start
    usage: _AnthropicUsage | None = None  # message_delta


_decode_anthropic_message = msgspec.json.Decoder(_AnthropicMessage).decode
_decode_anthropic_event = msgspec.json.Decoder(_AnthropicEvent).decode


class AnthropicMeter:
    """``usage`` of a message; on a stream the prompt from ``message_start``, a token per
    ``content_block_delta``, the output from ``message_delta``."""

    def whole(self, data: bytes, ex: Exchange) -> None:
        try:
            msg = _decode_anthropic_message(data)
        except msgspec.DecodeError:
            return
        if msg.usage is not None:
            u = msg.usage
            ex.take_usage(u.prompt(), u.output_tokens or 0, u.cache_read_input_tokens)
        else:
            ex.completion_tokens = (sum(len(c) for c in msg.content or ()) + 3) // 4

    def event(self, payload: bytes, ex: Exchange, hide_usage: bool) -> bool:
        try:
            ev = _decode_anthropic_event(payload)
        except msgspec.DecodeError:
            return True
        t = ev.type
        if t == "content_block_delta":
            ex.token_relayed()
        elif t == "message_start" and ev.message is not None and ev.message.usage is not None:
            u = ev.message.usage
            ex.take_prompt(u.prompt(), u.cache_read_input_tokens)
        elif t == "message_delta" and ev.usage is not None:
            u = ev.usage
            prompt = u.prompt() if u.input_tokens is not None else ex.prompt_tokens
            ex.take_usage(prompt, u.output_tokens or 0, u.cache_read_input_tokens or ex.cached_tokens)
        elif t == "message_stop":
            ex.finished = True
        elif t == "error":
            ex.outcome = Outcome.UPSTREAM_ERROR
        return True


# --- OpenAI Responses ------------------------------------------------------------------------


class _InputDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _ResponsesUsage(msgspec.Struct):
    input_tokens: int | None = 0
    output_tokens: int | None = 0
    input_tokens_details: _InputDetails | None = None


class _Response(msgspec.Struct):
    usage: _ResponsesUsage | None = None
    output: list[msgspec.Raw] | None = None


class _ResponsesEvent(msgspec.Struct):
    type: str = ""
    response: _Response | None = None
    error: msgspec.Raw = msgspec.Raw(b"")  # llama-server's unnamed in-band error


_decode_response = msgspec.json.Decoder(_Response).decode
_decode_responses_event = msgspec.json.Decoder(_ResponsesEvent).decode
_RESPONSES_TOKEN_EVENTS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    }
)


def _take_responses(ex: Exchange, u: _ResponsesUsage) -> None:
    cached = u.input_tokens_details.cached_tokens if u.input_tokens_details else None
    ex.take_usage(u.input_tokens or 0, u.output_tokens or 0, cached)


class ResponsesMeter:
    """``usage`` of a response; on a stream a token per text/arguments delta and the usage of
    ``response.completed`` (or ``incomplete``/``failed``)."""

    def whole(self, data: bytes, ex: Exchange) -> None:
        try:
            r = _decode_response(data)
        except msgspec.DecodeError:
            return
        if r.usage is not None:
            _take_responses(ex, r.usage)
        else:
            ex.completion_tokens = (sum(len(o) for o in r.output or ()) + 3) // 4

    def event(self, payload: bytes, ex: Exchange, hide_usage: bool) -> bool:
        try:
            ev = _decode_responses_event(payload)
        except msgspec.DecodeError:
            return True
        t = ev.type
        if t in _RESPONSES_TOKEN_EVENTS:
            ex.token_relayed()
        elif t in ("response.completed", "response.incomplete", "response.failed"):
            ex.finished = True
            if ev.response is not None and ev.response.usage is not None:
                _take_responses(ex, ev.response.usage)
            if t == "response.failed":
                ex.outcome = Outcome.UPSTREAM_ERROR
        elif t == "error" or ev.error:
            ex.outcome = Outcome.UPSTREAM_ERROR
        return True


# --- token-only routes (/tokenize, count_tokens, ...) ----------------------------------------


class ZeroMeter:
    """Routes that run no generation: a request with 0 tokens, whatever the answer says."""

    def whole(self, data: bytes, ex: Exchange) -> None:
        ex.usage_seen = ex.prompt_seen = True

    def event(self, payload: bytes, ex: Exchange, hide_usage: bool) -> bool:
        ex.usage_seen = ex.prompt_seen = ex.finished = True
        return True


ANTHROPIC = AnthropicMeter()
RESPONSES = ResponsesMeter()
ZERO = ZeroMeter()
