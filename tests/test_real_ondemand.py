"""Models on demand with the real llama-server: the same Gemma 3 270M GGUF under two model
names, both ``load: on_demand``, under a ``server.memory_budget`` that fits one of them (1.5x
llmd's own estimate of one replica). One `llmd serve` for the module; the tests run in order:

1. a cold model's first request is answered after the start (one slow answer, no error), the
   second one warm; the latencies are printed;
2. after ``idle_ttl_s`` the model is stopped: cold in /readyz and /admin/status, still listed;
3. requests for both models arrive mixed: the two swap in and out, none fails, never both
   processes alive, every request has its ledger row; a timeline is printed;
4. SIGHUP turns a model ``always`` (it starts with no request and stays) and back.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from llmd.budget import fmt, replica_bytes
from llmd.config import ModelConfig
from tests.conftest import base_config, write_config
from tests.fakeproc import free_port
from tests.realllmd import LLAMA, MODEL, RealLlmd, call, real_llmd

pytestmark = pytest.mark.real

ARGS = ["-c", "512", "-np", "2", "-t", "1"]
TTL_S = 4.0


def model_doc(load: str = "on_demand") -> dict[str, Any]:
    return {"backend": "llama-server", "model": str(MODEL), "args": ARGS, "load": load, "idle_ttl_s": TTL_S}


def estimate() -> int:
    return replica_bytes(ModelConfig(backend="llama-server", model=str(MODEL), args=ARGS))


def config_doc(tmp: Path, a_load: str = "on_demand") -> dict[str, Any]:
    return base_config(
        tmp,
        {"gemma-a": model_doc(a_load), "gemma-b": model_doc()},
        server={"port": PORT, "memory_budget": {"ram": int(estimate() * 1.5)}, "log_format": "text"},
        routing={"queue_timeout_s": 120, "timeouts": {"connect_s": 5, "first_byte_s": 120, "total_s": 300}},
        launchers={"llama-server": {"command": str(LLAMA), "start_timeout_s": 120, "health_interval_s": 0.5}},
    )


PORT = free_port()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealLlmd]:
    tmp = tmp_path_factory.mktemp("ondemand")
    with real_llmd(tmp, config_doc(tmp)) as s:
        s.tmp = tmp  # type: ignore[attr-defined]
        yield s


def chat(srv: RealLlmd, model: str, text: str = "Say hi.") -> tuple[int, float, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
    t0 = time.monotonic()
    status, _, raw = call(srv.url + "/v1/chat/completions", body, timeout=300)
    return status, time.monotonic() - t0, json.loads(raw)


def status(srv: RealLlmd) -> dict[str, Any]:
    return dict(json.loads(call(srv.url + "/admin/status", None)[2]))


def alive(srv: RealLlmd) -> dict[str, int]:
    return {r["model"]: r["pid"] for r in status(srv)["replicas"] if r["pid"] is not None}


def wait_until(cond: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.1)


def test_cold_first_request_then_warm(srv: RealLlmd) -> None:
    st, _, body = call(srv.url + "/readyz", None)
    ready = json.loads(body)
    assert st == 200 and {m["state"] for m in ready["models"].values()} == {"cold"}
    assert alive(srv) == {}
    n = srv.settled_count()
    st, cold_s, answer = chat(srv, "gemma-a")
    assert st == 200 and answer["choices"][0]["message"]["content"], answer
    st, warm_s, _ = chat(srv, "gemma-a")
    assert st == 200
    print(f"\nfirst request (cold start) {cold_s:.2f}s, second (warm) {warm_s:.2f}s, estimate {fmt(estimate())}")
    rows = [srv.row_after(n), srv.row_after(n + 1)]
    assert [(r["model"], r["status"]) for r in rows] == [("gemma-a", 200)] * 2
    assert rows[0]["completion_tokens"] == answer["usage"]["completion_tokens"]


def test_stops_after_idle_ttl(srv: RealLlmd) -> None:
    wait_until(lambda: alive(srv) == {}, timeout_s=TTL_S + 30)
    st, _, body = call(srv.url + "/readyz", None)
    assert st == 200 and json.loads(body)["models"]["gemma-a"]["state"] == "cold"
    models = json.loads(call(srv.url + "/v1/models", None)[2])
    assert {m["id"] for m in models["data"]} == {"gemma-a", "gemma-b"}
    assert status(srv)["models"]["gemma-a"]["state"] == "cold"


def test_swap_under_mixed_load(srv: RealLlmd) -> None:
    # One swap alone first: gemma-a warm and idle, then a request for gemma-b.
    assert chat(srv, "gemma-a")[0] == 200
    st, swap_s, _ = chat(srv, "gemma-b")
    assert st == 200 and set(alive(srv)) == {"gemma-b"}
    print(f"\nswap (stop gemma-a, start gemma-b, answer) {swap_s:.2f}s")
    n = srv.settled_count()
    t0 = time.monotonic()
    timeline: list[str] = []
    most_alive, most_held = 0, 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal most_alive, most_held
        seen: dict[str, int] = {}
        while not stop.is_set():
            st = status(srv)
            now = {r["model"]: r["pid"] for r in st["replicas"] if r["pid"] is not None}
            most_alive = max(most_alive, len(now))
            most_held = max(most_held, st["memory_budget"]["ram"]["held"])
            if now != seen:
                timeline.append(f"{time.monotonic() - t0:6.2f}s  running: {', '.join(sorted(now)) or '-'}")
                seen = now
            time.sleep(0.05)

    def one(i: int) -> tuple[int, str]:
        model = "gemma-a" if i % 2 == 0 else "gemma-b"
        time.sleep(i * 0.3)  # arrivals spread over a few seconds, the two models interleaved
        start = time.monotonic() - t0
        st, took, _ = chat(srv, model, f"Count to {i}.")
        timeline.append(f"{start:6.2f}s  {model} request {i:2d} -> {st} in {took:.2f}s")
        return st, model

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(6) as ex:
            results = list(ex.map(one, range(12)))
    finally:
        stop.set()
        sampler.join()
    print("\ntimeline (budget fits one model):\n" + "\n".join(sorted(timeline)))
    assert [st for st, _ in results] == [200] * 12
    assert most_alive == 1
    assert most_held <= status(srv)["memory_budget"]["ram"]["budget"]
    rows = [srv.row_after(n + i) for i in range(12)]
    assert sorted((r["model"], r["status"]) for r in rows) == sorted((m, 200) for _, m in results)
    events = {k: v for k, v in _metrics(srv).items() if k.startswith("llmd_model_events_total")}
    assert any('reason="evicted"' in k for k in events), events


def _metrics(srv: RealLlmd) -> dict[str, float]:
    out = {}
    for line in call(srv.url + "/metrics", None)[2].decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def test_sighup_always_and_back(srv: RealLlmd) -> None:
    tmp: Path = srv.tmp  # type: ignore[attr-defined]
    # Let both go cold first, so that `always` has room.
    wait_until(lambda: alive(srv) == {}, timeout_s=TTL_S + 60)
    write_config(tmp / "config.yaml", config_doc(tmp, a_load="always"))
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: status(srv)["models"]["gemma-a"]["state"] == "ready", timeout_s=120)
    pid = alive(srv)["gemma-a"]
    time.sleep(TTL_S + 1)  # an always model does not idle out
    assert alive(srv) == {"gemma-a": pid}
    assert chat(srv, "gemma-a")[0] == 200
    write_config(tmp / "config.yaml", config_doc(tmp))
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: status(srv)["models"]["gemma-a"]["load"] == "on_demand", timeout_s=30)
    assert alive(srv) == {"gemma-a": pid}  # the same process, until idle
    wait_until(lambda: alive(srv) == {}, timeout_s=TTL_S + 30)
    # gemma-b starts now that the memory is free again.
    assert chat(srv, "gemma-b")[0] == 200
