"""Runtime: everything derived from one Config; Services: what lives as long as the process.

A reload builds a new Runtime aside (key table, limiter carrying the old windows, pools),
lets the supervisor reconcile the replicas, then swaps it in with one assignment and
``activate``; if building or reconciling fails, the old Runtime keeps serving untouched.
Requests already running keep the Runtime they started with.

Services own the process-long resources, each opened in ``open`` and closed in ``close``
under one shutdown deadline: the shared ClientSession, the supervisor and its children,
the usage ledger, metrics and the access log. Pools (admission queues, slots in use) are
carried from one Runtime to the next for every model that stays.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
from aiohttp import web

from .auth import KeyTable
from .cache import Cache
from .config import Config
from .limits import Limiter
from .loader import Loader
from .log import AccessLog
from .metrics import Metrics
from .pool import Pool
from .relay import Relay
from .replica import Replica, ReplicaState
from .stores import Stores
from .supervisor import Supervisor
from .tools import Toolbox
from .upstream import Upstreams
from .usage import Ledger, NullLedger, current_month

if TYPE_CHECKING:
    from .redislimits import RedisStore

log = logging.getLogger("llmd")


class Runtime:
    """The derived state of one config. Building one changes nothing that serves."""

    def __init__(
        self,
        cfg: Config,
        supervisor: Supervisor,
        metrics: Metrics,
        previous: Runtime | None = None,
        demand: Callable[[str], float] | None = None,
        store: RedisStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.keys = KeyTable(cfg)
        self.model_names = cfg.model_names()
        self.toolbox = Toolbox(cfg)
        states, monthly = None, None
        if previous is not None:
            # Limit state survives a reload for every key id that still exists.
            keep = set(self.keys.ids) | {"anonymous"}
            states = {k: v for k, v in previous.limiter.states.items() if k in keep}
            monthly = previous.limiter.monthly
        # With a shared store the state that matters is in Redis; the local state then serves
        # only on_store_error: local.
        if store is not None:
            from .redislimits import SharedLimiter  # only with limits.store: redis (hiredis stays unloaded)

            self.limiter: Limiter = SharedLimiter(store, states, monthly)
        else:
            self.limiter = Limiter(states, monthly)
        self.trusted_proxies = [ipaddress.ip_network(p, strict=False) for p in cfg.server.trusted_proxies]
        self.cors_origins = frozenset(cfg.server.cors_origins)
        self.upstream_keys = {
            m.api_key_env: os.environ.get(m.api_key_env, "") for m in cfg.models.values() if m.api_key_env
        }
        old = previous.pools if previous is not None else {}
        self.pools: dict[str, Pool] = {
            name: old.get(name) or Pool(name, lambda n=name: supervisor.replicas(n), cfg.routing, metrics, demand)
            for name in cfg.models
        }
        self._previous_pools = old

    def activate(self) -> None:
        """Now serving: kept pools take the new routing settings, removed models' waiters are
        told, queues dispatch (a reload may have added replicas)."""
        for pool in self.pools.values():
            pool.configure(self.cfg.routing)
        for name, pool in self._previous_pools.items():
            if name not in self.pools:
                # Removed model: its waiters are told now; in-flight requests finish.
                pool.admission.fail_all(f"Model '{name}' was removed by a reload.")
        self._previous_pools = {}
        for pool in self.pools.values():
            pool.admission.dispatch()
        if self.keys.open:
            log.warning("no keys configured: every request is accepted as 'anonymous' (bind loopback only)")


class Services:
    """Process-long resources. Construct, then ``await open()``; ``close(deadline)`` once."""

    def __init__(self, cfg: Config) -> None:
        self.metrics = Metrics(enabled=cfg.server.metrics)
        self.ledger: Ledger = make_ledger(cfg)
        # limits.store and usage.store are read once: a reload keeps the stores it started with.
        self.limit_store: RedisStore | None = None
        if cfg.limits.store == "redis":
            from .redislimits import RedisStore  # only then: its client and hiredis cost memory

            self.limit_store = RedisStore(cfg.limits)
        self.access = AccessLog()
        self.cache = Cache(cfg.cache, cfg.usage.path, self.metrics)
        self.vectors = Stores()  # retrieval's stores (rag.py), opened at first use
        self.started_unix = int(time.time())
        self.draining = False  # set at shutdown: /readyz answers 503 so balancers move away
        self._cfg = cfg
        self._background: set[asyncio.Task[None]] = set()
        self.deadline: float | None = None  # loop time by which close() must be done; set at shutdown
        # Set and cleared at each replica state change: wakes every /admin/events stream at once.
        self.replica_changed = asyncio.Event()

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """The app's cleanup_ctx: open at its startup; close at its cleanup, after in-flight
        requests drained, within ``deadline``."""
        await self.open()
        yield
        await self.close(self.deadline if self.deadline is not None else asyncio.get_running_loop().time() + 10)

    async def open(self) -> None:
        cfg = self._cfg
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        # Upstreams are asked for identity encoding; one that compresses anyway is decoded here
        # (usage is read from the answer, and its Content-Encoding is not relayed).
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )
        self.upstreams = Upstreams()  # the request path's own client (llmd/upstream.py)
        self.relay = Relay(self.upstreams, cfg.routing.timeouts)
        self.supervisor = Supervisor(cfg, self.session, on_change=self._on_replica_change)
        self.loader = Loader(cfg, self.supervisor, self.metrics)
        self.runtime = Runtime(cfg, self.supervisor, self.metrics, demand=self.loader.want, store=self.limit_store)
        self.loader.bind(lambda name: p.admission if (p := self.runtime.pools.get(name)) is not None else None)
        self.metrics.set_names(cfg.models, self.runtime.keys.ids)
        await self.ledger.open()
        await self.cache.open()
        if self.limit_store is not None:
            self.limit_store.on_error = self.metrics.observe_limit_store_error
            self.limit_store.month_totals = self._month_totals
            await self.limit_store.open()
        month = current_month()
        # From the ledger (PostgreSQL: every host's rows) into the limiter (Redis: never lowered).
        await self.runtime.limiter.seed_month(month, await self.ledger.month_totals(month))
        self.runtime.activate()
        await self.supervisor.start()
        self.loader.start()

    async def _month_totals(self) -> tuple[str, dict[str, int]]:
        month = current_month()
        return month, await self.ledger.month_totals(month)

    @property
    def pools(self) -> dict[str, Pool]:
        return self.runtime.pools

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run follow-up work of a finished request (e.g. counting an aborted stream's prompt);
        close() waits for it so no usage row is lost at shutdown."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_replica_change(self, replica: Replica) -> None:
        self.metrics.observe_replica(replica)
        self.replica_changed.set()  # wakes the current waiters; clear() keeps later ones waiting
        self.replica_changed.clear()
        pool = self.runtime.pools.get(replica.model)  # callbacks start with supervisor.start(), after the runtime
        if pool is None:
            return
        if replica.state is ReplicaState.STARTING:
            pool.balancer.forget(replica.name)  # a new process has an empty prompt cache
        if replica.state is ReplicaState.READY:
            replica.note_ready()
        if replica.state is ReplicaState.BACKOFF:
            self._start_failed(replica, pool)
        pool.admission.dispatch()

    def _start_failed(self, replica: Replica, pool: Pool) -> None:
        """An on-demand model's start failed (bad binary, exit or timeout while starting, or a
        crash): its queued requests get a 503 now instead of waiting out queue_timeout_s plus
        start_timeout_s for a replica that is backing off. The next request waits for the
        restart llmd tries anyway (and fails at once again if that one fails too)."""
        model = self.runtime.cfg.models.get(replica.model)
        if model is None or not model.on_demand or pool.admission.depth == 0:
            return
        alive = (ReplicaState.READY, ReplicaState.STARTING)
        if any(r.state in alive for r in self.supervisor.replicas(replica.model)):
            return  # another replica may still serve them
        log.warning("model %s: start failed; failing %d queued requests", replica.model, pool.admission.depth,
                    extra={"model": replica.model, "replica": replica.name})  # fmt: skip
        pool.admission.fail_all(
            f"Model '{replica.model}' failed to start: replica {replica.name} exited or was not healthy in time "
            "(llmd's log has its output); llmd retries it after a backoff."
        )

    async def reload(self, cfg: Config) -> None:
        """Build aside, reconcile replicas, swap. Any exception before the swap leaves the old
        Runtime serving as it was."""
        new = Runtime(
            cfg, self.supervisor, self.metrics, previous=self.runtime, demand=self.loader.want, store=self.limit_store
        )
        plan = self.loader.plan(cfg)
        if self.limit_store is not None:
            self.limit_store.cfg = msgspec.structs.replace(
                cfg.limits, prefix=self.limit_store.cfg.prefix, url_env=self.limit_store.cfg.url_env
            )
        await self.supervisor.reconcile(cfg)
        self.loader.configure(cfg, plan)
        self.runtime = new  # the swap: requests from here on see the new config
        self.metrics.set_names(cfg.models, new.keys.ids)
        self.relay.timeouts = cfg.routing.timeouts
        self.cache.configure(cfg.cache)
        new.activate()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready when every model can serve: a READY replica, or on demand (a cold or starting
        on-demand model serves its next request after a start; it is not unready)."""
        models: dict[str, object] = {}
        ready = True
        for name in self.runtime.cfg.models:
            reps = self.supervisor.replicas(name)
            state = self.loader.state(name)
            ok = state == "ready" or (self.runtime.cfg.models[name].on_demand and state in ("cold", "starting"))
            ready = ready and ok
            models[name] = {
                "ready": ok,
                "state": state,
                "replicas": [{"replica": r.name, "state": r.state.value} for r in reps],
            }
        if self.draining:
            ready = False
        stores = self.stores()
        limits = stores["limits"]
        if not limits["healthy"] and limits.get("on_store_error") == "fail_closed":
            ready = False  # every request would be refused: a balancer should look elsewhere
        return ready, {"ready": ready, "draining": self.draining, "models": models, "stores": stores}

    def stores(self) -> dict[str, dict[str, Any]]:
        """Where usage and limits live and whether they answer (/readyz, /admin/status)."""
        lg = self.ledger
        usage: dict[str, Any] = {
            "store": lg.store if self._cfg.usage.enabled else "off",
            "healthy": lg.healthy,
            "pending_rows": lg.pending_rows,
            "dropped_rows": lg.dropped_rows,
        }
        st = self.limit_store
        if st is None:
            return {"usage": usage, "limits": {"store": "memory", "healthy": True}}
        limits = {
            "store": "redis",
            "healthy": st.healthy,
            "on_store_error": st.cfg.on_store_error,
            "errors": st.errors,
            "pending_settles": len(st.pending),
            "leases": len(st.leases),
        }
        return {"usage": usage, "limits": limits}

    def status(self) -> dict[str, object]:
        return {
            "replicas": self.supervisor.status(),
            "queues": {name: p.admission.depth for name, p in self.pools.items()},
            "models": self.loader.status(),
            "memory_budget": self.loader.budget(),
            "usage": {"pending_rows": self.ledger.pending_rows, "dropped_rows": self.ledger.dropped_rows},
            "stores": self.stores(),
            "config": self.runtime.cfg.source,
        }

    def refresh_metrics(self) -> None:
        m = self.metrics
        m.usage_pending.set(self.ledger.pending_rows)
        m.observe_dropped(self.ledger.dropped_rows)
        if m.enabled:
            m.store_healthy.labels("usage").set(int(self.ledger.healthy))
            m.store_healthy.labels("limits").set(int(self.limit_store is None or self.limit_store.healthy))
        self.cache.observe()
        for name, pool in self.pools.items():
            m.observe_queue(name, pool.admission.depth)
            m.observe_model_state(name, self.loader.state(name))
            reps = self.supervisor.replicas(name)
            if m.enabled:
                m.in_flight.labels(m.model(name)).set(sum(r.in_flight for r in reps))
            for r in reps:
                m.observe_replica(r)

    async def close(self, deadline: float) -> None:
        """Every phase within ``deadline`` (loop time): follow-up settles, a ledger flush (rows
        are complete once requests are drained: they must not wait behind slow children),
        the children, then the ledger's last flush and close."""
        loop = asyncio.get_running_loop()
        if self._background:
            await asyncio.wait(self._background, timeout=max(0.1, deadline - loop.time()))
        await self._bounded(self.ledger.flush(), deadline, "flush")
        await self.loader.stop()
        await self.supervisor.stop(deadline)
        await self._bounded(self.ledger.close(), max(deadline, loop.time() + 1.0), "close")
        if self.limit_store is not None:
            try:
                async with asyncio.timeout_at(max(deadline, loop.time() + 1.0)):
                    await self.limit_store.close()
            except TimeoutError:
                log.error("limits: settles still unsent to redis at the shutdown deadline")
        try:
            async with asyncio.timeout_at(max(deadline, loop.time() + 1.0)):
                await self.cache.close()
        except TimeoutError:
            log.error("completion cache: its last writes did not finish before the shutdown deadline")
        await self.vectors.close()
        self.access.flush()
        self.upstreams.close()
        await self.session.close()

    @staticmethod
    async def _bounded(step: Coroutine[Any, Any, object], deadline: float, what: str) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await step
        except TimeoutError:
            log.error("usage ledger: %s did not finish before the shutdown deadline; rows may be lost", what)


def make_ledger(cfg: Config) -> Ledger:
    """The ledger ``usage`` names: SQLite (one host), PostgreSQL (several), or none."""
    if not cfg.usage.enabled:
        return NullLedger(cfg.usage)
    if cfg.usage.store == "postgres":
        from .pgledger import PgLedger  # only then: asyncpg is ~4 MB of a process's memory

        return PgLedger(cfg.usage)
    return Ledger(cfg.usage)
