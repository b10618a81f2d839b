"""Machinery shared by the two test doubles, ``fake_backend.py`` (llama-server) and ``fake_vllm.py``.

Both fakes are real processes speaking HTTP on a real socket, so the gateway's supervisor, relay and
balancer run against them exactly as against the real servers. Everything a fake does is a pure
function of the request and its flags, so tests can predict every byte:

* Tokenizer: a token per whitespace-separated word (``text.split()``); ``/tokenize`` reports
  ``crc32(word) % 262144`` as each word's id. No BOS token is added anywhere.
* Chat prompt: every message contributes ``<|im_start|>``, its role, the words of its content,
  ``<|im_end|>`` and a newline token, i.e. ``len(content.split()) + 4`` tokens. Text parts of a list
  content are joined with spaces; an assistant message's tool calls count as their name and
  arguments. Tools and response_format are not counted.
* Generation: ``max_tokens`` (or ``max_completion_tokens``/``n_predict``; default 8) tokens; token
  ``i`` is the text ``t{i}`` preceded by a space for every token but the first, so the content is
  ``"t0 t1 t2"`` and each stream chunk carries one token (``"t0"``, ``" t1"``, ...).
  finish_reason is ``"length"``, or ``"stop"`` for response_format/``fake.text`` answers.
* Prompt cache: the last 16 prompts of the process are remembered; a request's cached tokens are
  the longest common token prefix with any of them, at most ``prompt_tokens - 1`` (the real
  servers always evaluate the last prompt token). Any two chat prompts share their leading
  ``<|im_start|>``, so a replica that has served any chat reports at least 1 cached token.
* Embeddings: a unit vector seeded from sha256 of the input text.
* Anthropic and Responses requests are chats: their system/instructions and messages/input are
  converted to chat messages as llama.cpp converts them, then counted as above. /detokenize maps
  ids back to the words the process has tokenized (or ``t{i}``), joined by spaces.
* Rerank: a document's score is the share of the query's distinct words it contains; it costs
  the words of query + document.

Per-request behaviour is steered by an extra body object ``"fake": {...}`` (see ``Controls``); a
typo in it is a 400 so that tests fail loudly. How answers are framed on the wire (JSON spacing, SSE
prefix and line endings, writes split at arbitrary bytes, gzip, OpenAI's role chunk, llama-server's
``timings``) is a ``Wire`` profile: ``--fake-wire NAME`` for the process, ``"fake": {"wire": NAME or
{knob: value}}`` per request (see ``WIRE_PROFILES``). The default profile, "native", is the server's
own framing byte for byte. ``GET /fake/stats`` and ``POST /fake/reset`` let a
test see what reached the process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import math
import os
import random
import signal
import socket
import struct
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec
from aiohttp import web

VOCAB_SIZE = 262144
PROMPT_CACHE_ENTRIES = 16
DEFAULT_MAX_TOKENS = 8
# Environment variables a supervisor sets on its children; /fake/stats echoes them.
ECHOED_ENV_PREFIXES = ("CUDA_", "LLMD_", "VLLM_", "FAKE_", "OMP_", "HIP_", "ROCR_")

_json_encode = msgspec.json.Encoder().encode


# --------------------------------------------------------------------------------------------
# Command line: llama-server and vLLM take dozens of flags the fakes don't care about, some with
# a value and some without. argparse would read "-ctk q8_0" as "-c tk", so a small scanner is used
# instead: known flags are read, unknown ones are skipped together with a following bare value.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    dest: str
    kind: str = "value"  # "value" (one argument), "switch"/"off" (none: True/False), "list" (1+)
    convert: Callable[[str], Any] = str


FAKE_FLAGS: dict[str, Flag] = {
    "--load-delay-s": Flag("load_delay_s", convert=float),
    "--token-delay-ms": Flag("token_delay_ms", convert=float),
    "--exit-after-s": Flag("exit_after_s", convert=float),
    "--fail-health": Flag("fail_health", "switch"),
    "--fake-embedding-dim": Flag("embedding_dim", convert=int),
    "--fake-wire": Flag("wire"),
    "--fake-controls": Flag("controls", convert=json.loads),  # Controls for every request, as JSON
}

FAKE_DEFAULTS: dict[str, Any] = {
    "load_delay_s": 0.2,
    "token_delay_ms": 0.0,
    "exit_after_s": None,
    "fail_health": False,
    "wire": "native",
    "controls": None,
}


def parse_cli(
    argv: Sequence[str], flags: dict[str, Flag], defaults: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Return (values by dest, positionals). A bare word right after an unknown flag is taken
    to be that flag's value, so positionals must not follow an unknown switch."""
    values = dict(defaults)
    positionals: list[str] = []
    after_unknown_flag = False
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not (token.startswith("-") and len(token) > 1):
            if not after_unknown_flag:
                positionals.append(token)
            after_unknown_flag = False
            continue
        name, has_inline, inline = token.partition("=")
        flag = flags.get(name)
        after_unknown_flag = flag is None and not has_inline
        if flag is None:
            continue
        if flag.kind in ("switch", "off"):
            values[flag.dest] = flag.kind == "switch"
        elif flag.kind == "list":
            items = [inline] if has_inline else []
            while i < len(argv) and not argv[i].startswith("-"):
                items.append(argv[i])
                i += 1
            values[flag.dest] = items
        else:
            if has_inline:
                raw = inline
            elif i < len(argv):
                raw = argv[i]
                i += 1
            else:
                raise SystemExit(f"error: {name} expects a value")
            try:
                values[flag.dest] = flag.convert(raw)
            except ValueError:
                raise SystemExit(f"error: invalid value for {name}: {raw!r}") from None
    return values, positionals


# --------------------------------------------------------------------------------------------
# The deterministic "model"
# --------------------------------------------------------------------------------------------


# Every word the process has given an id (tokenized or generated), so that /detokenize can map
# ids back; crc32 is not invertible.
VOCAB: dict[int, str] = {}


def token_id(word: str) -> int:
    tid = zlib.crc32(word.encode()) % VOCAB_SIZE
    VOCAB.setdefault(tid, word)
    return tid


def detokenize(ids: Iterable[Any]) -> str:
    """The words of known ids joined by spaces (the fake's tokens are whitespace-split words, so
    detokenize(tokenize(text)) is the text with its whitespace normalised); generated tokens
    ``t0 t1 ...`` are known too; an id never seen reads ``[id]``."""
    if len(VOCAB) < 1024:
        for i in range(1024):
            token_id(f"t{i}")
    return " ".join(VOCAB.get(i, f"[{i}]") if isinstance(i, int) else f"[{i}]" for i in ids)


def piece(i: int) -> str:
    """Text of generated token i."""
    return f"t{i}" if i == 0 else f" t{i}"


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def message_words(message: dict[str, Any]) -> list[str]:
    words = content_text(message.get("content")).split()
    for call in message.get("tool_calls") or ():
        function = (call.get("function") or {}) if isinstance(call, dict) else {}
        words += str(function.get("name", "")).split() + str(function.get("arguments", "")).split()
    return words


def chat_prompt(messages: Iterable[dict[str, Any]]) -> list[str]:
    tokens: list[str] = []
    for message in messages:
        role = str(message.get("role", "")) if isinstance(message, dict) else ""
        words = message_words(message) if isinstance(message, dict) else []
        tokens += ["<|im_start|>", role, *words, "<|im_end|>", "\n"]
    return tokens


def completion_prompt(prompt: Any) -> list[str]:
    """Words of a completions prompt: a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        return prompt.split()
    if isinstance(prompt, list):
        tokens: list[str] = []
        for item in prompt:
            tokens += completion_prompt(item) if isinstance(item, str | list) else [str(item)]
        return tokens
    return []


def anthropic_chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """An Anthropic Messages request as chat messages, the way llama.cpp converts it before its
    chat template (and vLLM alike, as far as the prompt's words go): ``system`` (a string, or text
    blocks concatenated without a separator) is a system message; ``messages`` that is not a
    list counts as no message; text blocks are the content, tool_use blocks tool calls, and
    tool_result blocks tool messages. The caller checks that ``messages`` is present."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str):
        out.append({"role": "system", "content": system})
    elif isinstance(system, list):
        text = "".join(str(b.get("text", "")) for b in system if isinstance(b, dict) and b.get("type") == "text")
        out.append({"role": "system", "content": text})
    messages = body.get("messages")
    for msg in messages if isinstance(messages, list) else ():
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        texts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(block)
            elif kind == "tool_use":
                calls.append({"id": block.get("id", ""), "type": "function",
                              "function": {"name": block.get("name", ""),
                                           "arguments": json.dumps(block.get("input", {}))}})
            elif kind == "tool_result":
                results.append({"role": "tool", "content": content_text(block.get("content"))})
        if texts or calls:
            out.append({"role": msg.get("role", ""), "content": texts, "tool_calls": calls})
        out += results
    return out


def responses_chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """An OpenAI Responses request as chat messages (llama.cpp's conversion, as far as the
    prompt's words go): ``instructions`` is a system message, a string ``input`` one user
    message; a list ``input`` holds messages (string or input_text/output_text parts),
    function_call items (an assistant tool call) and function_call_output items (a tool
    message). The caller checks that ``input`` is a string or a list."""
    out: list[dict[str, Any]] = []
    if "instructions" in body:
        out.append({"role": "system", "content": str(body.get("instructions") or "")})
    value = body.get("input")
    if isinstance(value, str):
        return [*out, {"role": "user", "content": value}]
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "function_call":
            out.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": item.get("call_id", ""), "type": "function",
                 "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "")}}]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "content": str(item.get("output", ""))})
        elif "role" in item:
            out.append({"role": item["role"], "content": item.get("content", "")})
    return out


def infill_prompt(body: dict[str, Any]) -> list[str]:
    """The words of a FIM prompt, laid out as llama.cpp's format_prompt_infill does: each extra
    context chunk (``<|file_sep|>``, its file name and text), then ``<|fim_prefix|>`` prefix
    ``<|fim_suffix|>`` suffix ``<|fim_middle|>`` and the prompt."""
    words: list[str] = []
    for chunk in body.get("input_extra") or ():
        words += ["<|file_sep|>", *str(chunk.get("filename", "")).split(), *str(chunk.get("text", "")).split()]
    words += ["<|fim_prefix|>", *str(body.get("input_prefix", "")).split(),
              "<|fim_suffix|>", *str(body.get("input_suffix", "")).split(),
              "<|fim_middle|>", *(body.get("prompt") if isinstance(body.get("prompt"), str) else "").split()]
    return words


def rerank_score(query: str, document: str) -> float:
    """A deterministic relevance score: the share of the query's distinct words (lower-cased,
    punctuation stripped) that the document contains."""
    def words(text: str) -> set[str]:
        return {w.strip(".,;:!?\"'()").lower() for w in text.split()} - {""}

    q = words(query)
    return len(q & words(document)) / len(q) if q else 0.0


def embedding(text: str, dim: int) -> list[float]:
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def embedding_base64(vector: Sequence[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embedding_inputs(value: Any) -> list[str]:
    """One text per embedding the input asks for (a string, a list of strings, token ids...)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        return [v if isinstance(v, str) else " ".join(map(str, v)) if isinstance(v, list) else str(v)
                for v in value]
    return []


def example_json(schema: Any) -> Any:
    """The smallest value of a JSON schema's shape, so that response_format answers parse."""
    if not isinstance(schema, dict):
        return {}
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        required = schema.get("required") or list(props)
        return {name: example_json(props.get(name)) for name in required}
    if schema.get("enum"):
        return schema["enum"][0]
    return {"string": "t0", "integer": 0, "number": 0, "boolean": False, "array": [], "null": None}.get(
        kind if isinstance(kind, str) else "object", {}
    )


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class Output:
    """What the model "generates": one piece per token; with a tool call, token 0 names the
    function and the pieces are fragments of its arguments."""

    pieces: list[str]
    finish_reason: str
    tool_call: ToolCall | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.pieces) + (1 if self.tool_call else 0)

    @property
    def text(self) -> str:
        return "" if self.tool_call else "".join(self.pieces)

    def delta(self, i: int) -> dict[str, Any]:
        """The chat stream delta of token i (both servers stream tool calls the OpenAI way)."""
        call = self.tool_call
        if call is None:
            return {"content": self.pieces[i]}
        if i == 0:
            return {"tool_calls": [{"index": 0, "id": call.id, "type": "function", "function": {"name": call.name}}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": self.pieces[i - 1]}}]}

    def tool_calls(self) -> list[dict[str, Any]]:
        call = self.tool_call
        if call is None:
            return []
        return [{"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]


def split_pieces(text: str, size: int = 4) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def words_as_pieces(text: str) -> list[str]:
    """Split text into tokens that keep their leading whitespace, so joining them restores it."""
    pieces: list[str] = []
    current = ""
    for ch in text:
        if ch.isspace() and current.strip():
            pieces.append(current)
            current = ""
        current += ch
    if current:
        pieces.append(current)
    return pieces


def plan_output(body: dict[str, Any], ctl: Controls, n_tokens: int, tool_call_id: str) -> Output:
    if ctl.tool_call:
        tool = ctl.tool_call if isinstance(ctl.tool_call, dict) else {}
        name = tool.get("name") or first_tool_name(body) or "get_weather"
        arguments = tool.get("arguments", first_tool_example(body))
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, separators=(",", ":"))
        return Output(split_pieces(arguments), "tool_calls", ToolCall(tool_call_id, name, arguments))
    if ctl.echo_tool:
        tool_messages = [m for m in body.get("messages") or () if isinstance(m, dict) and m.get("role") == "tool"]
        return Output(words_as_pieces(str(tool_messages[-1].get("content", "")) if tool_messages else ""), "stop")
    if ctl.text is not None:
        return Output(words_as_pieces(ctl.text), "stop")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        schema = (response_format.get("json_schema") or {}).get("schema") or response_format.get("schema")
        return Output(words_as_pieces(json.dumps(example_json(schema or {}))), "stop")
    return Output([piece(i) for i in range(n_tokens)], "length")


def last_role(body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return messages[-1].get("role")
    return None


def first_tool_name(body: dict[str, Any]) -> str | None:
    tools = body.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        return (tools[0].get("function") or {}).get("name")
    return None


def first_tool_example(body: dict[str, Any]) -> Any:
    tools = body.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        return example_json((tools[0].get("function") or {}).get("parameters") or {"type": "object"})
    return {}


class PromptCache:
    """Prefix reuse as a replica sees it: only prompts this process served can be cached."""

    def __init__(self, entries: int = PROMPT_CACHE_ENTRIES) -> None:
        self._prompts: deque[tuple[str, ...]] = deque(maxlen=entries)

    def match_and_store(self, prompt: Sequence[str]) -> int:
        tokens = tuple(prompt)
        best = 0
        for previous in self._prompts:
            n = 0
            for a, b in zip(previous, tokens, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        with contextlib.suppress(ValueError):
            self._prompts.remove(tokens)
        self._prompts.append(tokens)
        return min(best, max(len(tokens) - 1, 0))

    def clear(self) -> None:
        self._prompts.clear()


# --------------------------------------------------------------------------------------------
# Per-request controls
# --------------------------------------------------------------------------------------------


class Controls(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    delay_ms: float = 0  # before the first byte (after a slot is taken, like prompt processing)
    token_delay_ms: float | None = None  # overrides --token-delay-ms
    status: int | None = None  # answer this HTTP status with the server's error body
    message: str = "fake error"
    headers: dict[str, str] = {}  # extra headers on the status answer, e.g. Retry-After
    body: str | None = None  # raw text/plain body for the status answer instead of JSON
    hang: bool = False  # never answer
    drop: bool = False  # reset the connection before the first byte
    hang_after_tokens: int | None = None
    drop_after_tokens: int | None = None
    error_after_tokens: int | None = None  # stream: an SSE error event, then the stream ends
    ping: bool = False  # stream: an SSE comment ":\n\n" before every token, like llama's keep-alive
    tool_call: bool | dict[str, Any] = False  # {"name": ..., "arguments": {...}} to choose the call
    text: str | None = None  # answer exactly this text (finish_reason "stop")
    # A tool loop: these controls replace the request's when its last message is a tool result
    # (e.g. call a tool first, then answer text once the result is in).
    after_tool: dict[str, Any] | None = None
    echo_tool: bool = False  # answer the last tool message's content as text (what the model saw)
    exit: bool = False  # the process exits with status 1 at once
    wire: str | dict[str, Any] | None = None  # a WIRE_PROFILES name, or knobs over the process's profile


NO_CONTROLS = Controls()


# --------------------------------------------------------------------------------------------
# Wire profiles: the same answers framed the ways real upstreams (and proxies between) frame them
# --------------------------------------------------------------------------------------------


class Wire(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """How answers are put on the wire. The defaults are what llama-server and vLLM send;
    every other value is something a real OpenAI-compatible upstream or a proxy does."""

    json: str = "compact"  # "compact" (no spaces) or "spaced" (Python's json.dumps: ", " and ": ")
    data_prefix: str = "data: "  # or "data:" (the SSE spec makes the space optional)
    eol: str = "\n"  # or "\r\n" (CRLF line endings, as some proxies and servers send)
    split: bool = False  # SSE bytes cut at arbitrary points across writes, several events per write
    gzip: bool = False  # non-stream answers gzip-compressed when the request accepts gzip
    openai_role: bool = False  # OpenAI's chunks: role delta {"role","content":"","refusal":null},
    # "logprobs":null in every choice, "usage":null on every chunk when include_usage was asked
    timings: bool = True  # llama-server's "timings" object (a llama-server-only field)
    stream_usage: bool = True  # honour stream_options.include_usage (some servers ignore it)


WIRE_PROFILES: dict[str, Wire] = {
    "native": Wire(),
    # api.openai.com: compact JSON, "data: ", LF; OpenAI's role chunk; no timings; gzip on request.
    "openai": Wire(openai_role=True, timings=False, gzip=True),
    # Everything a parser can trip on at once: spaced JSON, "data:" without a space, CRLF, events
    # split across writes (a write may end between "\r" and "\n") and coalesced, gzip.
    "chaos": Wire(json="spaced", data_prefix="data:", eol="\r\n", split=True, gzip=True, openai_role=True,
                  timings=False),
    # An upstream that never sends a usage event nor timings: tokens must be counted from chunks.
    "no-usage": Wire(timings=False, stream_usage=False),
}


def resolve_wire(default: str, control: str | dict[str, Any] | None) -> Wire:
    """The profile of one request: the process's ``--fake-wire`` under the request's control."""
    base = WIRE_PROFILES[default]
    if control is None:
        return base
    if isinstance(control, str):
        if control not in WIRE_PROFILES:
            raise ValueError(f"unknown wire profile {control!r}; known: {', '.join(WIRE_PROFILES)}")
        return WIRE_PROFILES[control]
    return msgspec.convert({**msgspec.structs.asdict(base), **control}, Wire)


def _spaced(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def wire_encode(wire: Wire, obj: Any) -> bytes:
    return _spaced(obj) if wire.json == "spaced" else _json_encode(obj)


def wire_shape(wire: Wire, obj: Any, include_usage: bool) -> Any:
    """An answer or chunk as the profile sends it (a shallow copy when something changes)."""
    if not isinstance(obj, dict):
        return obj
    if not wire.timings and "timings" in obj:
        obj = {k: v for k, v in obj.items() if k != "timings"}
    if wire.openai_role and str(obj.get("object", "")).startswith("chat.completion"):
        choices = []
        for choice in obj.get("choices") or ():
            choice = dict(choice)
            if isinstance(choice.get("delta"), dict) and "role" in choice["delta"]:
                choice["delta"] = {"role": "assistant", "content": "", "refusal": None}
            if isinstance(choice.get("message"), dict):
                choice["message"] = {"refusal": None, **choice["message"]}
            choice.setdefault("logprobs", None)
            choices.append(choice)
        obj = {**obj, "choices": choices}
        if include_usage and obj["object"] == "chat.completion.chunk" and "usage" not in obj:
            obj["usage"] = None
    return obj


@dataclass(frozen=True)
class Named:
    """An SSE event with an ``event:`` line before its data, as Anthropic Messages and OpenAI
    Responses streams name every event (llama-server and vLLM alike)."""

    event: str
    data: Any


class SseWriter:
    """Writes one SSE answer in a wire profile. With ``split``, each event's bytes go out in
    pieces (separate writes, a moment apart, so that they reach the reader separately), the last
    piece is held back and goes out with the next event, and now and then a whole event waits for
    the next one: events span reads and reads hold several events."""

    def __init__(self, response: web.StreamResponse, wire: Wire, seed: int, include_usage: bool) -> None:
        self.response = response
        self.wire = wire
        self.include_usage = include_usage
        self.rng = random.Random(seed)
        self.pending = b""
        self.eol = wire.eol.encode()

    async def event(self, obj: Any) -> None:
        if isinstance(obj, Named):
            # Usage is part of these protocols' own events (message_delta, response.completed):
            # no profile drops it. "event:" follows the profile's "data:" spelling.
            name = self.wire.data_prefix.replace("data", "event").encode() + obj.event.encode()
            payload = wire_encode(self.wire, wire_shape(self.wire, obj.data, False))
            await self._send(name + self.eol + self.wire.data_prefix.encode() + payload + self.eol + self.eol)
            return
        if not self.wire.stream_usage and isinstance(obj, dict) and "usage" in obj:
            if not obj.get("choices"):
                return  # a usage-only chunk: this upstream never sends one
            obj = {k: v for k, v in obj.items() if k != "usage"}
        payload = wire_encode(self.wire, wire_shape(self.wire, obj, self.include_usage))
        await self._send(self.wire.data_prefix.encode() + payload + self.eol + self.eol)

    async def done(self) -> None:
        await self._send(self.wire.data_prefix.encode() + b"[DONE]" + self.eol + self.eol)

    async def comment(self) -> None:
        await self._send(b":" + self.eol + self.eol)

    async def flush(self) -> None:
        """Everything held back goes out (before a hang, a reset or the end of the answer)."""
        if self.pending:
            data, self.pending = self.pending, b""
            await self.response.write(data)

    async def _send(self, data: bytes) -> None:
        if not self.wire.split:
            await self.response.write(data)
            return
        buf = self.pending + data
        if self.rng.random() < 0.3:
            self.pending = buf  # this event waits: the next write carries two
            return
        cuts = set(self.rng.sample(range(1, len(buf)), min(3, len(buf) - 1)))
        crlf = buf.rfind(b"\r\n")
        if crlf > 0:
            cuts.add(crlf + 1)  # between "\r" and "\n" of the event's end: a CRLF across reads
        points = sorted(cuts)
        pieces = [buf[a:b] for a, b in zip([0, *points[:-1]], points, strict=True)]
        self.pending = buf[points[-1]:]
        for piece in pieces:
            await self.response.write(piece)
            await asyncio.sleep(0.002)  # a separate TCP segment, so a separate read upstream


# --------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One generation request, from admission to its last byte."""

    task_id: int
    prompt: list[str]
    cached: int = 0
    n_predict: int = 0
    slot: int = -1
    decoded: int = 0
    t_arrived: float = field(default_factory=time.monotonic)
    t_prompt_start: float = 0.0
    t_prompt_end: float = 0.0
    t_first_token: float = 0.0
    t_end: float = 0.0
    finish_reason: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    def timings(self) -> dict[str, Any]:
        """llama-server's ``timings`` object, from this job's real clock."""
        prompt_n = self.prompt_tokens - self.cached
        prompt_ms = max((self.t_prompt_end - self.t_prompt_start) * 1000.0, 0.001)
        predicted_ms = max(((self.t_end or time.monotonic()) - self.t_prompt_end) * 1000.0, 0.001)
        return {
            "cache_n": self.cached,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
            "prompt_per_second": 1000.0 * prompt_n / prompt_ms,
            "predicted_n": self.decoded,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / max(self.decoded, 1),
            "predicted_per_second": 1000.0 * self.decoded / predicted_ms,
        }


class SlotPool:
    """llama-server's slots / vLLM's max-num-seqs: requests beyond it wait (deferred/waiting)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = list(range(size))
        self._sem = asyncio.Semaphore(size)
        self.waiting = 0
        self.running: dict[int, Job] = {}

    async def acquire(self, job: Job) -> None:
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        job.slot = self._free.pop(0)
        self.running[job.slot] = job

    def release(self, job: Job) -> None:
        if self.running.pop(job.slot, None) is not None:
            self._free.append(job.slot)
            self._free.sort()
            self._sem.release()


@dataclass
class Stats:
    requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    completed: int = 0
    errors: int = 0
    cancelled: int = 0
    dropped: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    last_headers: dict[str, str] = field(default_factory=dict)
    last_body: Any = None
    last_raw: str = ""  # the body exactly as received, to check byte-for-byte forwarding
    bodies: deque[Any] = field(default_factory=lambda: deque(maxlen=50))
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


REQUEST_DROPPED = web.RequestKey("fake_dropped", bool)
REQUEST_WIRE = web.RequestKey("fake_wire", Wire)


def abort_connection(request: web.Request) -> None:
    """Reset the TCP connection (RST, not FIN), as a crashing or killed server would."""
    request[REQUEST_DROPPED] = True
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def crash(code: int, why: str) -> None:
    print(f"fake: {why}: exiting with status {code}", file=sys.stderr, flush=True)
    os._exit(code)


def json_response(obj: Any, status: int = 200, *, charset: str | None = None,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_json_encode(obj), status=status, content_type="application/json",
                        charset=charset, headers=headers)


def sse_event(obj: Any) -> bytes:
    return b"data: " + _json_encode(obj) + b"\n\n"


class RequestError(Exception):
    """A request the server refuses; each fake renders it in its own error envelope."""

    def __init__(self, status: int, message: str, *, error_type: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.extra = extra or {}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
InferenceHandler = Callable[[web.Request, dict[str, Any], Controls], Awaitable[web.StreamResponse]]
HelperHandler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


class Renderer:
    """The wire format of one generation request; each fake subclasses it per endpoint.

    ``head`` goes out before the first token, ``chunk(i)`` carries token i, ``tail`` follows the
    last token (finish, usage) and ``final`` is the non-stream body; ``tail`` and ``final`` are
    called after generation so that usage and timings are complete."""

    done_marker: ClassVar[bytes | None] = b"data: [DONE]\n\n"
    done_after_error: ClassVar[bool] = False  # vLLM still sends [DONE] after an error event
    content_type: ClassVar[str] = "text/event-stream"

    def __init__(self, job: Job, output: Output) -> None:
        self.job = job
        self.output = output

    def head(self) -> list[Any]:
        return []

    def chunk(self, i: int) -> Any:
        raise NotImplementedError

    def tail(self) -> list[Any]:
        return []

    def final(self) -> Any:
        raise NotImplementedError

    def stream_error(self, message: str) -> Any:
        return {"error": {"code": 500, "message": message, "type": "server_error"}}


class FakeServer:
    """A fake inference server: flags, stats, slots, the generation loop and the process life
    cycle. Subclasses add their routes and wire formats."""

    name: ClassVar[str] = "fake"
    listen_while_loading: ClassVar[bool] = True
    server_header: ClassVar[str] = "fake"
    json_charset: ClassVar[str | None] = None

    def __init__(self, opts: dict[str, Any], slots: int) -> None:
        if opts["wire"] not in WIRE_PROFILES:
            raise SystemExit(f"error: --fake-wire: unknown profile {opts['wire']!r}; known: {', '.join(WIRE_PROFILES)}")
        if opts["controls"] is not None:
            try:
                msgspec.convert(opts["controls"], Controls)
            except msgspec.ValidationError as exc:
                raise SystemExit(f"error: --fake-controls: {exc}") from None
        self.opts = opts
        self.host: str = opts["host"]
        self.port: int = opts["port"]
        self.ready = False
        self.started_at = time.time()
        self.stats = Stats()
        self.slots = SlotPool(slots)
        self.cache = PromptCache()
        self._task_ids = 0
        self.app = web.Application(middlewares=[self._middleware])
        self.app.on_response_prepare.append(self._set_server_header)
        self.app.router.add_get("/fake/stats", self._get_stats)
        self.app.router.add_post("/fake/reset", self._post_reset)

    # ---- hooks for subclasses ----

    def error_response(self, status: int, message: str, *, error_type: str | None = None,
                       headers: dict[str, str] | None = None,
                       extra: dict[str, Any] | None = None) -> web.Response:
        raise NotImplementedError

    def not_found(self) -> web.Response:
        raise NotImplementedError

    def method_not_allowed(self) -> web.Response:
        return self.not_found()

    def loading_response(self, request: web.Request) -> web.StreamResponse | None:
        """The answer to any request while loading, or None to serve it normally."""
        return None

    def malformed_json(self, exc: json.JSONDecodeError, raw: bytes) -> web.Response:
        raise NotImplementedError

    def log_listening(self) -> None: ...

    def log_bind_error(self, exc: OSError) -> None:
        # uvicorn's wording (vLLM's front end)
        print(f"ERROR:    [Errno {exc.errno}] error while attempting to bind on address ({self.host!r}, {self.port}): "
              f"{(exc.strerror or str(exc)).lower()}", file=sys.stderr, flush=True)

    def log_ready(self) -> None: ...

    # ---- plumbing ----

    def json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return json_response(obj, status, charset=self.json_charset, headers=headers)

    def wire_json(self, request: web.Request, obj: Any) -> web.Response:
        """A 200 answer in the request's wire profile (gzip only when the request accepts it)."""
        wire = request.get(REQUEST_WIRE) or WIRE_PROFILES[self.opts["wire"]]
        if wire == WIRE_PROFILES["native"]:
            return self.json(obj)
        body = wire_encode(wire, wire_shape(wire, obj, False))
        headers = {}
        if wire.gzip and "gzip" in request.headers.get("Accept-Encoding", "").lower():
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, content_type="application/json", charset=self.json_charset,
                            headers=headers)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/fake/") and not self.ready:
            answer = self.loading_response(request)
            if answer is not None:
                return answer
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return self.not_found()
        except web.HTTPMethodNotAllowed:
            return self.method_not_allowed()

    async def _set_server_header(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = self.server_header

    async def read_json(self, request: web.Request) -> Any:
        """The parsed body, or the server's malformed-JSON answer as a web.Response."""
        raw = await request.read()
        try:
            return json.loads(raw) if raw else {}
        except json.JSONDecodeError as exc:
            return self.malformed_json(exc, raw)
        except UnicodeDecodeError:
            return self.malformed_json(json.JSONDecodeError("invalid UTF-8", "", 0), raw)

    def inference(self, handler: InferenceHandler) -> Handler:
        """Wrap a generation/embedding route: count it, parse JSON and controls, track it."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            stats = self.stats
            stats.requests += 1
            stats.by_path[request.path] += 1
            stats.last_headers = dict(request.headers)
            stats.last_raw = (await request.read()).decode(errors="replace")
            body = await self.read_json(request)
            if isinstance(body, web.Response):
                stats.last_body = stats.last_raw
                stats.bodies.append(stats.last_body)
                stats.errors += 1
                return body
            stats.last_body = body
            stats.bodies.append(body)
            if not isinstance(body, dict):
                stats.errors += 1
                return self.error_response(400, "request body must be a JSON object")
            try:
                if "fake" in body or self.opts["controls"]:
                    # the request's own controls win over the process's --fake-controls
                    ctl = msgspec.convert({**(self.opts["controls"] or {}), **(body.get("fake") or {})}, Controls)
                    if ctl.after_tool is not None and last_role(body) == "tool":
                        ctl = msgspec.convert(ctl.after_tool, Controls)
                else:
                    ctl = NO_CONTROLS
            except msgspec.ValidationError as exc:
                stats.errors += 1
                return self.error_response(400, f"fake: {exc}")
            try:
                request[REQUEST_WIRE] = resolve_wire(self.opts["wire"], ctl.wire)
            except (ValueError, msgspec.ValidationError) as exc:
                stats.errors += 1
                return self.error_response(400, f"fake: wire: {exc}")
            if ctl.exit:
                crash(1, "request asked to exit")
            async with self._tracked(request):
                try:
                    response = await handler(request, body, ctl)
                except RequestError as exc:
                    response = self.error_response(exc.status, exc.message, error_type=exc.error_type,
                                                   extra=exc.extra)
                if response.status >= 400:
                    stats.errors += 1
                return response

        return wrapped

    def helper(self, handler: HelperHandler) -> Handler:
        """Wrap a route that answers without generating (tokenizer, templates, token counts): no
        slot, not counted in ``requests`` (the gateway calls some of them on its own), only its
        path in ``by_path``. Controls apply only when the request carries its own ``"fake"``
        (delay, status, drop, hang): the process's --fake-controls are meant for inference."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.stats.by_path[request.path] += 1
            body = await self.read_json(request)
            if isinstance(body, web.Response):
                return body
            if not isinstance(body, dict):
                return self.error_response(400, "request body must be a JSON object")
            try:
                ctl = msgspec.convert(body.get("fake") or {}, Controls)
            except msgspec.ValidationError as exc:
                return self.error_response(400, f"fake: {exc}")
            early = await self._before_first_byte(request, ctl)
            if early is not None:
                return early
            try:
                return await handler(request, body)
            except RequestError as exc:
                return self.error_response(exc.status, exc.message, error_type=exc.error_type, extra=exc.extra)

        return wrapped

    @contextlib.asynccontextmanager
    async def _tracked(self, request: web.Request) -> AsyncIterator[None]:
        """in_flight covers a request until its last byte is written or its client is gone."""
        stats = self.stats
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        try:
            yield
        except (asyncio.CancelledError, ConnectionError):
            # aiohttp cancels the handler when the peer goes away (handler_cancellation=True);
            # a write to a closed socket raises ConnectionResetError instead.
            if request.get(REQUEST_DROPPED):
                stats.dropped += 1
            else:
                stats.cancelled += 1
            raise
        else:
            stats.completed += 1
        finally:
            stats.in_flight -= 1

    def next_task_id(self) -> int:
        self._task_ids += 1
        return self._task_ids

    def token_delay_s(self, ctl: Controls) -> float:
        ms = ctl.token_delay_ms if ctl.token_delay_ms is not None else self.opts["token_delay_ms"]
        return max(ms, 0.0) / 1000.0

    def control_error(self, ctl: Controls, request: web.Request) -> web.Response:
        """The answer to a ``status`` control: the server's error envelope for that route."""
        status = ctl.status or 500
        if ctl.body is not None:
            return web.Response(text=ctl.body, status=status, headers=ctl.headers)
        return self.error_response(status, ctl.message, headers=ctl.headers)

    def start_prompt(self, job: Job) -> None:
        job.t_prompt_start = time.monotonic()
        job.cached = self.cache.match_and_store(job.prompt)
        self.stats.prompt_tokens += job.prompt_tokens
        self.stats.cached_tokens += job.cached
        self.count_prompt(job)
        job.t_prompt_end = time.monotonic()

    def count_prompt(self, job: Job) -> None:
        """Subclasses update their /metrics counters here."""

    def count_token(self, job: Job) -> None:
        job.decoded += 1
        if job.decoded == 1:
            job.t_first_token = time.monotonic()
        self.stats.completion_tokens += 1

    def count_finished(self, job: Job, finish_reason: str) -> None:
        """Called once per started job ("abort" when its client left); subclasses extend it to
        update their /metrics counters."""
        job.finish_reason = finish_reason

    async def _before_first_byte(self, request: web.Request, ctl: Controls) -> web.Response | None:
        if ctl.delay_ms:
            await asyncio.sleep(ctl.delay_ms / 1000.0)
        if ctl.status is not None:
            return self.control_error(ctl, request)
        if ctl.drop:
            abort_connection(request)
            await asyncio.Future()  # the connection_lost cancellation ends this handler
        if ctl.hang:
            await asyncio.Future()
        return None

    async def generate(self, request: web.Request, ctl: Controls, job: Job, renderer: Renderer,
                       stream: bool) -> web.StreamResponse:
        await self.slots.acquire(job)
        try:
            early = await self._before_first_byte(request, ctl)
            if early is not None:
                return early
            self.start_prompt(job)
            if stream:
                return await self._stream(request, ctl, job, renderer)
            return await self._complete(request, ctl, job, renderer)
        finally:
            job.t_end = job.t_end or time.monotonic()
            if job.t_prompt_start and job.finish_reason is None:
                self.count_finished(job, "abort")
            self.slots.release(job)

    async def answer(self, request: web.Request, ctl: Controls, job: Job,
                     build: Callable[[], Any]) -> web.StreamResponse:
        """A request without generation (embeddings): a slot, the controls, one JSON body."""
        await self.slots.acquire(job)
        try:
            early = await self._before_first_byte(request, ctl)
            if early is not None:
                return early
            job.t_prompt_start = time.monotonic()
            self.stats.prompt_tokens += job.prompt_tokens
            body = build()
            job.t_prompt_end = job.t_end = time.monotonic()
            return self.wire_json(request, body)
        finally:
            self.slots.release(job)

    async def _complete(self, request: web.Request, ctl: Controls, job: Job,
                        renderer: Renderer) -> web.StreamResponse:
        n = renderer.output.n_tokens
        delay = self.token_delay_s(ctl)
        stop_at = min((k for k in (ctl.hang_after_tokens, ctl.drop_after_tokens, ctl.error_after_tokens)
                       if k is not None), default=None)
        if stop_at is not None and stop_at <= n:
            await asyncio.sleep(delay * stop_at)
            for _ in range(stop_at):
                self.count_token(job)
            if stop_at == ctl.error_after_tokens:
                self.count_finished(job, "error")
                return self.error_response(500, ctl.message)
            if stop_at == ctl.drop_after_tokens:
                abort_connection(request)
            await asyncio.Future()
        if delay and n:
            await asyncio.sleep(delay * n)
        for _ in range(n):
            self.count_token(job)
        job.t_end = time.monotonic()
        self.count_finished(job, renderer.output.finish_reason)
        return self.wire_json(request, renderer.final())

    async def _stream(self, request: web.Request, ctl: Controls, job: Job,
                      renderer: Renderer) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": renderer.content_type})
        await response.prepare(request)
        wire = request.get(REQUEST_WIRE) or WIRE_PROFILES[self.opts["wire"]]
        include_usage = bool(getattr(renderer, "include_usage", False)) and wire.stream_usage
        out = SseWriter(response, wire, job.task_id, include_usage)
        for event in renderer.head():
            await out.event(event)
        delay = self.token_delay_s(ctl)
        n = renderer.output.n_tokens
        for i in range(n + 1):
            if i == ctl.hang_after_tokens:
                await out.flush()
                await asyncio.Future()
            if i == ctl.drop_after_tokens:
                await out.flush()
                abort_connection(request)
                await asyncio.Future()
            if i == ctl.error_after_tokens:
                self.stats.errors += 1
                self.count_finished(job, "error")
                await out.event(renderer.stream_error(ctl.message))
                if renderer.done_after_error and renderer.done_marker:
                    await out.done()
                await out.flush()
                await response.write_eof()
                return response
            if i == n:
                break
            if delay:
                await asyncio.sleep(delay)
            if ctl.ping:
                await out.comment()
            await out.event(renderer.chunk(i))
            self.count_token(job)
        job.t_end = time.monotonic()
        self.count_finished(job, renderer.output.finish_reason)
        for event in renderer.tail():
            await out.event(event)
        if renderer.done_marker:
            await out.done()
        await out.flush()
        await response.write_eof()
        return response

    # ---- introspection ----

    def stats_json(self) -> dict[str, Any]:
        s = self.stats
        env = {k: v for k, v in os.environ.items() if k.startswith(ECHOED_ENV_PREFIXES)}
        env.setdefault("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
        return {
            "server": self.name,
            "pid": os.getpid(),
            "argv": sys.argv,
            "env": env,
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "ready": self.ready,
            "started_at": self.started_at,
            "requests": s.requests,
            "in_flight": s.in_flight,
            "peak_in_flight": s.peak_in_flight,
            "processing": len(self.slots.running),
            "deferred": self.slots.waiting,
            "slots": self.slots.size,
            "completed": s.completed,
            "errors": s.errors,
            "cancelled": s.cancelled,
            "dropped": s.dropped,
            "by_path": dict(s.by_path),
            "prompt_tokens": s.prompt_tokens,
            "cached_tokens": s.cached_tokens,
            "completion_tokens": s.completion_tokens,
            "last_headers": s.last_headers,
            "last_body": s.last_body,
            "last_raw": s.last_raw,
            "bodies": list(s.bodies),
        }

    async def _get_stats(self, request: web.Request) -> web.Response:
        return json_response(self.stats_json())

    async def _post_reset(self, request: web.Request) -> web.Response:
        # in_flight is live state, not a counter: resetting it would make it go negative.
        in_flight = self.stats.in_flight
        self.stats = Stats(in_flight=in_flight, peak_in_flight=in_flight)
        self.cache.clear()
        return json_response({"ok": True})

    # ---- life cycle ----

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        if os.environ.get("FAKE_IGNORE_SIGTERM") == "1":
            # Simulates a backend stuck in a blocking call: only SIGKILL ends it.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        if self.opts["exit_after_s"] is not None:
            loop.call_later(self.opts["exit_after_s"], crash, 1, "--exit-after-s elapsed")

        # Both servers bind their port first, so a taken port fails at once. llama-server then
        # listens while it loads; vLLM only listens once its engine is up (connections are
        # refused until then).
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            self.log_bind_error(exc)
            os._exit(1)
        runner = web.AppRunner(self.app, handle_signals=False, handler_cancellation=True,
                               access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.SockSite(runner, sock)
        if self.listen_while_loading:
            await site.start()
            self.log_listening()
        # "Loading" must not delay a SIGTERM: supervisors stop replicas that are still starting.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.opts["load_delay_s"])
        if not stop.is_set():
            self.ready = True
            if not self.listen_while_loading:
                await site.start()
                self.log_listening()
            self.log_ready()
            await stop.wait()
        print(f"{self.name}: shutting down", file=sys.stderr, flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner.cleanup(), timeout=1.0)


def early_sigterm() -> None:
    """Until serve() installs its loop handler, a SIGTERM must still exit cleanly (0).
    Called first thing in each fake's main()."""
    if os.environ.get("FAKE_IGNORE_SIGTERM") != "1":
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))


def run(server: FakeServer) -> None:
    early_sigterm()
    try:
        import uvloop
    except ImportError:  # the fakes must still run where uvloop is missing
        asyncio.run(server.serve())
    else:
        uvloop.run(server.serve())


def prometheus_float(value: float) -> str:
    """prometheus_client's float formatting (vLLM exports with it): 1.0, 1.79e+09, +Inf."""
    value = float(value)
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return text
