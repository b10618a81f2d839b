"""Models on demand against fake llama-servers started by llmd itself (loader.py, budget.py).

llmd runs in this process (``run_llmd``: the code path of `llmd serve`); its replicas are the
fake llama-server (tests/fake_backend.py) as `launchers.llama-server.command`, so starts and
stops are real child processes. Estimates are given as ``memory`` so the budget arithmetic is
exact: two models of 1 GiB under a 1.5 GiB budget never run together.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmd import cli, configfile
from llmd.config import ConfigError
from llmd.replica import Replica
from tests.conftest import Llmd, base_config, llmd_process, run_llmd, wait_for, write_config
from tests.fakeproc import FAKE_LLAMA

MSG = [{"role": "user", "content": "hello there"}]


def launchers() -> dict[str, Any]:
    return {
        "llama-server": {
            "command": [sys.executable, str(FAKE_LLAMA)], "start_timeout_s": 15, "stop_timeout_s": 2,
            "health_interval_s": 0.2, "health_failures": 2, "restart_delay_s": 0.2, "restart_max_delay_s": 2,
        }
    }  # fmt: skip


def model(tmp_path: Path, name: str, *args: str, **extra: Any) -> dict[str, Any]:
    doc = {
        "backend": "llama-server", "model": str(tmp_path / f"{name}.gguf"), "load": "on_demand",
        "idle_ttl_s": 60, "memory": "1GiB", "args": ["-np", "2", "--load-delay-s", "0.3", *args],
    }  # fmt: skip
    doc.update(extra)
    return doc


def doc_for(tmp_path: Path, models: dict[str, Any], budget: str | None = "1.5GiB", **sections: Any) -> dict[str, Any]:
    server = {"memory_budget": {"ram": budget}} if budget else {}
    return base_config(tmp_path, models, launchers=launchers(), server=server, **sections)


class Watch:
    """Every replica state change; the most replicas that ever held a process at once."""

    def __init__(self, srv: Llmd) -> None:
        self.srv = srv
        self.max_alive = 0
        self.log: list[tuple[str, str]] = []
        sup = srv.services.supervisor
        inner = sup._on_change
        assert inner is not None

        def on_change(r: Replica) -> None:
            self.log.append((r.name, r.state.value))
            self.max_alive = max(self.max_alive, self.alive())
            inner(r)

        sup._on_change = on_change

    def alive(self) -> int:
        st = self.srv.services.supervisor.status()
        return sum(1 for r in st if r["pid"] is not None)


Start = Callable[[dict[str, Any]], contextlib.AbstractAsyncContextManager[Llmd]]


@pytest.fixture
def start(tmp_path: Path) -> Start:
    def make(doc: dict[str, Any]) -> contextlib.AbstractAsyncContextManager[Llmd]:
        return run_llmd(write_config(tmp_path / "config.yaml", doc))

    return make


async def chat(s: aiohttp.ClientSession, url: str, model: str, **body: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": MSG, "max_tokens": 4, **body}
    async with s.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, await r.json()


async def get(s: aiohttp.ClientSession, url: str, path: str) -> tuple[int, Any]:
    async with s.get(url + path) as r:
        return r.status, await r.json(content_type=None) if path != "/metrics" else await r.text()


async def post_json(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with s.post(url) as r:
        return r.status, await r.json()


def rows(tmp_path: Path) -> list[tuple[str, int]]:
    con = sqlite3.connect(tmp_path / "usage.sqlite3")
    try:
        return list(con.execute("select model, status from requests order by id"))
    finally:
        con.close()


async def settled(srv: Llmd) -> None:
    await srv.services.ledger.flush()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_cold_start_once_then_idle_stop(tmp_path: Path, start: Start, session: aiohttp.ClientSession) -> None:
    doc = doc_for(tmp_path, {"a": model(tmp_path, "a", idle_ttl_s=1.0)}, budget=None)
    async with start(doc) as srv:
        st, ready = await get(session, srv.url, "/readyz")
        assert st == 200 and ready["models"]["a"]["state"] == "cold"
        _, models = await get(session, srv.url, "/v1/models")
        assert [m["id"] for m in models["data"]] == ["a"]
        assert srv.services.supervisor.status()[0]["state"] == "cold"
        # Five concurrent requests for the cold model: one start, every one served.
        answers = await asyncio.gather(*(chat(session, srv.url, "a") for _ in range(5)))
        assert [a[0] for a in answers] == [200] * 5
        _, text = await get(session, srv.url, "/metrics")
        assert metric(text, "llmd_model_events_total", model="a", event="start", reason="request") == 1
        assert metric(text, "llmd_model_state", model="a", state="ready") == 1
        # Idle for idle_ttl_s: stopped, cold again, still listed and ready.
        await wait_for(lambda: srv.services.supervisor.status()[0]["state"] == "cold", timeout_s=10)
        assert srv.services.supervisor.status()[0]["pid"] is None
        assert srv.services.loader.state("a") == "cold"
        st, ready = await get(session, srv.url, "/readyz")
        assert st == 200 and ready["models"]["a"]["state"] == "cold"
        _, text = await get(session, srv.url, "/metrics")
        assert metric(text, "llmd_model_events_total", model="a", event="stop", reason="idle") == 1
        # And it starts again on the next request.
        assert (await chat(session, srv.url, "a"))[0] == 200
        await settled(srv)
    assert rows(tmp_path) == [("a", 200)] * 6


async def test_swap_within_budget_never_overcommits(tmp_path: Path, start: Start,
                                                    session: aiohttp.ClientSession) -> None:  # fmt: skip
    doc = doc_for(tmp_path, {"a": model(tmp_path, "a"), "b": model(tmp_path, "b")})
    async with start(doc) as srv:
        watch = Watch(srv)
        # Alternating bursts: each swap stops the other (idle) model first.
        for m in ["a", "b", "a", "b"]:
            answers = await asyncio.gather(*(chat(session, srv.url, m) for _ in range(3)))
            assert [a[0] for a in answers] == [200] * 3, answers
        # Both at once, in waves: every request is served; the loser of a swap waits for the
        # other model's queue and in-flight requests to finish, then takes its place.
        answers = await asyncio.gather(*(chat(session, srv.url, m) for m in ["a", "b"] * 4))
        assert [a[0] for a in answers] == [200] * 8, answers
        assert watch.max_alive == 1
        _, status = await get(session, srv.url, "/admin/status")
        assert status["memory_budget"]["ram"]["budget"] == 3 << 29
        assert status["memory_budget"]["ram"]["held"] <= 3 << 29
        _, text = await get(session, srv.url, "/metrics")
        assert metric(text, "llmd_model_events_total", event="stop", reason="evicted") >= 3
        await settled(srv)
    assert len(rows(tmp_path)) == 4 * 3 + 8


async def test_concurrent_cold_starts_of_three_models(tmp_path: Path, start: Start,
                                                      session: aiohttp.ClientSession) -> None:  # fmt: skip
    doc = doc_for(tmp_path, {m: model(tmp_path, m) for m in "abc"})
    async with start(doc) as srv:
        watch = Watch(srv)
        answers = await asyncio.gather(*(chat(session, srv.url, m) for m in "abc" * 3))
        assert [a[0] for a in answers] == [200] * 9, answers
        assert watch.max_alive == 1
        await settled(srv)
    assert sorted(rows(tmp_path)) == sorted((m, 200) for m in "abc" * 3)


async def test_busy_model_drains_then_swaps(tmp_path: Path, start: Start,
                                            session: aiohttp.ClientSession) -> None:  # fmt: skip
    doc = doc_for(tmp_path, {"a": model(tmp_path, "a", "--token-delay-ms", "200"), "b": model(tmp_path, "b")})
    async with start(doc) as srv:
        watch = Watch(srv)
        slow = asyncio.create_task(chat(session, srv.url, "a", max_tokens=8))
        await wait_for(lambda: any(r["in_flight"] for r in srv.services.supervisor.status()), timeout_s=10)
        # b waits (no error) while a's request finishes: a is never stopped under a request.
        st, _ = await chat(session, srv.url, "b")
        assert st == 200
        assert slow.done() and (await slow)[0] == 200
        assert watch.max_alive == 1
        assert srv.services.loader.state("a") == "cold" and srv.services.loader.state("b") == "ready"
        await settled(srv)
    assert sorted(rows(tmp_path)) == [("a", 200), ("b", 200)]


async def test_no_room_is_503_when_what_holds_it_cannot_stop(tmp_path: Path, start: Start,
                                                             session: aiohttp.ClientSession) -> None:  # fmt: skip
    models = {
        "a": model(tmp_path, "a", load="always"), "b": model(tmp_path, "b"),
        "c": model(tmp_path, "c", memory="0.25GiB", pin=True), "big": model(tmp_path, "big", memory="2GiB"),
    }  # fmt: skip
    async with start(doc_for(tmp_path, models)) as srv:
        await wait_for(lambda: srv.services.loader.state("c") == "ready", timeout_s=10)
        for name, needs in (("b", "1.00 GiB"), ("big", "2.00 GiB")):
            st, body = await chat(session, srv.url, name)
            assert st == 503, body
            err = body["error"]
            assert err["code"] == "insufficient_memory" and err["type"] == "server_overloaded"
            assert f"Model '{name}' cannot start: it needs {needs} of ram (budget 1.50 GiB)" in err["message"]
            assert "a/0 (1.00 GiB, load: always)" in err["message"]
            assert "c/0 (256 MiB, pinned)" in err["message"]
        await settled(srv)
    assert sorted(rows(tmp_path)) == [("b", 503), ("big", 503)]


async def test_always_models_must_fit_and_budget_checks(tmp_path: Path) -> None:
    bad = doc_for(tmp_path, {"a": model(tmp_path, "a", load="always", memory="2GiB")})
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "c1.yaml", bad))
    assert "the load: always models alone need 2.00 GiB of ram, more than its 1.50 GiB" in str(e.value)
    doc = doc_for(tmp_path, {"a": model(tmp_path, "a", memory="lots", pin=True)}, budget="6 parsecs")
    doc["models"]["r"] = {"backend": "openai", "urls": ["http://127.0.0.1:1/v1"], "load": "on_demand"}
    doc["models"]["s"] = {"backend": "llama-server", "model": str(tmp_path / "s.gguf"), "pin": True}
    doc["models"]["t"] = model(tmp_path, "t", max_replicas=2, min_replicas=3, cpus=[[0]])
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "c2.yaml", doc))
    text = str(e.value)
    assert "server.memory_budget.ram: expected a size" in text
    assert "models.a.memory: expected a size" in text
    assert "models.r.load: on_demand is for models llmd starts" in text
    assert "models.s.pin: only for load: on_demand" in text
    assert "models.t.cpus: expected one set per replica (max_replicas 3), got 1" in text
    assert "models.t.min_replicas: 3 is more than max_replicas (2)" in text
    # No memory and an unreadable GGUF under a budget: say what to set.
    doc = doc_for(tmp_path, {"a": {**model(tmp_path, "a"), "memory": None}})
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "c3.yaml", doc))
    assert "models.a.memory: cannot read" in str(e.value)


def test_designs_mib_names_are_the_same_budget(tmp_path: Path) -> None:
    """DESIGN.md's contract names: server.memory_budget_mb and models.X.memory_mb (MiB)."""
    doc = doc_for(tmp_path, {"a": {**model(tmp_path, "a"), "memory": None, "memory_mb": 300}}, budget=None)
    doc["server"]["memory_budget_mb"] = 1536
    cfg = configfile.load(write_config(tmp_path / "mb.yaml", doc))
    assert cfg.server.memory_budget is not None and cfg.server.memory_budget.ram == 1536 << 20
    assert cfg.models["a"].memory == 300 << 20
    doc["server"]["memory_budget"] = {"ram": "1GiB"}
    doc["models"]["a"]["memory"] = "1GiB"
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "mb2.yaml", doc))
    assert "server.memory_budget_mb: give either memory_budget_mb or memory_budget.ram" in str(e.value)
    assert "models.a.memory_mb: give either memory_mb or memory" in str(e.value)


async def test_load_unload_pin_and_cli(tmp_path: Path, start: Start, session: aiohttp.ClientSession) -> None:
    models = {"a": model(tmp_path, "a"), "b": model(tmp_path, "b", memory="0.25GiB", pin=True),
              "c": model(tmp_path, "c", load="always", memory="0.1GiB")}  # fmt: skip
    async with start(doc_for(tmp_path, models)) as srv:
        sv = srv.services
        await wait_for(lambda: sv.loader.state("b") == "ready" and sv.loader.state("c") == "ready", timeout_s=10)
        assert sv.loader.state("a") == "cold"
        # `llmd load a`: started and READY when the command returns.
        out = await asyncio.to_thread(cli.main, ["load", "a", "--url", srv.url])
        assert out == 0 and sv.loader.state("a") == "ready"
        st = await asyncio.to_thread(cli.main, ["status", "--url", srv.url])
        assert st == 0
        async with session.post(srv.url + "/admin/models/nope/load") as r:
            assert r.status == 404
        async with session.post(srv.url + "/admin/models/c/unload") as r:
            assert r.status == 409 and (await r.json())["error"]["code"] == "not_on_demand"
        async with session.post(srv.url + "/admin/models/b/unload") as r:
            assert r.status == 409 and (await r.json())["error"]["code"] == "pinned"
        assert await asyncio.to_thread(cli.main, ["unload", "a", "--url", srv.url]) == 0
        assert sv.loader.state("a") == "cold"
        assert all(r["pid"] is None for r in sv.supervisor.status() if r["model"] == "a")
        _, text = await get(session, srv.url, "/metrics")
        assert metric(text, "llmd_model_events_total", model="a", event="start", reason="admin") == 1
        assert metric(text, "llmd_model_events_total", model="a", event="stop", reason="admin") == 1
        assert metric(text, "llmd_model_events_total", model="b", event="start", reason="pin") == 1
        assert metric(text, "llmd_memory_budget_bytes", resource="ram") == 3 << 29


def test_status_prints_models_and_budget(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    st = {
        "replicas": [{"replica": "a/0", "state": "cold", "slots": 2, "in_flight": 0, "restarts": 0}],
        "queues": {"a": 0},
        "models": {"a": {"load": "on_demand", "state": "cold", "running": 0, "max_replicas": 2,
                         "memory": {"ram": 1 << 30}, "idle_s": None, "pin": False}},
        "memory_budget": {"ram": {"budget": 3 << 29, "held": 0}},
    }  # fmt: skip
    monkeypatch.setattr(cli, "_admin_get", lambda *a, **k: st)
    assert cli.main(["status", "--url", "http://x"]) == 0
    out = capsys.readouterr().out
    assert "a/0      cold" in out
    assert "a      on_demand  cold   0/2      ram 1.00GiB  -" in out
    assert "memory budget: ram 0MiB of 1.50GiB" in out


async def test_scale_up_on_queue_wait_then_down(tmp_path: Path, start: Start, session: aiohttp.ClientSession) -> None:
    m = model(tmp_path, "a")
    m["args"] = ["-np", "1", "--load-delay-s", "0.1", "--token-delay-ms", "100"]
    m.update(max_replicas=2, scale_up_wait_s=0.3, scale_window_s=10, scale_down_idle_s=0.5, idle_ttl_s=1.5)
    async with start(doc_for(tmp_path, {"a": m}, budget="2.5GiB")) as srv:
        sv = srv.services
        answers = await asyncio.gather(*(chat(session, srv.url, "a", max_tokens=5) for _ in range(8)))
        assert [a[0] for a in answers] == [200] * 8
        _, text = await get(session, srv.url, "/metrics")
        assert metric(text, "llmd_model_events_total", model="a", event="start", reason="request") == 1
        assert metric(text, "llmd_model_events_total", model="a", event="start", reason="scale_up") == 1
        served = [r["served"] for r in sv.supervisor.status()]
        assert len(served) == 2 and all(served), served
        # The extra replica stops after scale_down_idle_s, the last one after idle_ttl_s.
        await wait_for(lambda: sum(1 for r in sv.supervisor.status() if r["pid"]) == 1, timeout_s=10)
        assert sv.loader.state("a") == "ready"
        await wait_for(lambda: all(r["state"] == "cold" for r in sv.supervisor.status()), timeout_s=10)
        _, text = await get(session, srv.url, "/metrics")
        assert metric(text, "llmd_model_events_total", model="a", event="stop", reason="scale_down") == 1
        assert metric(text, "llmd_model_events_total", model="a", event="stop", reason="idle") == 1


async def test_scale_up_stays_within_budget(tmp_path: Path, start: Start, session: aiohttp.ClientSession) -> None:
    m = model(tmp_path, "a", max_replicas=2, scale_up_wait_s=0.1, scale_window_s=10)
    m["args"] = ["-np", "1", "--load-delay-s", "0.1", "--token-delay-ms", "50"]
    async with start(doc_for(tmp_path, {"a": m})) as srv:
        answers = await asyncio.gather(*(chat(session, srv.url, "a", max_tokens=5) for _ in range(6)))
        assert [a[0] for a in answers] == [200] * 6
        assert sum(1 for r in srv.services.supervisor.status() if r["pid"]) == 1


async def test_reload_always_to_on_demand_and_back(tmp_path: Path, start: Start,
                                                   session: aiohttp.ClientSession) -> None:  # fmt: skip
    doc = doc_for(tmp_path, {"a": model(tmp_path, "a", load="always", idle_ttl_s=0.5)}, budget=None)
    async with start(doc) as srv:
        sv = srv.services
        await wait_for(lambda: sv.loader.state("a") == "ready", timeout_s=10)
        pid = sv.supervisor.status()[0]["pid"]
        doc["models"]["a"]["load"] = "on_demand"
        write_config(srv.config_path, doc)
        assert await srv.daemon.reload()
        # The same process keeps serving until idle_ttl_s, then the model is cold.
        assert sv.supervisor.status()[0]["pid"] == pid
        assert (await chat(session, srv.url, "a"))[0] == 200
        await wait_for(lambda: sv.supervisor.status()[0]["state"] == "cold", timeout_s=10)
        doc["models"]["a"]["load"] = "always"
        write_config(srv.config_path, doc)
        assert await srv.daemon.reload()
        await wait_for(lambda: sv.loader.state("a") == "ready", timeout_s=10)
        assert sv.supervisor.status()[0]["pid"] not in (None, pid)
        await asyncio.sleep(1.0)  # longer than the old idle_ttl_s: always stays up
        assert sv.loader.state("a") == "ready"
        assert (await chat(session, srv.url, "a"))[0] == 200


async def test_reload_adds_always_model_by_evicting(tmp_path: Path, start: Start,
                                                    session: aiohttp.ClientSession) -> None:  # fmt: skip
    doc = doc_for(tmp_path, {"a": model(tmp_path, "a", preload=True, idle_ttl_s=60)})
    async with start(doc) as srv:
        sv = srv.services
        watch = Watch(srv)
        await wait_for(lambda: sv.loader.state("a") == "ready", timeout_s=10)  # preload: no request needed
        doc["models"]["b"] = model(tmp_path, "b", load="always")
        write_config(srv.config_path, doc)
        assert await srv.daemon.reload()
        # b must run; a is idle and on demand: it makes room.
        await wait_for(lambda: sv.loader.state("b") == "ready", timeout_s=15)
        assert sv.loader.state("a") == "cold"
        assert watch.max_alive == 1
        assert (await chat(session, srv.url, "b"))[0] == 200
        _, text = await get(session, srv.url, "/metrics")
        assert metric(text, "llmd_model_events_total", model="a", event="start", reason="preload") == 1
        assert metric(text, "llmd_model_events_total", model="a", event="stop", reason="evicted") == 1
        assert metric(text, "llmd_model_events_total", model="b", event="start", reason="always") == 1
        # a cannot start now: b is load: always and holds the memory.
        st, body = await chat(session, srv.url, "a")
        assert st == 503 and "b/0 (1.00 GiB, load: always)" in body["error"]["message"]


async def test_reload_changing_a_model_under_a_budget(tmp_path: Path, start: Start,
                                                      session: aiohttp.ClientSession) -> None:  # fmt: skip
    """A changed replica stops before its replacement starts: both at once could exceed the budget."""
    doc = doc_for(tmp_path, {"a": model(tmp_path, "a")})
    async with start(doc) as srv:
        sv = srv.services
        assert (await chat(session, srv.url, "a"))[0] == 200
        watch = Watch(srv)
        doc["models"]["a"]["args"] = ["-np", "3", "--load-delay-s", "0.3"]
        write_config(srv.config_path, doc)
        assert await srv.daemon.reload()
        await wait_for(lambda: [r["slots"] for r in sv.supervisor.status() if r["pid"]] == [3], timeout_s=15)
        assert watch.max_alive == 1
        assert (await chat(session, srv.url, "a"))[0] == 200


def test_hostile_budget_and_garbage_gguf_are_config_errors(tmp_path: Path) -> None:
    """A budget of hundreds of digits and a corrupt GGUF are listed config errors, not crashes."""
    bad = tmp_path / "b.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 20) + b"general.architecture"
                    + struct.pack("<I", 9) + struct.pack("<IQ", 4, 1 << 63))  # fmt: skip
    doc = doc_for(tmp_path, {"b": {**model(tmp_path, "b"), "memory": None}}, budget="9" * 400 + "GiB")
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "c.yaml", doc))
    text = str(e.value)
    assert "server.memory_budget.ram: size is too large" in text
    doc = doc_for(tmp_path, {"b": {**model(tmp_path, "b"), "memory": None}})
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "c2.yaml", doc))
    assert "models.b.memory: cannot read" in str(e.value)


async def test_failed_cold_start_answers_503_soon_and_the_next_request_retries(
    tmp_path: Path, start: Start, session: aiohttp.ClientSession
) -> None:
    """A cold model whose process exits while starting: the queued request gets a 503 naming
    the failed start once the replica backs off (not after queue_timeout_s + start_timeout_s,
    here 600 s), and a later request waits for the next attempt rather than being refused."""
    doc = doc_for(tmp_path, {"a": model(tmp_path, "a", "--exit-after-s", "0.05", "--load-delay-s", "5")},
                  routing={"queue_timeout_s": 300})  # fmt: skip
    doc["launchers"]["llama-server"]["start_timeout_s"] = 300
    async with start(doc) as srv:
        for _ in range(2):
            status, body = await asyncio.wait_for(chat(session, srv.url, "a"), 60)
            assert status == 503, body
            assert "Model 'a' failed to start: replica a/0 exited" in body["error"]["message"]
        await settled(srv)
        assert rows(tmp_path) == [("a", 503), ("a", 503)]
        assert srv.services.pools["a"].admission.depth == 0
        # `llmd load` waits until the model serves: a failed start ends that wait too.
        status, body = await asyncio.wait_for(post_json(session, srv.url + "/admin/models/a/load"), 60)
        assert status == 200 and body["state"] == "unready"


async def test_sigterm_answers_requests_waiting_for_a_cold_start(tmp_path: Path) -> None:
    """SIGTERM while a request waits for a cold start: it gets a 503 (row rejected_queue), not a
    dropped connection at the drain deadline recorded as the client's abort."""
    doc = doc_for(tmp_path, {"a": model(tmp_path, "a", "--load-delay-s", "60")})
    doc["server"]["drain_seconds"] = 5
    async with llmd_process(write_config(tmp_path / "c.yaml", doc)) as p, aiohttp.ClientSession() as s:
        waiting = asyncio.create_task(chat(s, p.url, "a"))
        await wait_for(lambda: any("starting replica 0" in line for line in p.lines))
        p.proc.send_signal(signal.SIGTERM)
        status, body = await asyncio.wait_for(waiting, 60)
        assert status == 503 and "llmd is stopping" in body["error"]["message"]
        assert await asyncio.wait_for(p.proc.wait(), 60) == 0
    assert rows(tmp_path) == [("a", 503)]
    con = sqlite3.connect(tmp_path / "usage.sqlite3")
    try:
        assert list(con.execute("select outcome from requests")) == [("rejected_queue",)]
    finally:
        con.close()
