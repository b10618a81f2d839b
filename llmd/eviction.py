"""Holdings: what the running replicas hold of the memory budget, and what could be freed.

A view built for one decision of the loader (loader.py), from the supervisor's members, the
estimates (budget.py), the members already claimed by pending starts and the admission
queues. ``victims`` is the eviction order; ``fixed`` what no eviction can free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .admission import Admission
from .budget import Resources, fmt
from .config import Config, ModelConfig
from .replica import ReplicaState
from .supervisor import Supervisor

Key = tuple[str, int]  # (model, replica index)


class Holdings:
    def __init__(
        self,
        cfg: Config,
        cap: Resources,
        needs: dict[Key, Resources],
        supervisor: Supervisor,
        claimed: set[Key],
        queues: Callable[[str], Admission | None],
    ) -> None:
        self.cfg, self.cap, self.needs = cfg, cap, needs
        self._sup, self._claimed, self._queues = supervisor, claimed, queues

    def held(self, reserved: Sequence[Resources] = ()) -> Resources:
        """Estimates of the members that hold a process (starting, serving, stopping), plus
        ``reserved`` (starts waiting for their evictions)."""
        held: Resources = {}
        keys = [(name, i) for name in self.cfg.models for i, _, running in self._sup.members(name) if running]
        for n in [*(self.needs.get(k, {}) for k in keys), *reserved]:
            for r, b in n.items():
                held[r] = held.get(r, 0) + b
        return held

    def protected(self, other: str, model: ModelConfig) -> set[int]:
        """The running members that min_replicas / pin keep (the lowest indexes)."""
        keep = max(model.min_replicas, 1 if model.pin else 0)
        running = [i for i, _, run in self._sup.members(other) if run]
        return set(running[:keep])

    def fixed(self, name: str) -> Resources:
        """What no eviction for ``name`` can free: load: always and kept members of other
        models, and ``name``'s own running members."""
        fixed: Resources = {}
        for other, model in self.cfg.models.items():
            protected = self.protected(other, model) if model.on_demand and other != name else set()
            for i, _, run in self._sup.members(other):
                if run and (other == name or not model.on_demand or i in protected):
                    for r, b in self.needs.get((other, i), {}).items():
                        fixed[r] = fixed.get(r, 0) + b
        return fixed

    def victims(self, name: str, short: Resources) -> list[Key] | None:
        """Members to stop that free ``short``, or None when too many are busy right now.

        In order: members already stopping (idle), idle ones (least recently used first), then
        busy ones whose queue is empty (they drain: no new requests, those in flight finish
        before the stop). A member with requests queued is never taken: they would wait for a
        start of their own at once."""
        candidates: list[tuple[int, float, Key]] = []
        for other, model in self.cfg.models.items():
            if other == name or not model.on_demand or model.backend == "openai":
                continue
            adm = self._queues(other)
            if adm is not None and adm.depth > 0:
                continue
            protected = self.protected(other, model)
            for i, r, run in self._sup.members(other):
                if not run or (other, i) in self._claimed or i in protected:
                    continue
                if r.draining:
                    candidates.append((0, 0.0, (other, i)))
                elif r.in_flight == 0:
                    candidates.append((1, r.last_used, (other, i)))
                elif r.state is ReplicaState.READY:
                    candidates.append((2, r.last_used, (other, i)))
        chosen: list[Key] = []
        left = dict(short)
        for _, _, key in sorted(candidates):
            gives = self.needs.get(key, {})
            if not any(gives.get(r, 0) > 0 for r in left):
                continue
            chosen.append(key)
            left = {r: b - gives.get(r, 0) for r, b in left.items() if b - gives.get(r, 0) > 0}
            if not left:
                return chosen
        return None

    def no_room(self, name: str, needs: Resources, never: Resources) -> str:
        holders = []
        for other, model in self.cfg.models.items():
            protected = self.protected(other, model) if model.on_demand else set()
            for i, r, running in self._sup.members(other):
                if running and other != name and self.needs.get((other, i)) and (not model.on_demand or i in protected):
                    why = "load: always" if not model.on_demand else "pinned"
                    holders.append(f"{r.name} ({fmt(sum(self.needs[(other, i)].values()))}, {why})")
        parts = ", ".join(f"{fmt(needs[r])} of {r} (budget {fmt(self.cap[r])})" for r in never)
        held = f"; held by {', '.join(holders)}" if holders else ""
        return (
            f"Model '{name}' cannot start: it needs {parts} within server.memory_budget, and the "
            f"models that cannot be stopped for it leave too little{held}."
        )
