"""Per-model admission: a request takes a slot on a replica, or waits in the model's queue.

Order of the queue: higher tier ``priority`` first; within a priority, the key that has
received the least service recently goes next (service = slot-seconds, decayed with a
half-life), then arrival order. So one key with 50 requests in flight cannot push a key
with one request to the back. The queue is scanned linearly at dispatch: it is bounded by
``routing.max_queue`` and service changes while requests wait, so a heap would go stale.

Admission and the balancer's choice happen in one synchronous step (no await between
"a slot is free" and "in_flight += 1"), so slots are never oversubscribed.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .balancer import Balancer, Choice
from .errors import overloaded
from .replica import Replica

SERVICE_HALF_LIFE_S = 30.0


@dataclass(eq=False)
class _Waiter:
    priority: int
    key_id: str
    seq: int
    hashes: Sequence[int]
    exclude: frozenset[str]
    future: asyncio.Future[Choice]
    enqueued: float = field(default_factory=time.monotonic)


class _Service:
    """Exponentially decayed slot-seconds per key."""

    def __init__(self) -> None:
        self._value: dict[str, tuple[float, float]] = {}  # key -> (value, at)

    def get(self, key: str, now: float) -> float:
        v, at = self._value.get(key, (0.0, now))
        return v * math.pow(0.5, (now - at) / SERVICE_HALF_LIFE_S)

    def add(self, key: str, amount: float, now: float) -> None:
        self._value[key] = (self.get(key, now) + amount, now)


class Admission:
    def __init__(
        self,
        model: str,
        replicas: Callable[[], Sequence[Replica]],
        balancer: Balancer,
        max_queue: int,
        queue_timeout_s: float,
        order: str = "fair",
    ) -> None:
        self.model = model
        self.order = order
        self._replicas = replicas
        self.balancer = balancer
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._service = _Service()
        self._in_service: dict[str, int] = {}  # key -> requests holding a slot now
        self.on_wait: Callable[[float], None] | None = None  # metrics hook: seconds waited
        self._timer: asyncio.TimerHandle | None = None  # dispatch when an ejection runs out
        self._timer_at = 0.0
        self.last_wait_s = 0.0  # how long the last request that queued waited (the admin page)
        # (when, seconds waited) of recent acquisitions, for scale-up (loader.py)
        self.recent_waits: deque[tuple[float, float]] = deque(maxlen=1024)

    @property
    def depth(self) -> int:
        return len(self._waiters)

    def oldest_wait_s(self) -> float:
        """How long the request at the head of the queue (the longest waiting) has waited."""
        now = time.monotonic()
        return max((now - w.enqueued for w in self._waiters), default=0.0)

    def configure(self, max_queue: int, queue_timeout_s: float, order: str = "fair") -> None:
        self.max_queue, self.queue_timeout_s, self.order = max_queue, queue_timeout_s, order

    def _grant(self, choice: Choice, key_id: str, hashes: Sequence[int]) -> Choice:
        choice.replica.last_used = time.monotonic()
        choice.replica.in_flight += 1
        choice.replica.served += 1
        self._in_service[key_id] = self._in_service.get(key_id, 0) + 1
        self.balancer.record(choice.replica, hashes)
        return choice

    async def acquire(
        self,
        key_id: str,
        priority: int,
        hashes: Sequence[int],
        exclude: frozenset[str] = frozenset(),
        start_budget_s: float = 0.0,
    ) -> Choice:
        """A replica with a slot taken for this request; raise 503 when the queue is full or the
        wait expires. A cancelled caller (client gone) leaves the queue.

        ``start_budget_s`` > 0: a replica of this (on-demand) model is starting for it; the wait
        may last that much longer than queue_timeout_s, and no replica being ready is no error."""
        if not self._waiters:
            choice = self.balancer.choose(self._replicas(), hashes, exclude)
            if choice is not None:
                self._note_wait(0.0)
                return self._grant(choice, key_id, hashes)
        if not start_budget_s and all(r.draining for r in self._replicas()):
            raise overloaded(f"Model '{self.model}' has no replica to serve it.", 5)
        if len(self._waiters) >= self.max_queue:
            raise overloaded(
                f"Model '{self.model}' is saturated: its queue is full ({self.max_queue} waiting). Retry later.",
                self._retry_after(),
            )
        loop = asyncio.get_running_loop()
        w = _Waiter(priority, key_id, next(self._seq), hashes, exclude, loop.create_future())
        self._waiters.append(w)
        # Waiters ahead may be unplaceable (a retry that excludes the only free replica):
        # this one may still fit now.
        self.dispatch()
        try:
            async with asyncio.timeout(self.queue_timeout_s + start_budget_s):
                choice = await asyncio.shield(w.future)
        except TimeoutError:
            self._drop(w)
            if start_budget_s:
                raise overloaded(
                    f"Model '{self.model}' was starting and did not serve within queue_timeout_s="
                    f"{self.queue_timeout_s:g} plus its start_timeout_s={start_budget_s:g}.",
                    self._retry_after(),
                ) from None
            raise overloaded(
                f"Model '{self.model}' is saturated: no slot freed within queue_timeout_s={self.queue_timeout_s:g}.",
                self._retry_after(),
            ) from None
        except asyncio.CancelledError:
            self._drop(w)
            raise
        finally:
            waited = time.monotonic() - w.enqueued
            self.last_wait_s = waited
            self._note_wait(waited)
            if self.on_wait is not None:
                self.on_wait(waited)
        return choice

    def _note_wait(self, waited_s: float) -> None:
        self.recent_waits.append((time.monotonic(), waited_s))

    def wait_p50(self, window_s: float) -> float:
        """The median queue wait over the last ``window_s``: waits that ended in it, and the
        age of every request still waiting (a queue stuck behind one slow replica shows)."""
        now = time.monotonic()
        waits = [w for t, w in self.recent_waits if now - t <= window_s]
        waits += [now - w.enqueued for w in self._waiters]
        if not waits:
            return 0.0
        waits.sort()
        return waits[len(waits) // 2]

    def _drop(self, w: _Waiter) -> None:
        if w in self._waiters:
            self._waiters.remove(w)
            self.dispatch()
        elif w.future.done() and not w.future.cancelled():
            # Granted in the same tick it was cancelled or timed out: give the slot back.
            self.release(w.future.result().replica, w.key_id, 0.0)

    def release(self, replica: Replica, key_id: str, slot_seconds: float) -> None:
        """The request finished with its replica (any way): free the slot, wake waiters."""
        replica.in_flight -= 1
        replica.last_used = time.monotonic()
        n = self._in_service.get(key_id, 1) - 1
        if n:
            self._in_service[key_id] = n
        else:
            self._in_service.pop(key_id, None)
        self._service.add(key_id, slot_seconds, time.monotonic())
        self.dispatch()

    def dispatch(self) -> None:
        """Give free slots to waiters in order; called on every change that may free a place:
        a release, an arrival, a cancellation, a replica READY, an ejection running out.

        A waiter that cannot be placed (its retry excludes every free replica) is skipped,
        not waited on: the next in order may fit. With no exclusions nobody can be placed."""
        if not self._waiters:
            return
        now = time.monotonic()
        replicas = self._replicas()
        ranked = sorted(self._waiters, key=lambda w: self._rank(w, now)) if len(self._waiters) > 1 else self._waiters
        for w in list(ranked):
            choice = self.balancer.choose(replicas, w.hashes, w.exclude)
            if choice is None:
                if not w.exclude:
                    break
                continue
            self._waiters.remove(w)
            w.future.set_result(self._grant(choice, w.key_id, w.hashes))
        if self._waiters:
            self._wake_after_ejection(replicas, now)

    def _wake_after_ejection(self, replicas: Sequence[Replica], now: float) -> None:
        """An ejected replica with free slots returns when its ejection runs out, and no event
        says so: dispatch again then."""
        ends = [r.ejected_until for r in replicas if r.accepting and r.free_slots > 0 and r.ejected_until > now]
        if not ends or (self._timer is not None and not self._timer.cancelled() and self._timer_at <= min(ends)):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = min(ends)
        self._timer = asyncio.get_running_loop().call_later(self._timer_at - now + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.dispatch()

    def _rank(self, w: _Waiter, now: float) -> tuple[int, float, int]:
        if self.order == "fifo":
            return (0, 0.0, w.seq)
        # Service received recently plus what the key holds right now (each slot held counts
        # as if it had run half a half-life), so a key with many in flight yields to one with few.
        held = self._in_service.get(w.key_id, 0) * SERVICE_HALF_LIFE_S / 2
        return (-w.priority, self._service.get(w.key_id, now) + held, w.seq)

    def _retry_after(self) -> int:
        return max(1, min(60, math.ceil(self.queue_timeout_s / 4)))

    def fail_all(self, message: str) -> None:
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(overloaded(message, 5))
        self._waiters.clear()
