"""Runtime: everything derived from one Config; Services: what outlives a reload.

A reload builds a new Runtime (key table, limits, names) and swaps it in one assignment;
requests already running keep the Runtime they started with. Services (the shared
ClientSession, the supervisor and its children, the ledger, metrics, per-model admission
queues) live for the whole process and are reconfigured, not rebuilt, so in-flight slots,
queues and replica processes carry over.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from .admission import Admission
from .auth import KeyTable
from .balancer import Balancer
from .config import Config
from .limits import Limiter
from .log import AccessLog
from .metrics import Metrics
from .relay import Relay
from .replica import Replica, ReplicaState
from .supervisor import Supervisor
from .usage import Ledger, NullLedger, current_month

log = logging.getLogger("llmd")


class Runtime:
    def __init__(self, cfg: Config, previous: Runtime | None = None) -> None:
        self.cfg = cfg
        self.keys = KeyTable(cfg)
        self.model_names = cfg.model_names()
        # Limit state survives a reload for every key id that still exists.
        if previous is not None:
            states = {k: v for k, v in previous.limiter.states.items() if k in set(self.keys.ids) | {"anonymous"}}
            self.limiter = Limiter(states, previous.limiter.monthly)
        else:
            self.limiter = Limiter()
        self.trusted_proxies = [ipaddress.ip_network(p, strict=False) for p in cfg.server.trusted_proxies]
        self.cors_origins = frozenset(cfg.server.cors_origins)


@dataclass
class Pool:
    admission: Admission
    balancer: Balancer


class Services:
    def __init__(self, cfg: Config) -> None:
        self.runtime = Runtime(cfg)
        self.metrics = Metrics(enabled=cfg.server.metrics)
        self.metrics.set_names(cfg.models, self.runtime.keys.ids)
        self.ledger = Ledger(cfg.usage) if cfg.usage.enabled else NullLedger(cfg.usage)
        self.started_unix = int(time.time())
        self.pools: dict[str, Pool] = {}
        self.upstream_keys: dict[str, str] = {}
        self.session: aiohttp.ClientSession | None = None
        self.supervisor: Supervisor | None = None
        self.relay: Relay
        self.draining = False
        self.access = AccessLog()
        self._background: set[asyncio.Task[None]] = set()  # set at shutdown: /readyz answers 503 so balancers move away

    async def start(self) -> None:
        cfg = self.runtime.cfg
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        # Upstreams are asked for identity encoding; one that compresses anyway is decoded here
        # (usage is read from the answer, and its Content-Encoding is not relayed).
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )
        self.relay = Relay(self.session, cfg.routing.timeouts)
        await self.ledger.open()
        month = current_month()
        self.runtime.limiter.monthly.load(month, await self.ledger.month_totals(month))
        self._load_upstream_keys(cfg)
        self.supervisor = Supervisor(cfg, self.session, on_change=self._on_replica_change)
        self._configure_pools(cfg)
        await self.supervisor.start()
        if self.runtime.keys.open:
            log.warning("no keys configured: every request is accepted as 'anonymous' (bind loopback only)")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run follow-up work of a finished request (e.g. counting an aborted stream's prompt);
        close() waits for it so no usage row is lost at shutdown."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _load_upstream_keys(self, cfg: Config) -> None:
        self.upstream_keys = {
            m.api_key_env: os.environ.get(m.api_key_env, "") for m in cfg.models.values() if m.api_key_env
        }

    def _configure_pools(self, cfg: Config) -> None:
        r = cfg.routing
        for name in cfg.models:
            pool = self.pools.get(name)
            if pool is None:
                balancer = Balancer(r.strategy, r.affinity_min_match, r.load_factor)
                admission = Admission(
                    name, lambda n=name: self._replicas(n), balancer, r.max_queue, r.queue_timeout_s, r.admission
                )
                # Bound to this admission, not looked up by name: a reload that removes the model
                # fails its waiters, and their wait is still observed after the pool is gone.
                admission.on_wait = lambda s, n=name, a=admission: self.metrics.observe_queue(n, a.depth, s)
                self.pools[name] = Pool(admission, balancer)
            else:
                pool.balancer.configure(r.strategy, r.affinity_min_match, r.load_factor)
                pool.admission.configure(r.max_queue, r.queue_timeout_s, r.admission)
        for name in list(self.pools):
            if name not in cfg.models:
                # Removed model: its waiters are told now; in-flight requests finish.
                self.pools.pop(name).admission.fail_all(f"Model '{name}' was removed by a reload.")

    def _replicas(self, model: str) -> list[Replica]:
        return self.supervisor.replicas(model) if self.supervisor else []

    def pool(self, model: str) -> Pool:
        return self.pools[model]

    def _on_replica_change(self, replica: Replica) -> None:
        self.metrics.observe_replica(replica)
        pool = self.pools.get(replica.model)
        if pool is None:
            return
        if replica.state is ReplicaState.STARTING:
            pool.balancer.forget(replica.name)  # a new process has an empty prompt cache
        if replica.state is ReplicaState.READY:
            replica.failures = 0
            replica.ejected_until = 0.0
        pool.admission.dispatch()

    def note_failure(self, replica: Replica) -> None:
        """Passive health: a replica that fails repeatedly leaves rotation until its health
        check passes (supervised) or for a while (remote urls, which have no health loop)."""
        replica.failures += 1
        if replica.failures >= self.runtime.cfg.routing.eject_after_failures:
            backoff = min(60.0, 2.0 ** (replica.failures - self.runtime.cfg.routing.eject_after_failures) * 5)
            replica.ejected_until = time.monotonic() + backoff
            log.warning("replica ejected", extra={"replica": replica.name, "failures": replica.failures})

    async def reload(self, cfg: Config) -> None:
        """Swap in a validated config: replicas reconciled, then a new Runtime and pools.
        Reconcile goes first: if it fails, nothing has been swapped and the old config serves."""
        assert self.supervisor is not None
        await self.supervisor.reconcile(cfg)
        self.runtime = Runtime(cfg, previous=self.runtime)
        self.metrics.set_names(cfg.models, self.runtime.keys.ids)
        self._load_upstream_keys(cfg)
        self.relay.timeouts = cfg.routing.timeouts
        self._configure_pools(cfg)
        for pool in self.pools.values():
            pool.admission.dispatch()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        models: dict[str, object] = {}
        ready = True
        for name in self.runtime.cfg.models:
            reps = self._replicas(name)
            n_ready = sum(1 for r in reps if r.state is ReplicaState.READY)
            ready = ready and n_ready > 0
            models[name] = {
                "ready": n_ready > 0,
                "replicas": [{"replica": r.name, "state": r.state.value} for r in reps],
            }
        if self.draining:
            ready = False
        return ready, {"ready": ready, "draining": self.draining, "models": models}

    def status(self) -> dict[str, object]:
        return {
            "replicas": self.supervisor.status() if self.supervisor else [],
            "queues": {name: p.admission.depth for name, p in self.pools.items()},
            "usage": {"pending_rows": self.ledger.pending_rows, "dropped_rows": self.ledger.dropped_rows},
            "config": self.runtime.cfg.source,
        }

    def refresh_metrics(self) -> None:
        m = self.metrics
        m.usage_pending.set(self.ledger.pending_rows)
        m.observe_dropped(self.ledger.dropped_rows)
        for name, pool in self.pools.items():
            m.observe_queue(name, pool.admission.depth)
            if m.enabled:
                m.in_flight.labels(m.model(name)).set(sum(r.in_flight for r in self._replicas(name)))
            for r in self._replicas(name):
                m.observe_replica(r)

    async def close(self, deadline: float) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=10)
        if self.supervisor is not None:
            await self.supervisor.stop(deadline)
        await self.ledger.close()
        self.access.flush()
        if self.session is not None:
            await self.session.close()
