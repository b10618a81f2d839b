"""Pool: one model's replicas as one server: admission, the balancer's choice, retries and
passive health.

``serve(call)`` is step 5-7 of DESIGN's "One request": take a slot on a replica (maybe after
waiting in the model's queue), relay, and on a failure before the first byte try another
replica. A replica that keeps failing is ejected for a while (``Replica.note_failure``).
The pool outlives reloads: its queue and the slots in use carry over, its settings change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from .admission import Admission
from .balancer import MAX_HASHED_BYTES, Balancer, block_hashes
from .call import Call
from .config import RoutingConfig
from .metrics import Metrics
from .relay import Relay, UpstreamFailed
from .replica import Replica

log = logging.getLogger("llmd")

REFUSED_PAUSE_S = 0.5  # before queueing again for a sole replica that refused the connection


class Pool:
    def __init__(
        self,
        model: str,
        replicas: Callable[[], Sequence[Replica]],
        routing: RoutingConfig,
        metrics: Metrics,
        demand: Callable[[str], float] | None = None,
    ) -> None:
        self.model = model
        # Loader.want: starts a cold on-demand model; the seconds its start may take (0: warm).
        self.demand = demand
        self._replicas = replicas
        self.metrics = metrics
        self.balancer = Balancer(routing.strategy, routing.affinity_min_match, routing.load_factor)
        self.admission = Admission(
            model, replicas, self.balancer, routing.max_queue, routing.queue_timeout_s, routing.admission
        )
        # Bound to this admission, not looked up by name: a reload that removes the model
        # fails its waiters, and their wait is still observed after the pool is gone.
        adm = self.admission
        adm.on_wait = lambda s: metrics.observe_queue(model, adm.depth, s)
        self.routing = routing

    def configure(self, routing: RoutingConfig) -> None:
        self.routing = routing
        self.balancer.configure(routing.strategy, routing.affinity_min_match, routing.load_factor)
        self.admission.configure(routing.max_queue, routing.queue_timeout_s, routing.admission)

    def hashes(self, call: Call) -> list[int]:
        """Prefix-affinity block hashes of the fields the route names, only when the strategy
        uses them (at most MAX_HASHED_BYTES: a longer prefix tells no more)."""
        if self.routing.strategy != "prefix-affinity" or call.env is None or call.route is None:
            return []
        fields = call.route.affinity
        if not fields:
            return []
        raw = call.env.raw(fields[0]) if len(fields) == 1 else b"".join(call.env.raw(f) for f in fields)
        return block_hashes(raw[:MAX_HASHED_BYTES]) if raw else []

    async def serve(self, call: Call, relay: Relay) -> web.StreamResponse:
        principal = call.principal
        assert principal is not None
        hashes = self.hashes(call)
        tried: set[str] = set()
        attempts = self.routing.retries + 1
        pause = False
        for attempt in range(attempts):
            if pause:
                await asyncio.sleep(REFUSED_PAUSE_S)
                pause = False
            start_budget = self.demand(self.model) if self.demand is not None else 0.0
            choice = await self.admission.acquire(  # 5 + 6. admission and balancer
                principal.key_id, principal.limits.priority or 0, hashes, frozenset(tried), start_budget
            )
            self.metrics.observe_affinity(self.model, choice.affinity)
            replica = choice.replica
            t0 = time.monotonic()
            try:
                resp = await relay.forward(call, replica)  # 7. relay
                replica.note_ok()
                return resp
            except UpstreamFailed as e:
                tried.add(replica.name)
                replica.note_failure(self.routing.eject_after_failures)
                others = any(r.accepting and r.name not in tried for r in self._replicas())
                if e.retryable and attempt + 1 < attempts and not call.exchange.first_byte_sent:
                    if others:
                        self.metrics.observe_retry(self.model)
                        log.warning(
                            "retrying on another replica",
                            extra={"request_id": call.request_id, "replica": replica.name, "error": e.error.message},
                        )
                        continue
                    if e.refused or replica.backend != "openai":
                        # The only replica failed before answering: its process may be gone
                        # without the supervisor having seen it yet (a slot freed by its crash
                        # goes to a waiter at once, onto a dead pooled connection or a refused
                        # one). Pause, then queue again: a restart answers it.
                        tried.discard(replica.name)
                        pause = True
                        self.metrics.observe_retry(self.model)
                        continue
                if e.response is not None:  # the upstream's own answer (its 503) is what the client gets
                    call.exchange.outcome = e.error.outcome
                    call.exchange.status = e.response.status
                    return e.response
                raise e.error from None
            finally:
                self.admission.release(replica, principal.key_id, time.monotonic() - t0)
        raise AssertionError("unreachable")
