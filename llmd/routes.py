"""The route table: every inference route llmd serves, as data.

A route says which paths clients call, where it goes upstream, which envelope field it
requires, which fields feed prefix affinity, how its usage is read (its meter), and which
backends serve it. The pipeline reads this table; it has no branch per route. Adding a
route is a line here (and a meter when the protocol is new).
"""

from __future__ import annotations

from dataclasses import dataclass

from .envelope import Envelope
from .meter import OPENAI, Meter

ALL_BACKENDS = frozenset({"llama-server", "vllm", "openai"})


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # the ledger's and the metrics' label
    paths: tuple[str, ...]  # what clients call
    upstream_path: str  # appended to the replica's base url (which ends in /v1)
    required: str  # the envelope field a request must carry
    affinity: tuple[str, ...]  # envelope fields whose raw bytes, in order, feed prefix affinity
    meter: Meter  # reads usage from whole answers and stream events
    envelope: type[Envelope] = Envelope
    backends: frozenset[str] = ALL_BACKENDS
    usage_option: bool = True  # a stream may be asked for stream_options.include_usage


# The unprefixed paths are llama-server's too: clients configured without /v1 work.
ROUTES: tuple[Route, ...] = (
    Route(
        name="chat",
        paths=("/v1/chat/completions", "/chat/completions"),
        upstream_path="/chat/completions",
        required="messages",
        affinity=("messages",),
        meter=OPENAI,
    ),
    Route(
        name="completions",
        paths=("/v1/completions", "/completions"),
        upstream_path="/completions",
        required="prompt",
        affinity=("prompt",),
        meter=OPENAI,
    ),
    Route(
        name="embeddings",
        paths=("/v1/embeddings", "/embeddings"),
        upstream_path="/embeddings",
        required="input",
        affinity=(),
        meter=OPENAI,
        usage_option=False,
    ),
)

BY_PATH: dict[str, Route] = {p: r for r in ROUTES for p in r.paths}
