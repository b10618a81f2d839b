"""Prometheus collectors (the /metrics route renders them, see app.py).

Each Metrics owns its own CollectorRegistry (no global state, so tests can run several
apps in one process). Label values are bounded: key ids and model names come from config;
anything else folds into "other". Labelled children are resolved once per (route, model,
key...) and cached, so the hot path does a dict lookup and an add, not a label resolution.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .replica import Replica, ReplicaState

OTHER = "other"
MODEL_STATES = ("cold", "starting", "ready", "unready")


class _FastCounter:
    """A labelled counter kept as a plain dict (label tuple -> value) and turned into
    a prometheus family only at scrape time. The hot path is one dict get/set on the event-loop
    thread: no child lookup, no lock (the scrape runs on the same thread)."""

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1) -> None:
        v = self.values
        v[key] = v.get(key, 0) + amount

    def family(self) -> CounterMetricFamily:
        f = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in self.values.items():
            f.add_metric(list(key), value)
        return f


class _FastHistogram:
    """A labelled histogram: per label tuple a list [count per bucket..., +Inf count, sum]."""

    def __init__(self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.bounds = list(buckets)
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], x: float) -> None:
        st = self.values.get(key)
        if st is None:
            st = self.values[key] = [0] * (len(self.bounds) + 1) + [0.0]
        st[bisect_left(self.bounds, x)] += 1
        st[-1] += x

    def family(self) -> HistogramMetricFamily:
        f = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, st in self.values.items():
            acc, buckets = 0.0, []
            for bound, n in zip([*map(floatToGoString, self.bounds), "+Inf"], st[:-1], strict=True):
                acc += n
                buckets.append((bound, acc))
            f.add_metric(list(key), buckets, st[-1])
        return f


class _FastCollector:
    def __init__(self, metrics: Sequence[_FastCounter | _FastHistogram]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for m in self.metrics:
            yield m.family()


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class Metrics:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = r = CollectorRegistry()
        self.models: set[str] = set()
        self.keys: set[str] = set()
        self.requests = _FastCounter("llmd_requests", "Requests answered", ["route", "model", "key", "status"])
        self.duration = _FastHistogram(
            "llmd_request_duration_seconds", "Request duration", ["route", "model"], LATENCY_BUCKETS
        )
        self.ttft = _FastHistogram(
            "llmd_time_to_first_token_seconds", "Time to first streamed token", ["model"], LATENCY_BUCKETS
        )
        self.tokens = _FastCounter("llmd_tokens", "Tokens used", ["model", "key", "type"])
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
        self.limit_store_errors = Counter(
            "llmd_limit_store_errors",
            "Failed round trips to the shared limit store (Redis), by operation",
            ["op"],
            registry=r,
        )
        self.store_healthy = Gauge(
            "llmd_store_healthy", "1 while a store answers (usage: the ledger; limits: Redis)", ["store"], registry=r
        )
        self.reloads = Counter("llmd_config_reloads", "Config reloads", ["result"], registry=r)
        self.overhead = _FastHistogram(
            "llmd_overhead_seconds",
            "Time a request spent in llmd itself (total minus upstream)",
            ["route"],
            OVERHEAD_BUCKETS,
        )
        self.affinity = _FastCounter("llmd_affinity", "Prefix-affinity decisions", ["model", "result"])
        self.cache_lookups = _FastCounter(
            "llmd_cache_lookups", "Completion cache lookups of deterministic requests", ["model", "result"]
        )
        self.cache_evictions = _FastCounter("llmd_cache_evictions", "Completion cache entries evicted", ["reason"])
        r.register(
            _FastCollector(
                [
                    self.requests, self.duration, self.ttft, self.tokens, self.overhead, self.affinity,
                    self.cache_lookups, self.cache_evictions,
                ]
            )
        )  # fmt: skip
        self.cache_bytes = Gauge("llmd_cache_bytes", "Bytes held by the completion cache", registry=r)
        self.cache_entries = Gauge("llmd_cache_entries", "Entries in the completion cache", registry=r)
        self.retries = Counter("llmd_retries", "Requests retried on another replica", ["model"], registry=r)
        self.model_events = Counter(
            "llmd_model_events",
            "On-demand starts and stops of a model's replicas, by reason",
            ["model", "event", "reason"],
            registry=r,
        )
        self.model_state = Gauge(
            "llmd_model_state", "1 for the model's current state (cold, starting, ready, unready)",
            ["model", "state"], registry=r,
        )  # fmt: skip
        self.memory_budget = Gauge(
            "llmd_memory_budget_bytes", "server.memory_budget per resource", ["resource"], registry=r
        )
        self.memory_held = Gauge(
            "llmd_memory_held_bytes", "Estimated memory held by running replicas per resource", ["resource"], registry=r
        )
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
        self.requests.inc((route, m, k, str(status)))
        self.duration.observe((route, m), duration_s)
        self.overhead.observe((route,), max(0.0, overhead_s))

    def observe_tokens(self, model: str, key: str, prompt: int, completion: int) -> None:
        if not self.enabled:
            return
        m, k = self.model(model), self.key(key)
        if prompt:
            self.tokens.inc((m, k, "prompt"), prompt)
        if completion:
            self.tokens.inc((m, k, "completion"), completion)

    def observe_ttft(self, model: str, seconds: float) -> None:
        if self.enabled:
            self.ttft.observe((self.model(model),), seconds)

    def observe_rate_limited(self, key: str, reason: str) -> None:
        if self.enabled:
            self._child(self.rate_limited, self.key(key), reason).inc()  # type: ignore[attr-defined]

    def observe_queue(self, model: str, depth: int, waited_s: float | None = None) -> None:
        if not self.enabled:
            return
        m = self.model(model)
        self._child(self.queue_depth, m).set(depth)  # type: ignore[attr-defined]
        if waited_s is not None:
            self._child(self.queue_wait, m).observe(waited_s)  # type: ignore[attr-defined]

    def observe_affinity(self, model: str, result: str) -> None:
        if self.enabled and result != "none":
            self.affinity.inc((self.model(model), result))

    def observe_retry(self, model: str) -> None:
        if self.enabled:
            self._child(self.retries, self.model(model)).inc()  # type: ignore[attr-defined]

    def observe_model_event(self, model: str, event: str, reason: str) -> None:
        if self.enabled:
            self.model_events.labels(self.model(model), event, reason).inc()

    def observe_model_state(self, model: str, state: str) -> None:
        if self.enabled:
            for s in MODEL_STATES:
                self.model_state.labels(self.model(model), s).set(1 if s == state else 0)

    def observe_budget(self, resource: str, nbytes: int) -> None:
        if self.enabled:
            self.memory_budget.labels(resource).set(nbytes)

    def observe_held(self, resource: str, nbytes: int) -> None:
        if self.enabled:
            self.memory_held.labels(resource).set(nbytes)

    def observe_cache(self, model: str, hit: bool) -> None:
        if self.enabled:
            self.cache_lookups.inc((self.model(model), "hit" if hit else "miss"))

    def observe_cache_eviction(self, reason: str) -> None:
        if self.enabled:
            self.cache_evictions.inc((reason,))

    def observe_cache_size(self, nbytes: int, entries: int) -> None:
        self.cache_bytes.set(nbytes)
        self.cache_entries.set(entries)

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

    def observe_limit_store_error(self, op: str) -> None:
        if self.enabled:
            self.limit_store_errors.labels(op).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
