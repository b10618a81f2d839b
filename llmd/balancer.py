"""Choose a replica for a request: prefix affinity with bounded load, or least-loaded, or
round-robin.

Prefix affinity, and why it is keyed on raw bytes: a conversation's next turn re-sends
the whole history, serialized the same way by the same client, so the raw JSON bytes of
``messages`` (or ``prompt``) of turn N are a prefix of turn N+1's. We cut those bytes
into fixed blocks and chain-hash them (h_i = hash(h_{i-1}, block_i)), as vLLM's prefix
cache does with token blocks. A per-model index maps each block hash to the replica that
last received it (LRU-bounded). The longest run of matching blocks names the replica that
most likely still holds the prompt in llama.cpp's cache. The routing key therefore never
changes as turns are added, and no JSON is decoded to compute it.

The match is taken when it covers at least ``affinity_min_match`` of the prompt (SGLang's
cache-aware router uses ~50%) and that replica has a free slot and is within its fair
share (``load_factor`` x mean in-flight, "bounded load"); otherwise the least-loaded
replica, ties broken by the fewest requests served, then by a rendezvous hash of the first
block, so new conversations spread evenly even when they arrive one at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .replica import Replica

BLOCK_BYTES = 128
MAX_INDEX_BLOCKS = 200_000  # ~ 25 MB of prompts remembered per model; oldest forgotten first
# Only the first 256 KiB of a prompt are hashed (2,048 blocks, well under a millisecond): a
# longer shared prefix says nothing more about which replica holds it, and an 8 MiB prompt
# would otherwise hold the event loop for tens of milliseconds and flush the index.
MAX_HASHED_BYTES = 256 * 1024


@dataclass(slots=True)
class Choice:
    replica: Replica
    affinity: str  # "hit" (prefix match used), "fallback" (match existed but not used), "miss", "none"


def block_hashes(prefix: bytes) -> list[int]:
    hashes: list[int] = []
    h = 0
    n = min(len(prefix), MAX_HASHED_BYTES) // BLOCK_BYTES  # only whole blocks: a partial tail changes next turn
    for i in range(n):
        h = hash((h, prefix[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES]))
        hashes.append(h)
    return hashes


class Balancer:
    def __init__(self, strategy: str, min_match: float = 0.5, load_factor: float = 1.25) -> None:
        self.strategy = strategy
        self.min_match = min_match
        self.load_factor = load_factor
        self._rr = 0
        # block hash -> (replica name, that replica's generation when it got the block)
        self._index: OrderedDict[int, tuple[str, int]] = OrderedDict()
        self._generation: dict[str, int] = {}  # bumped by forget(): older entries are stale

    def configure(self, strategy: str, min_match: float, load_factor: float) -> None:
        self.strategy, self.min_match, self.load_factor = strategy, min_match, load_factor

    def choose(
        self, replicas: Sequence[Replica], hashes: Sequence[int], exclude: frozenset[str] = frozenset()
    ) -> Choice | None:
        """A routable replica with a free slot, or None when all are busy (caller queues)."""
        candidates = [r for r in replicas if r.routable and r.free_slots > 0 and r.name not in exclude]
        if not candidates and not any(r.routable for r in replicas):
            # Panic mode (as Envoy does): when every ready replica is ejected for failures,
            # ejection is ignored; answering from a flaky replica beats queuing until timeout.
            candidates = [r for r in replicas if r.accepting and r.free_slots > 0 and r.name not in exclude]
        if not candidates:
            return None
        if self.strategy == "round-robin":
            self._rr += 1
            return Choice(candidates[self._rr % len(candidates)], "none")
        if self.strategy == "least-loaded" or not hashes:
            return Choice(self._least_loaded(candidates, hashes), "none")

        target, depth = self._longest_match(hashes)
        total_in_flight = sum(r.in_flight for r in replicas if r.routable)
        n_routable = sum(1 for r in replicas if r.routable) or 1
        fair = self.load_factor * (total_in_flight + 1) / n_routable
        if target is not None and depth >= self.min_match * len(hashes):
            least = min(r.in_flight for r in candidates)
            for r in candidates:
                if r.name == target:
                    # Bounded load: keep the cached replica unless it carries clearly more than
                    # its share (over load_factor x the mean, and 2+ more than the least-loaded):
                    # re-reading a long prompt costs far more than waiting for a slot behind one.
                    within = r.in_flight + 1 <= fair or r.in_flight < least + 2
                    if within and not r.overloaded_backend:
                        return Choice(r, "hit")
                    break
            return Choice(self._least_loaded(candidates, hashes), "fallback")
        return Choice(self._least_loaded(candidates, hashes), "miss")

    def record(self, replica: Replica, hashes: Sequence[int]) -> None:
        """Remember that ``replica`` now holds this prompt (call after choosing it)."""
        if self.strategy != "prefix-affinity":
            return
        idx = self._index
        entry = (replica.name, self._generation.get(replica.name, 0))
        for h in hashes:
            idx[h] = entry
            idx.move_to_end(h)
        while len(idx) > MAX_INDEX_BLOCKS:
            idx.popitem(last=False)

    def forget(self, replica_name: str) -> None:
        """A restarted replica lost its cache: what we believed it held is stale. O(1): the
        entries stay until they age out of the LRU, and lookups skip old generations."""
        self._generation[replica_name] = self._generation.get(replica_name, 0) + 1

    def _longest_match(self, hashes: Sequence[int]) -> tuple[str | None, int]:
        idx = self._index
        best: str | None = None
        depth = 0
        gen = self._generation
        for i, h in enumerate(hashes):
            entry = idx.get(h)
            if entry is None or gen.get(entry[0], 0) != entry[1]:
                break  # chained hashes: nothing deeper can match
            best, depth = entry[0], i + 1
        return best, depth

    @staticmethod
    def _least_loaded(candidates: list[Replica], hashes: Sequence[int]) -> Replica:
        # Load = share of slots in use (replicas may differ in slots), then the backend's own
        # waiting queue, then the fewest requests served so far (so that new conversations
        # arriving one at a time still spread evenly), then a rendezvous hash.
        seed = hashes[0] if hashes else 0

        def key(r: Replica) -> tuple[float, float, int, int]:
            return (
                r.in_flight / r.slots,
                r.backend_metrics.get("waiting", 0.0) + r.backend_metrics.get("kv_cache_usage", 0.0),
                r.served,
                hash((seed, r.name)),
            )

        return min(candidates, key=key)
