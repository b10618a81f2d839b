"""Balancer choice and admission order, no I/O: prefix affinity is stable for a conversation
and spreads distinct ones; bounded load; priority and fair share in the queue; timeouts."""

from __future__ import annotations

import asyncio
import json

import pytest

from llmd.admission import Admission
from llmd.balancer import Balancer, block_hashes
from llmd.errors import ApiError
from llmd.replica import Replica, ReplicaState


def replicas(n: int, slots: int = 4) -> list[Replica]:
    return [Replica("m", f"m/{i}", "llama-server", slots=slots, state=ReplicaState.READY) for i in range(n)]


def conversation(seed: int, turns: int) -> bytes:
    msgs = [{"role": "system", "content": "You are a helpful assistant. " * 4}]
    for t in range(turns):
        msgs.append({"role": "user", "content": f"conversation {seed} question {t}: " + "tell me more " * 20})
        msgs.append({"role": "assistant", "content": f"answer {t} " + "words " * 30})
    return json.dumps(msgs).encode()


def test_affinity_is_stable_across_turns_of_a_conversation() -> None:
    b, reps = Balancer("prefix-affinity"), replicas(3)
    first = b.choose(reps, block_hashes(conversation(1, 1)))
    assert first is not None and first.affinity == "miss"
    b.record(first.replica, block_hashes(conversation(1, 1)))
    for turns in range(2, 6):
        c = b.choose(reps, block_hashes(conversation(1, turns)))
        assert c is not None and c.replica is first.replica and c.affinity == "hit"
        b.record(c.replica, block_hashes(conversation(1, turns)))


def test_distinct_conversations_spread_evenly() -> None:
    b, reps = Balancer("prefix-affinity"), replicas(2, slots=100)
    counts = {r.name: 0 for r in reps}
    for seed in range(40):
        h = block_hashes(conversation(seed, 1))
        c = b.choose(reps, h)
        assert c is not None
        c.replica.in_flight += 1  # conversations stay open
        b.record(c.replica, h)
        counts[c.replica.name] += 1
    assert counts == {"m/0": 20, "m/1": 20}


def test_bounded_load_sends_a_hot_conversation_elsewhere() -> None:
    b, reps = Balancer("prefix-affinity", load_factor=1.25), replicas(2, slots=8)
    h = block_hashes(conversation(7, 2))
    c = b.choose(reps, h)
    assert c is not None
    b.record(c.replica, h)
    home = c.replica
    home.in_flight = 4  # far above its fair share while the other replica is idle
    c2 = b.choose(reps, h)
    assert c2 is not None and c2.replica is not home and c2.affinity == "fallback"


def test_no_free_slot_means_none_and_full_replica_is_skipped() -> None:
    b, reps = Balancer("least-loaded"), replicas(2, slots=1)
    reps[0].in_flight = 1
    c = b.choose(reps, [])
    assert c is not None and c.replica is reps[1]
    reps[1].in_flight = 1
    assert b.choose(reps, []) is None


def test_unready_draining_and_ejected_replicas_are_not_chosen() -> None:
    b, reps = Balancer("round-robin"), replicas(3)
    reps[0].state = ReplicaState.BACKOFF
    reps[1].draining = True
    for _ in range(5):
        c = b.choose(reps, [])
        assert c is not None and c.replica is reps[2]


async def served_in_order(adm: Admission, first_key: str, waves: list[list[tuple[str, int]]]) -> list[str]:
    """Hold the only slot, queue each wave of (key, priority) requests, free the slot, and
    return the order in which the queued requests got it."""
    first = await adm.acquire(first_key, 1, [])
    order: list[str] = []

    async def req(key: str, prio: int) -> None:
        c = await adm.acquire(key, prio, [])
        order.append(key)
        await asyncio.sleep(0)
        adm.release(c.replica, key, 1.0)

    tasks: list[asyncio.Task[None]] = []
    for wave in waves:
        tasks += [asyncio.create_task(req(k, p)) for k, p in wave]
        await asyncio.sleep(0)
    assert adm.depth == sum(len(w) for w in waves)
    adm.release(first.replica, first_key, 5.0)
    await asyncio.gather(*tasks)
    return order


async def test_admission_queue_orders_by_priority_then_fair_share() -> None:
    """1. One slot, taken by the heavy key. 2. Queue: heavy x3 (priority 1), light x1
    (priority 1), vip x1 (priority 2). 3. As the slot frees: vip first, then light (least
    service), then heavy's in arrival order."""
    reps = replicas(1, slots=1)
    adm = Admission("m", lambda: reps, Balancer("least-loaded"), max_queue=10, queue_timeout_s=5)
    order = await served_in_order(adm, "heavy", [[("heavy", 1)] * 3, [("light", 1), ("vip", 2)]])
    assert order == ["vip", "light", "heavy", "heavy", "heavy"]
    assert reps[0].in_flight == 0


async def test_queue_full_and_timeout_answer_503_with_retry_after() -> None:
    reps = replicas(1, slots=1)
    adm = Admission("m", lambda: reps, Balancer("least-loaded"), max_queue=1, queue_timeout_s=0.2)
    await adm.acquire("a", 0, [])
    waiter = asyncio.create_task(adm.acquire("a", 0, []))
    await asyncio.sleep(0)
    with pytest.raises(ApiError) as full:
        await adm.acquire("b", 0, [])
    assert full.value.status == 503 and full.value.type == "server_overloaded"
    assert "queue is full" in full.value.message and int(full.value.headers["Retry-After"]) >= 1
    with pytest.raises(ApiError) as late:
        await waiter
    assert late.value.status == 503 and "queue_timeout_s" in late.value.message
    assert adm.depth == 0


async def test_cancelled_waiter_leaves_the_queue_and_never_holds_a_slot() -> None:
    reps = replicas(1, slots=1)
    adm = Admission("m", lambda: reps, Balancer("least-loaded"), max_queue=5, queue_timeout_s=5)
    held = await adm.acquire("a", 0, [])
    waiter = asyncio.create_task(adm.acquire("b", 0, []))
    await asyncio.sleep(0)
    assert adm.depth == 1
    waiter.cancel()
    await asyncio.sleep(0)
    assert adm.depth == 0
    adm.release(held.replica, "a", 0.1)
    assert reps[0].in_flight == 0


async def test_fifo_admission_serves_in_arrival_order() -> None:
    reps = replicas(1, slots=1)
    adm = Admission("m", lambda: reps, Balancer("least-loaded"), max_queue=10, queue_timeout_s=5, order="fifo")
    order = await served_in_order(adm, "heavy", [[("heavy", 1), ("heavy", 1), ("light", 1), ("vip", 2)]])
    assert order == ["heavy", "heavy", "light", "vip"]


def test_new_conversations_arriving_one_at_a_time_alternate() -> None:
    """Sequential requests (nothing in flight at choice time) still spread: fewest served wins."""
    b, reps = Balancer("prefix-affinity"), replicas(2)
    names = []
    for seed in range(6):
        h = block_hashes(conversation(100 + seed, 1))
        c = b.choose(reps, h)
        assert c is not None
        c.replica.served += 1  # what Admission does when it grants the slot
        b.record(c.replica, h)
        names.append(c.replica.name)
    assert names.count("m/0") == names.count("m/1") == 3
