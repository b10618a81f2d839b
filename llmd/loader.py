"""Loader: which on-demand replicas run, within the memory budget.

``load: on_demand`` models (config.py) have ``max_replicas`` supervisor members that start
COLD. The loader is the one place that decides, synchronously on the event loop, when one
starts and when one stops, so that two decisions never race:

- a request for a model with no running replica (``want``, from ``Pool.serve``) starts one
  and waits in the model's admission queue (its queue timeout extended by the start budget);
  concurrent requests find the start under way and just wait;
- a start that does not fit the budget first stops the least recently used idle on-demand
  replicas of other models (no request in flight or queued, not pinned, above min_replicas),
  and spawns only once they are reaped; when nothing can be stopped the request gets 503;
- every ``TICK_S``: a replica idle for ``idle_ttl_s`` stops (the model goes cold), one beyond
  the first after ``scale_down_idle_s``; a model whose queue wait p50 over ``scale_window_s``
  exceeds ``scale_up_wait_s`` starts another replica (up to ``max_replicas``, in free budget
  only: scaling never evicts another model); min_replicas, pin and preload are kept.

Budget accounting: a running member (starting, serving or still stopping) holds its estimate
(budget.py); a start waiting for evictions holds a reservation; the members it evicts are
claimed by it, so no other start counts their memory. A new process spawns only after the
ones it displaces are gone, so the processes alive never exceed the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .admission import Admission
from .budget import EstimateError, Resources, capacity, fmt, replica_needs
from .config import Config, ModelConfig
from .errors import no_room
from .eviction import Holdings, Key
from .launchers import launcher_for
from .metrics import Metrics
from .replica import ReplicaState
from .supervisor import Supervisor

log = logging.getLogger("llmd.loader")

TICK_S = 0.25


class NoRoom(Exception):
    """A start does not fit the memory budget and nothing can be stopped for it."""


@dataclass
class _Start:
    needs: Resources
    victims: list[asyncio.Task[None]]


class Loader:
    def __init__(self, cfg: Config, supervisor: Supervisor, metrics: Metrics) -> None:
        self._sup = supervisor
        self._metrics = metrics
        self._queues: Callable[[str], Admission | None] = lambda _: None
        self._pending: dict[Key, _Start] = {}  # starts waiting for their evictions
        self._claimed: set[Key] = set()  # members stopping for a pending start
        self._task: asyncio.Task[None] | None = None
        self._starts: set[asyncio.Task[None]] = set()  # the tasks running those starts
        self._preloaded: set[str] = set()  # preload is done once per model name
        self._refused: set[str] = set()  # models whose kept replicas do not fit (logged once)
        self.configure(cfg)

    # --- configuration -------------------------------------------------------------------------

    def plan(self, cfg: Config) -> tuple[Resources, dict[Key, Resources]]:
        """The budget and every replica's needs under ``cfg``. Raises ValueError when a budgeted
        replica cannot be estimated or the always-loaded models alone exceed the budget (a
        reload is then refused, changing nothing)."""
        cap = capacity(cfg.server.memory_budget)
        needs: dict[Key, Resources] = {}
        for name, model in cfg.models.items():
            if model.backend == "openai":
                continue
            for index in range(model.replica_slots):
                try:
                    needs[(name, index)] = replica_needs(model, index, cap)
                except (EstimateError, ValueError) as e:
                    raise ValueError(f"models.{name}: {e}") from None
        fixed: Resources = {}
        for (name, _), n in needs.items():
            if not cfg.models[name].on_demand:
                for r, b in n.items():
                    fixed[r] = fixed.get(r, 0) + b
        over = [f"{r}: {fmt(b)} > {fmt(cap[r])}" for r, b in fixed.items() if b > cap[r]]
        if over:
            raise ValueError("the load: always models alone exceed server.memory_budget (" + "; ".join(over) + ")")
        return cap, needs

    def configure(self, cfg: Config, plan: tuple[Resources, dict[Key, Resources]] | None = None) -> None:
        """Take a config (its ``plan``, computed before the supervisor reconciled)."""
        self.cap, self.needs = plan if plan is not None else self.plan(cfg)
        self.cfg = cfg
        for r, b in self.cap.items():
            self._metrics.observe_budget(r, b)

    def bind(self, queues: Callable[[str], Admission | None]) -> None:
        """How to find a model's admission queue (the current Runtime's pools)."""
        self._queues = queues

    def start(self) -> None:
        """Preload / pin / min_replicas now; then the idle and scale rules every TICK_S."""
        self._ensure_kept()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="loader")

    async def stop(self) -> None:
        """No more decisions (shutdown: the supervisor stops every child next)."""
        for task in [self._task, *self._starts]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None

    # --- the request path ----------------------------------------------------------------------

    def want(self, name: str) -> float:
        """A request for ``name`` is about to queue: 0.0 when it has a replica that serves, else
        the start budget it may wait for (a start triggered now, or one under way). Raises 503
        when a start is needed and the budget has no room for it."""
        model = self.cfg.models.get(name)
        if model is None or not model.on_demand:
            return 0.0
        members = self._sup.members(name)
        if any(r.accepting for _, r, _ in members):
            return 0.0
        budget = self.start_budget(model)
        starting = [i for i, r, running in members if running and not r.draining]
        if starting or any(k[0] == name for k in self._pending):
            return budget
        try:
            self.start_one(name, "request")
        except NoRoom as e:
            raise no_room(str(e)) from None
        return budget

    def start_budget(self, model: ModelConfig) -> float:
        return model.start_timeout_s or launcher_for(model, self.cfg.launchers).start_timeout_s

    # --- the one place that decides ------------------------------------------------------------

    def start_one(self, name: str, reason: str, evict: bool = True) -> int | None:
        """Start a member of ``name`` that is not running; its index, or None when none can start
        now (all run, or the budget waits for busy models to drain: the tick tries again while
        requests queue). Raises NoRoom, changing nothing, when it can never fit: what holds
        the memory is load: always, pinned, or the model alone exceeds the budget."""
        members = self._sup.members(name)
        # A member still stopping (idle) comes back first: it has no memory to find.
        for index, r, running in members:
            if running and r.draining and (name, index) not in self._claimed:
                self._wake(name, index, reason)
                return index
        cold = [i for i, _, running in members if not running and (name, i) not in self._pending]
        if not cold:
            return None
        index = cold[0]
        needs = self.needs.get((name, index), {})
        short = self._shortfall(needs)
        if not short:
            self._wake(name, index, reason)
            return index
        view = self._view()
        fixed = view.fixed(name)
        never = {r: b for r, b in needs.items() if fixed.get(r, 0) + b > self.cap[r]}
        if never:
            raise NoRoom(view.no_room(name, needs, never))
        victims = view.victims(name, short) if evict else None
        if victims is None:
            return None
        tasks = []
        for key in victims:
            self._claimed.add(key)
            if not self._releasing(key):
                self._count_stop(key[0], "evicted")
                log.info("model %s: stopping replica %d to make room for %s", key[0], key[1], name,
                         extra={"model": key[0], "reason": "evicted", "for": name})  # fmt: skip
            task = self._sup.sleep(*key)
            if task is not None:
                tasks.append(task)
        self._pending[(name, index)] = _Start(needs, tasks)
        task = asyncio.get_running_loop().create_task(self._start_after((name, index), victims, tasks, reason))
        self._starts.add(task)
        task.add_done_callback(self._starts.discard)
        return index

    def _shortfall(self, needs: Resources) -> Resources:
        """Bytes missing per resource for ``needs`` beyond what is free now."""
        held = self._held()
        return {r: b - (self.cap[r] - held.get(r, 0)) for r, b in needs.items() if held.get(r, 0) + b > self.cap[r]}

    def _held(self, pending: bool = True) -> Resources:
        return self._view().held([st.needs for st in self._pending.values()] if pending else [])

    def _view(self) -> Holdings:
        return Holdings(self.cfg, self.cap, self.needs, self._sup, self._claimed, self._queues)

    def _releasing(self, key: Key) -> bool:
        return any(i == key[1] and running and r.draining for i, r, running in self._sup.members(key[0]))

    async def _start_after(self, key: Key, victims: list[Key], tasks: list[asyncio.Task[None]], reason: str) -> None:
        started = False
        try:
            if tasks:
                await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
            started = True
        finally:
            # One synchronous step: the victims' memory is gone, the reservation becomes the
            # member's (not when cancelled: llmd is stopping).
            self._claimed.difference_update(victims)
            self._pending.pop(key, None)
            if started:
                self._wake(*key, reason=reason)

    def _wake(self, name: str, index: int, reason: str) -> None:
        if self._sup.wake(name, index):
            for i, r, _ in self._sup.members(name):
                if i == index:
                    r.last_used = time.monotonic()  # the idle TTL counts from the start
            self._metrics.observe_model_event(name, "start", reason)
            log.info("model %s: starting replica %d (%s)", name, index, reason,
                     extra={"model": name, "reason": reason})  # fmt: skip

    def _count_stop(self, name: str, reason: str) -> None:
        self._metrics.observe_model_event(name, "stop", reason)

    # --- admin ---------------------------------------------------------------------------------

    def load(self, name: str) -> None:
        """``llmd load``: start one replica of a cold on-demand model (NoRoom when it cannot)."""
        busy = any(run and not r.draining for _, r, run in self._sup.members(name))
        if not busy and not any(k[0] == name for k in self._pending):
            self.start_one(name, "admin")

    def unload(self, name: str) -> list[asyncio.Task[None]]:
        """``llmd unload``: every running replica of the model drains and stops."""
        tasks = []
        for i, r, running in self._sup.members(name):
            if running and not r.draining:
                self._count_stop(name, "admin")
                log.info("model %s: stopping replica %d (admin)", name, i, extra={"model": name, "reason": "admin"})
            task = self._sup.sleep(name, i)
            if task is not None:
                tasks.append(task)
        return tasks

    # --- state ---------------------------------------------------------------------------------

    def state(self, name: str) -> str:
        """cold (on demand, nothing running), starting, ready, or unready."""
        members = self._sup.members(name)
        model = self.cfg.models.get(name)
        if any(r.accepting if model is not None and model.on_demand else r.state is ReplicaState.READY
               for _, r, _ in members):  # fmt: skip
            return "ready"
        running = [r for _, r, run in members if run and not r.draining]
        if model is not None and model.on_demand:
            if not running and not any(k[0] == name for k in self._pending):
                return "cold"
            if all(r.state in (ReplicaState.STARTING, ReplicaState.STOPPED, ReplicaState.COLD) for r in running):
                return "starting"
        return "unready"

    def status(self) -> dict[str, dict[str, object]]:
        now = time.monotonic()
        out: dict[str, dict[str, object]] = {}
        for name, model in self.cfg.models.items():
            members = self._sup.members(name)
            used = max((r.last_used for _, r, _ in members), default=0.0)
            out[name] = {
                "load": model.load,
                "state": self.state(name),
                "running": sum(1 for _, _, run in members if run),
                "max_replicas": model.replica_slots,
                "memory": {r: b for r, b in self.needs.get((name, 0), {}).items()},
                "idle_s": round(now - used, 1) if used else None,
                "pin": model.pin,
            }
        return out

    def budget(self) -> dict[str, dict[str, int]]:
        """Per resource: the budget, what processes hold, what starts have reserved on top."""
        held, total = self._held(pending=False), self._held()
        return {
            r: {"budget": b, "held": held.get(r, 0), "reserved": total.get(r, 0) - held.get(r, 0)}
            for r, b in self.cap.items()
        }

    # --- the rules that run on a timer ---------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick()
            except Exception:
                log.exception("loader tick failed")

    def tick(self) -> None:
        now = time.monotonic()
        for name, model in self.cfg.models.items():
            if model.on_demand and model.backend != "openai":
                self._demand(name)
                self._idle(name, model, now)
                self._scale(name, model)
        self._ensure_kept()
        for r, b in self._held(pending=False).items():
            self._metrics.observe_held(r, b)

    def _demand(self, name: str) -> None:
        """Requests queue for a model with nothing running (its start waited for busy models
        to drain, or a reload changed it): try the start again."""
        adm = self._queues(name)
        if adm is None or adm.depth == 0 or any(k[0] == name for k in self._pending):
            return
        if any(run and not r.draining for _, r, run in self._sup.members(name)):
            return
        try:
            self.start_one(name, "request")
        except NoRoom as e:
            adm.fail_all(str(e))

    def _idle(self, name: str, model: ModelConfig, now: float) -> None:
        adm = self._queues(name)
        if adm is not None and adm.depth > 0:
            return
        members = [(i, r) for i, r, run in self._sup.members(name) if run and not r.draining]
        keep = max(model.min_replicas, 1 if model.pin else 0)
        if len(members) <= keep:
            return
        ttl = model.idle_ttl_s if len(members) == 1 else min(model.scale_down_idle_s, model.idle_ttl_s)
        # Highest index first: the extra replicas go before the first one.
        for i, r in sorted(members, key=lambda m: -m[0]):
            # Not while STARTING: a slow first load must not count as idleness.
            if r.in_flight == 0 and r.state is not ReplicaState.STARTING and now - r.last_used >= ttl:
                reason = "idle" if len(members) == 1 else "scale_down"
                log.info("model %s: stopping replica %d (%s %.0fs)", name, i, reason, now - r.last_used,
                         extra={"model": name, "reason": reason})  # fmt: skip
                self._count_stop(name, reason)
                self._sup.sleep(name, i)
                return

    def _scale(self, name: str, model: ModelConfig) -> None:
        adm = self._queues(name)
        members = self._sup.members(name)
        running = [r for _, r, run in members if run and not r.draining]
        if adm is None or adm.depth == 0 or not running or len(running) >= model.replica_slots:
            return
        if any(r.state is not ReplicaState.READY for r in running) or any(k[0] == name for k in self._pending):
            return  # one start at a time
        p50 = adm.wait_p50(model.scale_window_s)
        if p50 <= model.scale_up_wait_s:
            return
        try:
            self.start_one(name, "scale_up", evict=False)
            log.info("model %s: queue wait p50 %.2fs > %.2fs", name, p50, model.scale_up_wait_s,
                     extra={"model": name, "reason": "scale_up"})  # fmt: skip
        except NoRoom as e:
            log.debug("model %s: no room to scale up: %s", name, e)

    def _ensure_kept(self) -> None:
        """min_replicas, pin and preload: start what they ask for that is not running."""
        for name, model in self.cfg.models.items():
            if model.backend == "openai":
                continue
            if not model.on_demand:
                # Under a budget a reload leaves new or cold always-replicas to the loader.
                if self.cap and any(not run for _, _, run in self._sup.members(name)):
                    self._start_all(name)
                continue
            want = max(model.min_replicas, 1 if model.pin else 0)
            running = sum(1 for _, r, run in self._sup.members(name) if run and not r.draining)
            running += sum(1 for k in self._pending if k[0] == name)
            reason = "pin" if model.pin else "min_replicas"
            if model.preload and name not in self._preloaded:
                self._preloaded.add(name)
                want, reason = max(want, 1), "preload"
            for _ in range(want - running):
                try:
                    self.start_one(name, reason)
                    self._refused.discard(name)
                except NoRoom as e:
                    if name not in self._refused:
                        log.error("model %s (%s): %s", name, reason, e)
                    self._refused.add(name)
                    break

    def _start_all(self, name: str) -> None:
        while True:
            try:
                if self.start_one(name, "always") is None:
                    return
                self._refused.discard(name)
            except NoRoom as e:
                if name not in self._refused:
                    log.error("model %s (always): %s", name, e)
                self._refused.add(name)
                return
