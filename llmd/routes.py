"""The route table: every inference route llmd serves, as data.

A route says which paths clients call, where it goes upstream, which envelope field it
requires, which fields feed prefix affinity, how its usage is read (its meter), how llmd's
own errors are written on it, and which client headers travel upstream. The pipeline reads
this table and has no branch per route; which backends serve a route is the launchers'
(``launchers.served_routes``). Adding a route is an entry here (and a meter when the
protocol is new).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .envelope import Envelope
from .meter import ANTHROPIC, OPENAI, RESPONSES, ZERO, Meter
from .nativemeter import NATIVE


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # the ledger's and the metrics' label; what `routes:` of a remote model names
    paths: tuple[str, ...]  # what clients call
    upstream_path: str  # where it goes: under the replica's /v1 base, or its origin when native
    meter: Meter  # reads usage from whole answers and stream events
    required: str | None = None  # the envelope field a request must carry
    affinity: tuple[str, ...] = ()  # envelope fields whose raw bytes, in order, feed prefix affinity
    native: bool = False  # upstream_path is under the server's origin, not its /v1 base
    usage_option: bool = False  # a stream may be asked for stream_options.include_usage
    legacy_functions: bool = False  # OpenAI's functions/function_call are translated to tools
    errors: Literal["openai", "anthropic"] = "openai"  # the envelope of llmd's own errors
    forward_headers: tuple[str, ...] = ()  # client headers passed upstream as they are
    envelope: type[Envelope] = Envelope


ROUTES: tuple[Route, ...] = (
    # The OpenAI three; the unprefixed paths are llama-server's too (clients set without /v1).
    Route(
        name="chat",
        paths=("/v1/chat/completions", "/chat/completions"),
        upstream_path="/chat/completions",
        meter=OPENAI,
        required="messages",
        affinity=("messages",),
        usage_option=True,
        legacy_functions=True,
    ),
    Route(
        name="completions",
        paths=("/v1/completions", "/completions"),
        upstream_path="/completions",
        meter=OPENAI,
        required="prompt",
        affinity=("prompt",),
        usage_option=True,
    ),
    Route(
        name="embeddings",
        paths=("/v1/embeddings", "/embeddings"),
        upstream_path="/embeddings",
        meter=OPENAI,
        required="input",
    ),
    # Anthropic Messages (Claude Code and the anthropic SDK).
    Route(
        name="messages",
        paths=("/v1/messages",),
        upstream_path="/messages",
        meter=ANTHROPIC,
        required="messages",
        affinity=("system", "messages"),
        errors="anthropic",
        forward_headers=("anthropic-version", "anthropic-beta"),
    ),
    Route(
        name="count_tokens",
        paths=("/v1/messages/count_tokens",),
        upstream_path="/messages/count_tokens",
        meter=ZERO,
        required="messages",
        errors="anthropic",
        forward_headers=("anthropic-version", "anthropic-beta"),
    ),
    # OpenAI Responses (Codex CLI, newer SDK code).
    Route(
        name="responses",
        paths=("/v1/responses", "/responses"),
        upstream_path="/responses",
        meter=RESPONSES,
        required="input",
        affinity=("instructions", "input"),
    ),
    Route(
        name="input_tokens",
        paths=("/v1/responses/input_tokens", "/responses/input_tokens"),
        upstream_path="/responses/input_tokens",
        meter=ZERO,
    ),
    Route(
        name="chat_input_tokens",
        paths=("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"),
        upstream_path="/chat/completions/input_tokens",
        meter=ZERO,
        required="messages",
    ),
    # llama.cpp's own (llama.vscode, llama.vim, scripts written for one llama-server).
    Route(
        name="infill",
        paths=("/infill",),
        upstream_path="/infill",
        meter=NATIVE,
        affinity=("input_extra", "input_prefix"),  # same file context, same replica cache
        native=True,
    ),
    Route(
        name="completion",
        paths=("/completion",),
        upstream_path="/completion",
        meter=NATIVE,
        required="prompt",
        affinity=("prompt",),
        native=True,
    ),
    Route(name="tokenize", paths=("/tokenize",), upstream_path="/tokenize", meter=ZERO, native=True),
    Route(name="detokenize", paths=("/detokenize",), upstream_path="/detokenize", meter=ZERO, native=True),
    Route(
        name="apply_template",
        paths=("/apply-template",),
        upstream_path="/apply-template",
        meter=ZERO,
        required="messages",
        native=True,
    ),
    Route(
        name="rerank",
        paths=("/v1/rerank", "/rerank", "/v1/reranking", "/reranking"),
        upstream_path="/rerank",
        meter=OPENAI,  # usage.prompt_tokens, as OpenAI-style embeddings
        required="query",
    ),
)

BY_PATH: dict[str, Route] = {p: r for r in ROUTES for p in r.paths}
BY_NAME: dict[str, Route] = {r.name: r for r in ROUTES}
