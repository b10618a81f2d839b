"""Replica: one upstream server of a model, as the balancer and admission queue see it.

A supervised replica (llama-server, vllm) is owned by a ManagedProcess that moves
its state and sets its url and slots; a remote ``openai`` url is a replica that is
READY from the start and is only taken out of rotation by failures (ejection).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("llmd")


class ReplicaState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    COLD = "cold"  # an on-demand replica that is not running: started when a request needs it


@dataclass(eq=False)
class Replica:
    model: str  # the model's config name
    name: str  # unique within llmd, e.g. "gemma-3-270m/0"
    backend: str  # llama-server | vllm | openai
    url: str = ""  # base URL including /v1, e.g. http://127.0.0.1:41234/v1
    slots: int = 1  # concurrent requests it serves at once
    state: ReplicaState = ReplicaState.STOPPED
    in_flight: int = 0
    served: int = 0  # requests given to it since llmd started (all its processes)
    # Passive health: consecutive relay failures; at the routing threshold it is ejected
    # (skipped) until its health check passes again or ejected_until passes (remote).
    failures: int = 0
    ejected_until: float = 0.0
    # Drain: set when a reload removes or replaces it; it takes no new requests.
    draining: bool = False
    # Backend's own load signals, scraped from its /metrics on the health loop.
    backend_metrics: dict[str, float] = field(default_factory=dict)
    pid: int | None = None
    port: int | None = None
    cpus: list[int] | None = None
    gpus: list[int] | None = None
    restarts: int = 0
    # time.monotonic() of the last request given to it or finished on it (idle TTL, LRU)
    last_used: float = 0.0

    @property
    def routable(self) -> bool:
        """May the balancer send it a new request now?"""
        return (
            self.state is ReplicaState.READY
            and not self.draining
            and (self.ejected_until == 0.0 or time.monotonic() >= self.ejected_until)
        )

    @property
    def accepting(self) -> bool:
        """READY and not draining: routable unless ejected."""
        return self.state is ReplicaState.READY and not self.draining

    @property
    def free_slots(self) -> int:
        return self.slots - self.in_flight

    @property
    def overloaded_backend(self) -> bool:
        """vLLM's own signals: requests already waiting or KV cache nearly full."""
        m = self.backend_metrics
        return m.get("waiting", 0.0) > 0 or m.get("kv_cache_usage", 0.0) > 0.95

    # Passive health has this one owner: the pool reports each relay's result, the supervisor
    # clears it when a health check passes (READY).
    def note_ok(self) -> None:
        self.failures = 0

    def note_failure(self, eject_after_failures: int) -> None:
        """A relay failed. At ``eject_after_failures`` in a row it leaves rotation, for longer
        each time (5 s doubling, at most 60 s); a supervised replica returns earlier when its
        health check passes, a remote url when the time runs out."""
        self.failures += 1
        if self.failures >= eject_after_failures:
            self.ejected_until = time.monotonic() + min(60.0, 2.0 ** (self.failures - eject_after_failures) * 5)
            log.warning("replica ejected", extra={"replica": self.name, "failures": self.failures})

    def note_ready(self) -> None:
        self.failures = 0
        self.ejected_until = 0.0

    def origin(self) -> str:
        """scheme://host:port, for backend-specific routes outside /v1 (/health, /tokenize)."""
        base = self.url
        return base[: -len("/v1")] if base.endswith("/v1") else base

    def status(self) -> dict[str, object]:
        return {
            "model": self.model,
            "replica": self.name,
            "backend": self.backend,
            "state": self.state.value,
            "pid": self.pid,
            "port": self.port,
            "url": self.url,
            "cpus": self.cpus,
            "gpus": self.gpus,
            "slots": self.slots,
            "in_flight": self.in_flight,
            "served": self.served,
            "restarts": self.restarts,
            "draining": self.draining,
            "ejected": not self.routable and self.state is ReplicaState.READY and not self.draining,
            "backend_metrics": self.backend_metrics,
        }
