"""Exchange: what happened on the wire between llmd and the replica for one request."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .outcome import Outcome


@dataclass(eq=False, slots=True)
class Exchange:
    """Filled by the relay and the route's meter; the pipeline's settle step turns it into a
    usage row, limits settled, metrics and an access log line."""

    t_start: float  # time.monotonic() when the request arrived; ttft counts from here
    replica: str = ""
    backend: str = ""
    origin: str = ""  # the replica's scheme://host:port, for /tokenize after an abort
    status: int = 0  # the upstream's HTTP status
    outcome: Outcome = Outcome.OK
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    usage_seen: bool = False  # the upstream told the whole usage
    prompt_seen: bool = False  # the upstream told the prompt's tokens (e.g. Anthropic's message_start)
    token_method: str = "none"  # upstream | tokenize | estimate, with stream_chunks+ for streams
    chunks: int = 0  # tokens relayed in stream events (one per delta on llama-server/vLLM)
    ttft_s: float | None = None
    upstream_s: float = 0.0  # time spent waiting on the upstream (connect, headers, body reads)
    client_bytes: int = 0
    first_byte_sent: bool = False
    streamed: bool = False  # 200 event-stream headers went out
    finished: bool = False  # the stream's last event came ([DONE], message_stop, response.completed, stop)

    def take_usage(self, prompt: int, completion: int, cached: int | None = None) -> None:
        self.usage_seen = self.prompt_seen = True
        self.token_method = "upstream"
        self.prompt_tokens = prompt
        self.completion_tokens = completion
        if cached:
            self.cached_tokens = cached

    def take_prompt(self, prompt: int, cached: int | None = None) -> None:
        """The prompt's tokens, known before the end of a stream."""
        self.prompt_seen = True
        self.prompt_tokens = prompt
        if cached:
            self.cached_tokens = cached

    def token_relayed(self, n: int = 1) -> None:
        self.chunks += n
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.t_start
