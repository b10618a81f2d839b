"""Call: everything about one request, as it flows down the pipeline.

The middleware makes it; each step of ``pipeline`` adds what it learned (the principal, the
envelope and model, the grant, the exchange with the replica) and the settle step turns it
into a usage row, settled limits, metrics and one access log line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from .auth import Principal
from .envelope import Envelope
from .exchange import Exchange
from .limits import Grant
from .outcome import Outcome
from .routes import Route


class Sink(Protocol):
    """Where a streamed answer's events go instead of a response of the call's own: a tool
    loop's rounds share the client's one stream (toolstream.py)."""

    out: web.StreamResponse

    def event(self, payload: bytes) -> bytes | None:
        """One upstream event's data -> the bytes the client gets (None: nothing)."""


class Rewrite(Protocol):
    """Changes an answer on its way to the client: whole, or one stream event's data at a
    time (legacy.LegacyFunctions; grounding.Sources adds retrieval's sources)."""

    def whole(self, data: bytes) -> bytes: ...
    def event(self, payload: bytes) -> bytes: ...


@dataclass(eq=False, slots=True)
class Call:
    request: web.Request
    request_id: str
    client_ip: str
    start: float = field(default_factory=time.monotonic)
    cors_origin: str | None = None  # set when the request's Origin is allowed
    # The steps fill these in order; a step that raises leaves the later ones unset.
    route: Route | None = None  # an inference route; None for llmd's own routes
    principal: Principal | None = None
    env: Envelope | None = None
    model: str = ""
    grant: Grant | None = None
    reached_limits: bool = False  # a usage row is written for it (admitted or refused by limits)
    upstream_body: bytes = b""
    upstream_headers: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    hide_usage: bool = False  # llmd asked for the stream's usage chunk; the client did not
    rewrite: Rewrite | None = None  # e.g. translates the answer back for an old client
    # The completion cache (cache.py): hit | miss | bypass ("" when the model has none); the
    # entry's key when the answer may be stored; the stream's bytes as the client got them.
    cache: str = ""
    cache_key: bytes = b""
    capture: list[bytes] | None = None
    cache_leads: bool = False  # identical misses wait for this one's answer (Cache.follow)
    sink: Sink | None = None  # a stream already open to the client (a tool loop's)
    exchange: Exchange = field(init=False)
    status: int = 0  # what the client got (499 when it left first)

    def __post_init__(self) -> None:
        self.exchange = Exchange(t_start=self.start)

    def access_fields(self, status: int, nbytes: int) -> dict[str, Any]:
        """The access log line's fields (never a body or a secret)."""
        now = time.monotonic()
        request = self.request
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "method": request.method,
            "path": request.path,
            "status": status,
            "duration_ms": round((now - self.start) * 1000, 2),
            "bytes": nbytes,
            "client": self.client_ip,
        }
        if self.route is not None:
            fields.update(key=self.key_id, tier=self.tier, model=self.model, stream=self.stream)
            ex = self.exchange
            if ex.replica or self.grant is not None:
                fields.update(
                    replica=ex.replica,
                    outcome=str(ex.outcome),
                    prompt_tokens=ex.prompt_tokens,
                    completion_tokens=ex.completion_tokens,
                    ttft_ms=round(ex.ttft_s * 1000, 2) if ex.ttft_s is not None else None,
                    upstream_ms=round(ex.upstream_s * 1000, 2),
                    overhead_ms=round((now - self.start - ex.upstream_s) * 1000, 3),
                )
        return fields

    @property
    def outcome(self) -> Outcome:
        return self.exchange.outcome

    @property
    def key_id(self) -> str:
        return self.principal.key_id if self.principal else ""

    @property
    def tier(self) -> str:
        return self.principal.tier if self.principal else ""

    @property
    def stream(self) -> bool:
        return bool(self.env and self.env.stream)
