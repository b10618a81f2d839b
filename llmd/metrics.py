"""Prometheus collectors and the /metrics handler.

Each Metrics owns its own CollectorRegistry (no global state, so tests can run several
apps in one process). Label values are bounded: key ids and model names come from config;
anything else folds into "other". Labelled children are resolved once per (route, model,
key...) and cached, so the hot path does a dict lookup and an add, not a label resolution.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .replica import Replica, ReplicaState

OTHER = "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
ROUTES = ("chat", "completions", "embeddings", "models", "other")


class Metrics:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = r = CollectorRegistry()
        self.models: set[str] = set()
        self.keys: set[str] = set()
        self.requests = Counter("llmd_requests", "Requests answered", ["route", "model", "key", "status"], registry=r)
        self.duration = Histogram(
            "llmd_request_duration_seconds",
            "Request duration",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llmd_time_to_first_token_seconds",
            "Time to first streamed token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("llmd_tokens", "Tokens used", ["model", "key", "type"], registry=r)
        self.rate_limited = Counter("llmd_rate_limited", "Requests refused by limits", ["key", "reason"], registry=r)
        self.in_flight = Gauge("llmd_in_flight", "Requests being served", ["model"], registry=r)
        self.queue_depth = Gauge("llmd_queue_depth", "Requests waiting for a slot", ["model"], registry=r)
        self.queue_wait = Histogram(
            "llmd_queue_wait_seconds",
            "Time waited in the admission queue",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.replica_state = Gauge(
            "llmd_replica_state", "1 for the replica's current state", ["model", "replica", "state"], registry=r
        )
        self.replica_restarts = Counter("llmd_replica_restarts", "Replica restarts", ["model", "replica"], registry=r)
        self.replica_backend = Gauge(
            "llmd_replica_backend",
            "A replica's own load signals scraped from its /metrics",
            ["model", "replica", "signal"],
            registry=r,
        )
        self.replica_slots = Gauge(
            "llmd_replica_slots", "Concurrent requests a replica serves", ["model", "replica"], registry=r
        )
        self.replica_in_flight = Gauge(
            "llmd_replica_in_flight", "Requests a replica is serving now", ["model", "replica"], registry=r
        )
        self.usage_pending = Gauge("llmd_usage_pending_rows", "Usage rows not yet written", registry=r)
        self.usage_dropped = Counter(
            "llmd_usage_dropped_rows", "Usage rows dropped because the ledger could not write", registry=r
        )
        self._dropped_seen = 0
        self.reloads = Counter("llmd_config_reloads", "Config reloads", ["result"], registry=r)
        self.overhead = Histogram(
            "llmd_overhead_seconds",
            "Time a request spent in llmd itself (total minus upstream)",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.affinity = Counter("llmd_affinity", "Prefix-affinity decisions", ["model", "result"], registry=r)
        self.retries = Counter("llmd_retries", "Requests retried on another replica", ["model"], registry=r)
        self._children: dict[tuple[str, ...], object] = {}
        self._restarts_seen: dict[str, int] = {}

    def set_names(self, models: Iterable[str], keys: Iterable[str]) -> None:
        self.models = set(models)
        self.keys = set(keys) | {"anonymous"}

    def model(self, name: str) -> str:
        return name if name in self.models else OTHER

    def key(self, key_id: str) -> str:
        return key_id if key_id in self.keys else OTHER

    def _child(self, metric: Counter | Histogram | Gauge, *labels: str) -> object:
        k = (metric._name, *labels)
        c = self._children.get(k)
        if c is None:
            c = self._children[k] = metric.labels(*labels)
        return c

    # --- the request path -------------------------------------------------------------------

    def observe_request(
        self, route: str, model: str, key: str, status: int, duration_s: float, overhead_s: float
    ) -> None:
        if not self.enabled:
            return
        m, k = self.model(model) if model else "", self.key(key) if key else ""
        self._child(self.requests, route, m, k, str(status)).inc()  # type: ignore[attr-defined]
        self._child(self.duration, route, m).observe(duration_s)  # type: ignore[attr-defined]
        self._child(self.overhead, route).observe(max(0.0, overhead_s))  # type: ignore[attr-defined]

    def observe_tokens(self, model: str, key: str, prompt: int, completion: int) -> None:
        if not self.enabled:
            return
        m, k = self.model(model), self.key(key)
        if prompt:
            self._child(self.tokens, m, k, "prompt").inc(prompt)  # type: ignore[attr-defined]
        if completion:
            self._child(self.tokens, m, k, "completion").inc(completion)  # type: ignore[attr-defined]

    def observe_ttft(self, model: str, seconds: float) -> None:
        if self.enabled:
            self._child(self.ttft, self.model(model)).observe(seconds)  # type: ignore[attr-defined]

    def observe_rate_limited(self, key: str, reason: str) -> None:
        if self.enabled:
            self._child(self.rate_limited, self.key(key), reason).inc()  # type: ignore[attr-defined]

    def in_flight_add(self, model: str, delta: int) -> None:
        if self.enabled:
            self._child(self.in_flight, self.model(model)).inc(delta)  # type: ignore[attr-defined]

    def observe_queue(self, model: str, depth: int, waited_s: float | None = None) -> None:
        if not self.enabled:
            return
        m = self.model(model)
        self._child(self.queue_depth, m).set(depth)  # type: ignore[attr-defined]
        if waited_s is not None:
            self._child(self.queue_wait, m).observe(waited_s)  # type: ignore[attr-defined]

    def observe_affinity(self, model: str, result: str) -> None:
        if self.enabled and result != "none":
            self._child(self.affinity, self.model(model), result).inc()  # type: ignore[attr-defined]

    def observe_retry(self, model: str) -> None:
        if self.enabled:
            self._child(self.retries, self.model(model)).inc()  # type: ignore[attr-defined]

    # --- replicas, refreshed on state changes and at scrape time ----------------------------

    def observe_replica(self, r: Replica) -> None:
        m = self.model(r.model)
        for state in ReplicaState:
            self.replica_state.labels(m, r.name, state.value).set(1 if r.state is state else 0)
        seen = self._restarts_seen.get(r.name, 0)
        if r.restarts > seen:
            self.replica_restarts.labels(m, r.name).inc(r.restarts - seen)
            self._restarts_seen[r.name] = r.restarts
        self.replica_slots.labels(m, r.name).set(r.slots)
        self.replica_in_flight.labels(m, r.name).set(r.in_flight)
        for signal, value in r.backend_metrics.items():
            self.replica_backend.labels(m, r.name, signal).set(value)

    def observe_dropped(self, total_dropped: int) -> None:
        """The ledger counts drops; export the increase since the last scrape as a counter."""
        if total_dropped > self._dropped_seen:
            self.usage_dropped.inc(total_dropped - self._dropped_seen)
            self._dropped_seen = total_dropped

    def render(self) -> bytes:
        return generate_latest(self.registry)


def handler(metrics: Metrics, refresh: object) -> web.Handler:
    async def metrics_handler(request: web.Request) -> web.Response:
        if callable(refresh):
            refresh()
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics_handler
