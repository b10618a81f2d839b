"""Supervisor: the replicas of every model, and reload as a diff of two configs.

A replica is identified by (model name, index). On reload (``reconcile``):

- unchanged (same LaunchSpec identity: backend, argv, env, CPU/GPU set): the process keeps
  running, same pid; new timeouts and health settings apply to it;
- new: started;
- removed: marked draining (no new requests), stopped once its in-flight requests are
  done or ``server.drain_seconds`` passed;
- changed: the new one starts beside the old and takes its place in ``replicas(model)``
  when READY; then the old drains and stops. When the two share CPUs or GPUs (the new one
  could not load, or would halve the old one's speed), or a ``server.memory_budget`` is set
  (both at once could exceed it), the old drains and stops first.

``backend: openai`` urls are replicas too, READY from the start and never started.
Draining and replacing run as background tasks that ``stop()`` finishes.

A ``load: on_demand`` model has ``max_replicas`` members that start COLD: the loader
(loader.py) decides when each one runs (``wake``) and when it goes cold again (``sleep``);
the supervisor only carries out. A reload keeps a running on-demand replica running (the
loader's idle rule stops it later) and starts every cold replica of a model now ``always``;
under a ``server.memory_budget`` the loader starts new and cold ``always`` replicas instead,
once it has made room for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from llmd.config import Config, ModelConfig
from llmd.launchers import LaunchSpec, launch_spec, launcher_for
from llmd.process import ManagedProcess
from llmd.replica import Replica, ReplicaState

log = logging.getLogger("llmd.supervisor")

# Concurrent requests per remote url when the config gives no ``slots``: enough for a real
# OpenAI-compatible server to batch, few enough that llmd's queue (priority, fairness)
# rather than the remote's decides the order.
DEFAULT_REMOTE_SLOTS = 16
DRAIN_POLL_S = 0.1

Key = tuple[str, int]


@dataclass(eq=False)
class _Member:
    key: Key
    replica: Replica
    proc: ManagedProcess | None  # None: a remote url, not supervised
    identity: tuple[object, ...]
    on_demand: bool = False
    sleeping: asyncio.Task[None] | None = None  # going cold: drain, then stop

    @property
    def running(self) -> bool:
        """Holds (or is about to hold) a process: started, or still stopping."""
        if self.proc is None:
            return True
        return self.proc.running or (self.sleeping is not None and not self.sleeping.done())


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        session: aiohttp.ClientSession,
        on_change: Callable[[Replica], None] | None = None,
    ) -> None:
        self._cfg = cfg
        self._session = session
        self._on_change = on_change
        self._started = False
        self._closed = False
        self._members: dict[str, dict[int, _Member]] = {}  # serving, by model then index
        self._pending: dict[Key, _Member] = {}  # replacements started, not READY yet
        self._retiring: dict[_Member, asyncio.Task[None]] = {}  # draining, then stopping
        self._tasks: set[asyncio.Task[None]] = set()
        for key, (model, spec) in self._wanted(cfg).items():
            self._members.setdefault(key[0], {})[key[1]] = self._member(key, model, spec)

    # --- queries -------------------------------------------------------------------------------

    def replicas(self, model: str) -> list[Replica]:
        """The replicas serving ``model`` (config name) now, by index; [] when unknown."""
        return [m.replica for _, m in sorted(self._members.get(model, {}).items())]

    def status(self) -> list[dict[str, object]]:
        """Every replica llmd has: serving, replacements starting, and those draining."""
        members = [m for _, by_index in self._members.items() for _, m in sorted(by_index.items())]
        members += list(self._pending.values()) + list(self._retiring)
        return [m.replica.status() for m in members]

    # --- life cycle ----------------------------------------------------------------------------

    def members(self, model: str) -> list[tuple[int, Replica, bool]]:
        """(index, replica, running) of every serving member of ``model``, by index."""
        return [(i, m.replica, m.running) for i, m in sorted(self._members.get(model, {}).items())]

    async def start(self) -> None:
        """Spawn every supervised replica of an ``always`` model; returns at once (see
        ``wait_ready``). On-demand ones wait for the loader."""
        self._started = True
        for by_index in self._members.values():
            for m in by_index.values():
                if m.proc is not None and not m.on_demand:
                    m.proc.start()

    def wake(self, model: str, index: int) -> bool:
        """Start a cold member (after its own stop, if one is under way). False: nothing to do."""
        m = self._members.get(model, {}).get(index)
        if m is None or m.proc is None or self._closed or m.proc.running:
            return False
        if m.sleeping is not None and not m.sleeping.done():
            self._spawn_task(self._wake_after(m, m.sleeping))
            return True
        self._fresh(m).start()
        return True

    def sleep(self, model: str, index: int) -> asyncio.Task[None] | None:
        """Take a running member out of rotation now; stop it once drained; then it is COLD."""
        m = self._members.get(model, {}).get(index)
        if m is None or m.proc is None or not m.proc.running:
            return m.sleeping if m is not None else None
        m.replica.draining = True
        self._notify(m.replica)
        m.sleeping = self._spawn_task(self._sleep(m))
        return m.sleeping

    async def _sleep(self, m: _Member) -> None:
        # No drain_seconds here: a replica goes cold only once its requests are done.
        await self._drain_and_stop(m, bounded=False)
        if self._members.get(m.key[0], {}).get(m.key[1]) is m and not self._closed:
            m.replica.draining = False
            m.replica.state = ReplicaState.COLD
            log.info("replica %s: cold", m.replica.name)
            self._notify(m.replica)

    async def _wake_after(self, m: _Member, sleeping: asyncio.Task[None]) -> None:
        await asyncio.gather(asyncio.shield(sleeping), return_exceptions=True)
        if self._members.get(m.key[0], {}).get(m.key[1]) is m and not self._closed:
            self._fresh(m).start()

    def _fresh(self, m: _Member) -> ManagedProcess:
        """A ManagedProcess is used once: a member that ran before gets a new one, same spec."""
        assert m.proc is not None
        if m.proc.stopping or m.proc.running:
            m.proc = ManagedProcess(m.replica, m.proc.spec, self._session, self._proc_changed)
        m.replica.draining = False
        return m.proc

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every serving replica is READY and no replacement is pending."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            # On-demand members count only while they run: a cold one is not waited for.
            serving = [m for by_i in self._members.values() for m in by_i.values() if not m.on_demand or m.running]
            if not self._pending and all(m.replica.state is ReplicaState.READY for m in serving):
                return True
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.05)

    async def reconcile(self, new_cfg: Config) -> None:
        """Move to ``new_cfg`` without downtime; returns at once, the rest runs in background.

        Raises LaunchError, changing nothing, when a model cannot be launched.
        """
        if self._closed:
            return
        wanted = self._wanted(new_cfg)  # may raise: before any change
        self._cfg = new_cfg
        # Under a memory budget the loader starts what is new or was cold, after making room.
        budgeted = new_cfg.server.memory_budget is not None
        for key, (model, spec) in wanted.items():
            name, index = key
            current = self._members.get(name, {}).get(index)
            identity = self._identity(index, model, spec)
            pending = self._pending.pop(key, None)
            if pending is not None:
                if pending.identity == identity:
                    self._pending[key] = pending
                    self._update(pending, model, spec)
                    continue
                # An even newer config: the replacement in progress is obsolete.
                self._retire(pending)
            if current is not None and current.identity == identity:
                self._update(current, model, spec)
                current.on_demand = model.on_demand
                if not current.running and not model.on_demand and self._started and not budgeted:
                    log.info("replica %s: now load always; starting it", current.replica.name)
                    self.wake(name, index)
                continue
            new = self._member(key, model, spec)
            if current is None or (not current.running and current.proc is not None):
                log.info("replica %s: new", new.replica.name)
                self._members.setdefault(name, {})[index] = new
                if current is not None:
                    self._retire(current)
                if not new.on_demand and not budgeted:
                    self._start(new)
            elif new.proc is None or not self._started:
                # Nothing to wait for: a remote url is READY at once.
                log.info("replica %s: changed; switching now", new.replica.name)
                self._members[name][index] = new
                self._retire(current)
                self._notify(new.replica)
                self._start(new)
            elif self._overlaps(current, new) or budgeted:
                log.info(
                    "replica %s: changed, and the new one shares CPUs/GPUs or the memory budget with the old "
                    "one; draining and stopping the old one before starting the new one",
                    new.replica.name,
                )
                self._members[name][index] = new
                self._retire(current)
                self._spawn_task(self._start_after_retired(new))
            else:
                log.info("replica %s: changed; starting the new one, switching when it is ready", new.replica.name)
                self._pending[key] = new
                self._start(new)
        for name in list(self._members):
            for index in list(self._members[name]):
                if (name, index) not in wanted:
                    member = self._members[name].pop(index)
                    log.info("replica %s: removed; draining", member.replica.name)
                    self._retire(member)
            if not self._members[name]:
                del self._members[name]
        for key in [k for k in self._pending if k not in wanted]:
            self._retire(self._pending.pop(key))

    async def stop(self, deadline: float) -> None:
        """Stop every child in parallel, all by ``deadline`` (loop.time()); finish background work.

        Requests are not drained here: the daemon drains them before it stops the supervisor.
        """
        self._closed = True
        members = [m for by_index in self._members.values() for m in by_index.values()]
        members += list(self._pending.values()) + list(self._retiring)
        await asyncio.gather(*(m.proc.stop(deadline) for m in members if m.proc is not None))
        for m in members:
            if m.proc is None and m.replica.state is not ReplicaState.STOPPED:
                m.replica.state = ReplicaState.STOPPED
                self._notify(m.replica)
        # Drains see _closed and end; their processes are already stopped.
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- building ------------------------------------------------------------------------------

    def _wanted(self, cfg: Config) -> dict[Key, tuple[ModelConfig, LaunchSpec | None]]:
        """Every replica a config asks for, with its spec (None for remote urls)."""
        wanted: dict[Key, tuple[ModelConfig, LaunchSpec | None]] = {}
        for name, model in cfg.models.items():
            if model.backend == "openai":
                for index in range(len(model.urls)):
                    wanted[(name, index)] = (model, None)
                continue
            launcher = launcher_for(model, cfg.launchers)
            for index in range(model.replica_slots):
                wanted[(name, index)] = (model, launch_spec(name, model, launcher, index))
        return wanted

    @staticmethod
    def _identity(index: int, model: ModelConfig, spec: LaunchSpec | None) -> tuple[object, ...]:
        if spec is not None:
            return spec.identity()
        # The url is the identity of a remote replica: same url, same counters.
        return ("openai", model.urls[index].rstrip("/"))

    def _member(self, key: Key, model: ModelConfig, spec: LaunchSpec | None) -> _Member:
        name, index = key
        if spec is None:
            url = model.urls[index].rstrip("/")
            replica = Replica(
                model=name,
                name=f"{name}/{index}",
                backend="openai",
                url=url,
                slots=model.slots or DEFAULT_REMOTE_SLOTS,
                state=ReplicaState.READY,
            )
            return _Member(key, replica, None, self._identity(index, model, spec))
        replica = Replica(model=name, name=spec.replica, backend=spec.backend, slots=spec.slots)
        if model.on_demand:
            replica.state = ReplicaState.COLD
        proc = ManagedProcess(replica, spec, self._session, self._proc_changed)
        return _Member(key, replica, proc, self._identity(index, model, spec), on_demand=model.on_demand)

    def _update(self, member: _Member, model: ModelConfig, spec: LaunchSpec | None) -> None:
        """Apply settings that need no restart to a kept replica."""
        if member.proc is not None and spec is not None:
            member.proc.update(spec)
        elif member.proc is None:
            member.replica.slots = model.slots or DEFAULT_REMOTE_SLOTS

    # --- transitions -----------------------------------------------------------------------

    def _start(self, member: _Member) -> None:
        if member.proc is not None and self._started and not self._closed:
            member.proc.start()

    def _proc_changed(self, replica: Replica) -> None:
        """Every supervised replica's state change passes here before the owner's listener."""
        pending = next((m for m in self._pending.values() if m.replica is replica), None)
        if pending is not None and replica.state is ReplicaState.READY and not self._closed:
            # Switch before telling the listener, so that replicas(model) already lists it
            # when the admission queue looks for a replica to dispatch to.
            name, index = pending.key
            del self._pending[pending.key]
            old = self._members.setdefault(name, {}).get(index)
            self._members[name][index] = pending
            log.info("replica %s: the replacement is ready; switched", replica.name)
            self._notify(replica)
            if old is not None:
                self._retire(old)
            return
        self._notify(replica)

    def _retire(self, member: _Member) -> asyncio.Task[None]:
        """Take it out of rotation now; stop it once drained (background)."""
        member.replica.draining = True
        self._notify(member.replica)
        task = self._spawn_task(self._drain_and_stop(member))
        self._retiring[member] = task
        task.add_done_callback(lambda _: self._retiring.pop(member, None))
        return task

    async def _drain_and_stop(self, member: _Member, bounded: bool = True) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self._cfg.server.drain_seconds if bounded else float("inf")
        # Polled: the relay changes in_flight on every request and signals nobody.
        while member.replica.in_flight > 0 and loop.time() < end and not self._closed:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        if member.replica.in_flight > 0:
            log.warning(
                "replica %s: stopping with %d requests still in flight", member.replica.name, member.replica.in_flight
            )
        if member.proc is not None:
            await member.proc.stop()
        elif member.replica.state is not ReplicaState.STOPPED:
            member.replica.state = ReplicaState.STOPPED
            self._notify(member.replica)
        log.info("replica %s: retired", member.replica.name)

    async def _start_after_retired(self, new: _Member) -> None:
        """Start ``new`` once every retiring replica of its (model, index) has stopped."""
        olds = [t for m, t in self._retiring.items() if m.key == new.key and m is not new]
        if olds:
            # Shielded: if this wait is cancelled, the old replicas still get stopped.
            await asyncio.gather(*(asyncio.shield(t) for t in olds), return_exceptions=True)
        self._start(new)

    @staticmethod
    def _overlaps(old: _Member, new: _Member) -> bool:
        """Would running both at once compete for the same CPUs or GPU memory?"""
        a, b = old.replica, new.replica
        if a.cpus is not None and b.cpus is not None and set(a.cpus) & set(b.cpus):
            return True
        if a.backend == b.backend == "vllm":
            # A vLLM given no GPU set sees every GPU of the host, and claims most of the
            # memory of those it uses: the new one would fail to load beside the old.
            return a.gpus is None or b.gpus is None or bool(set(a.gpus) & set(b.gpus))
        return False

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("supervisor task failed", exc_info=task.exception())

    def _notify(self, replica: Replica) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(replica)
        except Exception:
            log.exception("replica %s: on_change listener failed", replica.name)
