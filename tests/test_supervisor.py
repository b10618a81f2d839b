"""Supervisor and ManagedProcess against real child processes: the fake llama-server.

Every test runs on uvloop, as llmd does (``on_uvloop`` runs the test's coroutine in
``uvloop.run``), with short timeouts so that the whole file takes seconds; ports are always
picked free, so the tests run in parallel under xdist.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path

import aiohttp
import msgspec
import pytest
import uvloop

import llmd.process
from llmd.config import Config, LauncherConfig, LaunchersConfig, ModelConfig, ServerConfig
from llmd.replica import Replica, ReplicaState
from llmd.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
FAKE = str(Path(__file__).resolve().with_name("fake_backend.py"))
FAKE_VLLM = str(Path(__file__).resolve().with_name("fake_vllm.py"))
S = ReplicaState


def on_uvloop(test: Callable[..., Coroutine[object, object, None]]) -> Callable[..., None]:
    """Run an async test on a fresh uvloop (pytest fixtures still arrive as arguments)."""

    @functools.wraps(test)
    def run(*args: object, **kwargs: object) -> None:
        uvloop.run(test(*args, **kwargs))

    return run


def launcher(**kw: object) -> LauncherConfig:
    settings: dict[str, object] = {
        "command": [sys.executable, FAKE], "start_timeout_s": 15.0, "stop_timeout_s": 2.0,
        "health_interval_s": 0.2, "health_failures": 2, "restart_delay_s": 0.2, "restart_max_delay_s": 2.0,
    }
    settings.update(kw)
    return LauncherConfig(**settings)  # type: ignore[arg-type]


def fake(*args: str, load_delay_s: float = 0.2, **kw: object) -> ModelConfig:
    return ModelConfig(
        backend="llama-server", model="/models/fake.gguf",
        args=["--load-delay-s", str(load_delay_s), *args], **kw,  # type: ignore[arg-type]
    )


def config(models: dict[str, ModelConfig], drain_seconds: float = 30.0, **launcher_kw: object) -> Config:
    return Config(
        models=models,
        server=ServerConfig(drain_seconds=drain_seconds),
        launchers=LaunchersConfig(llama_server=launcher(**launcher_kw)),
    )


class Recorder:
    """An on_change listener: every (replica, state) it was told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Replica, ReplicaState]] = []

    def __call__(self, replica: Replica) -> None:
        self.events.append((replica, replica.state))

    def states(self, replica: Replica) -> list[ReplicaState]:
        return [s for r, s in self.events if r is replica]


@contextlib.asynccontextmanager
async def running(
    cfg: Config, on_change: Callable[[Replica], None] | None = None, start: bool = True
) -> AsyncIterator[tuple[Supervisor, aiohttp.ClientSession]]:
    """A Supervisor (started unless told not to) that is always stopped at the end."""
    async with aiohttp.ClientSession() as session:
        sup = Supervisor(cfg, session, on_change)
        try:
            if start:
                await sup.start()
            yield sup, session
        finally:
            await sup.stop(asyncio.get_running_loop().time() + 5)


async def until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.02)
    return True


def proc_state(pid: int) -> str | None:
    """The process's state letter (R, S, Z...), None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def dead(pid: int) -> bool:
    return proc_state(pid) in (None, "Z", "X")


def live_children() -> set[int]:
    """Pids of this process's living children (session-scoped servers of other tests, e.g.
    PostgreSQL and redis-server, are among them: compare against a baseline)."""
    me, out = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] not in ("Z", "X"):
            out.add(int(entry.name))
    return out


async def stats(session: aiohttp.ClientSession, replica: Replica) -> dict[str, object]:
    async with session.get(replica.origin() + "/fake/stats") as r:
        return await r.json()  # type: ignore[no-any-return]


# --- starting ----------------------------------------------------------------------------------


@on_uvloop
async def test_runs_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


@on_uvloop
async def test_starting_then_ready_with_slots_from_props(monkeypatch: pytest.MonkeyPatch) -> None:
    """1. Start one fake that loads for 1 s with -np 3.
    2. While STARTING its /health answers 503 (loading); llmd waits.
    3. It becomes READY with slots 3 (from /props), a loopback url, and its argv/env as built.
    4. Its /metrics are scraped into backend_metrics."""
    monkeypatch.setenv("LLMD_KEY_CI", "a-secret")  # must not reach the child
    rec = Recorder()
    async with running(config({"m": fake("-np", "3", load_delay_s=1.0)}), rec, start=False) as (sup, session):
        [replica] = sup.replicas("m")
        assert replica.state is S.STOPPED and replica.name == "m/0"
        await sup.start()
        assert await until(lambda: replica.state is S.STARTING, 5)
        assert replica.pid and replica.port and replica.url == f"http://127.0.0.1:{replica.port}/v1"
        health: list[int] = []

        async def loading() -> None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(replica.origin() + "/health") as r:
                    health.append(r.status)

        while not health:  # refused until the child listens
            await loading()
            await asyncio.sleep(0.02)
        assert health == [503] and replica.state is S.STARTING
        assert await sup.wait_ready(10)
        assert rec.states(replica) == [S.STARTING, S.READY]
        assert replica.slots == 3
        info = await stats(session, replica)
        argv = info["argv"]
        assert isinstance(argv, list)
        assert argv[argv.index("--port") + 1] == str(replica.port)
        assert argv[argv.index("--alias") + 1] == "m" and "--metrics" in argv
        assert "LLMD_KEY_CI" not in info["env"]  # type: ignore[operator]
        assert await until(lambda: replica.backend_metrics == {"running": 0.0, "waiting": 0.0}, 5)
        assert sup.status()[0]["state"] == "ready" and sup.status()[0]["pid"] == replica.pid


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")
@on_uvloop
async def test_replicas_are_pinned_to_their_cpu_sets_with_matching_threads() -> None:
    async with running(config({"m": fake(replicas=2, cpus=[[0], [1]])})) as (sup, session):
        assert await sup.wait_ready(10)
        r0, r1 = sup.replicas("m")
        assert r0.pid is not None and r1.pid is not None
        assert os.sched_getaffinity(r0.pid) == {0}
        assert os.sched_getaffinity(r1.pid) == {1}
        assert r0.cpus == [0] and r1.cpus == [1]
        for r in (r0, r1):
            argv = (await stats(session, r))["argv"]
            assert isinstance(argv, list) and argv[argv.index("-t") + 1] == "1"


@on_uvloop
async def test_child_output_is_relayed_into_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llmd.replica")

    def relayed() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "llmd.replica" and "main: model loaded" in r.getMessage()]

    async with running(config({"m": fake()})) as (sup, _):
        assert await sup.wait_ready(10)
        assert await until(lambda: bool(relayed()), 5)
    record = relayed()[0]
    assert record.replica == "m/0"  # type: ignore[attr-defined]
    assert record.stream == "stderr"  # type: ignore[attr-defined]


@on_uvloop
async def test_vllm_replica_slots_and_gpus_from_the_spec() -> None:
    """1. A fake vLLM (refuses connections while loading) with --max-num-seqs 5 on GPUs 0,1.
    2. READY with slots 5, CUDA_VISIBLE_DEVICES=0,1, --tensor-parallel-size 2, and vLLM's
       load metrics scraped."""
    model = ModelConfig(backend="vllm", model="/models/fake-hf", gpus=[[0, 1]],
                        args=["--max-num-seqs", "5", "--load-delay-s", "0.3"])
    cfg = Config(models={"v": model}, launchers=LaunchersConfig(vllm=launcher(command=[sys.executable, FAKE_VLLM])))
    async with running(cfg) as (sup, session):
        assert await sup.wait_ready(10)
        [replica] = sup.replicas("v")
        assert replica.slots == 5 and replica.gpus == [0, 1]
        info = await stats(session, replica)
        assert info["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"  # type: ignore[index]
        argv = info["argv"]
        assert isinstance(argv, list) and argv[argv.index("--tensor-parallel-size") + 1] == "2"
        assert argv[argv.index("--served-model-name") + 1] == "v"
        assert await until(lambda: set(replica.backend_metrics) == {"running", "waiting", "kv_cache_usage"}, 5)


@on_uvloop
async def test_a_port_taken_before_the_child_binds_it_is_retried_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """1. The first port llmd picks is taken (by a listening socket here) when the child binds.
    2. The child dies with "address already in use"; llmd retries with another port at once:
       no BACKOFF, no restart counted."""
    caplog.set_level(logging.INFO)
    rec = Recorder()
    real_free_port = llmd.process.free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        monkeypatch.setattr(llmd.process, "free_port", lambda: next(ports, None) or real_free_port())
        async with running(config({"m": fake()}, restart_delay_s=30), rec) as (sup, _):
            assert await sup.wait_ready(10)
            [replica] = sup.replicas("m")
            assert replica.port != taken.getsockname()[1]
            assert S.BACKOFF not in rec.states(replica) and replica.restarts == 0
    assert any("was taken before it bound it" in r.getMessage() for r in caplog.records)


# --- failures ----------------------------------------------------------------------------------


@on_uvloop
async def test_kill_9_restarts_with_a_new_pid() -> None:
    """1. A READY replica is killed with SIGKILL.
    2. It goes UNHEALTHY -> BACKOFF, then after restart_delay_s (0.2 s) STARTING -> READY.
    3. New pid, restarts == 1, all within delay + load + slack."""
    rec = Recorder()
    async with running(config({"m": fake()}), rec) as (sup, _):
        assert await sup.wait_ready(10)
        [replica] = sup.replicas("m")
        old_pid = replica.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert await until(lambda: replica.state is S.BACKOFF, 3)
        assert await until(lambda: replica.state is S.READY, 5)
        assert time.monotonic() - t0 < 3.0
        assert replica.pid not in (None, old_pid)
        assert replica.restarts == 1
        assert rec.states(replica) == [S.STARTING, S.READY, S.UNHEALTHY, S.BACKOFF, S.STARTING, S.READY]
        assert dead(old_pid)


@on_uvloop
async def test_exit_during_start_goes_to_backoff_without_waiting_for_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1. The fake exits 0.3 s after start, long before it would load (30 s) or time out (20 s).
    2. The replica is in BACKOFF within a second or two; the log says how it exited.
    3. stop() does not wait out the 30 s backoff."""
    caplog.set_level(logging.INFO)
    cfg = config({"m": fake("--exit-after-s", "0.3", load_delay_s=30)}, start_timeout_s=20, restart_delay_s=30)
    async with running(cfg) as (sup, _):
        [replica] = sup.replicas("m")
        t0 = time.monotonic()
        assert await until(lambda: replica.state is S.BACKOFF, 5)
        assert time.monotonic() - t0 < 3.0
        assert replica.pid is None
        assert any("exited with code 1 while starting" in r.getMessage() for r in caplog.records)
        t0 = time.monotonic()
        await sup.stop(asyncio.get_running_loop().time() + 5)
        assert time.monotonic() - t0 < 1.0 and replica.state is S.STOPPED


@on_uvloop
async def test_start_timeout_kills_and_backs_off() -> None:
    """A child whose health never turns 200 (--fail-health) is stopped at start_timeout_s."""
    async with running(config({"m": fake("--fail-health")}, start_timeout_s=0.8, restart_delay_s=30)) as (sup, _):
        [replica] = sup.replicas("m")
        assert await until(lambda: replica.pid is not None, 5)
        pid = replica.pid
        assert pid is not None
        assert await until(lambda: replica.state is S.BACKOFF, 5)
        assert dead(pid) and replica.restarts == 0


@on_uvloop
async def test_failed_health_checks_restart_a_hung_replica() -> None:
    """1. A READY replica is frozen with SIGSTOP: it stops answering /health.
    2. After health_failures (2) failed checks it is UNHEALTHY and killed (SIGTERM cannot
       reach a stopped process, so SIGKILL after stop_timeout_s).
    3. It restarts: READY with a new pid."""
    async with running(config({"m": fake()}, stop_timeout_s=0.5)) as (sup, _):
        assert await sup.wait_ready(10)
        [replica] = sup.replicas("m")
        old_pid = replica.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGSTOP)
        assert await until(lambda: replica.state is S.UNHEALTHY, 10)
        assert await until(lambda: replica.state is S.READY, 10)
        assert replica.pid != old_pid and replica.restarts == 1 and dead(old_pid)


@on_uvloop
async def test_command_not_found_backs_off() -> None:
    async with running(config({"m": fake()}, command="/nonexistent/llama-server", restart_delay_s=30)) as (sup, _):
        [replica] = sup.replicas("m")
        assert await until(lambda: replica.state is S.BACKOFF, 5)


# --- stopping ----------------------------------------------------------------------------------


@on_uvloop
async def test_stop_escalates_to_sigkill_and_reaps() -> None:
    """1. The fake ignores SIGTERM (FAKE_IGNORE_SIGTERM=1); stop_timeout_s is 0.5.
    2. stop() sends SIGTERM, waits 0.5 s, sends SIGKILL, reaps: no zombie is left."""
    async with running(config({"m": fake(env={"FAKE_IGNORE_SIGTERM": "1"})}, stop_timeout_s=0.5)) as (sup, _):
        assert await sup.wait_ready(10)
        [replica] = sup.replicas("m")
        pid = replica.pid
        assert pid is not None
        t0 = time.monotonic()
        await sup.stop(asyncio.get_running_loop().time() + 10)
        elapsed = time.monotonic() - t0
        assert 0.5 <= elapsed < 2.0
        assert proc_state(pid) is None  # gone and reaped, not a zombie
        assert replica.state is S.STOPPED and replica.pid is None


@on_uvloop
async def test_stop_obeys_the_shared_deadline() -> None:
    """Two replicas that ignore SIGTERM, stop_timeout_s 10 s, deadline in 0.5 s: both are
    killed in parallel by the deadline."""
    cfg = config({"m": fake(replicas=2, env={"FAKE_IGNORE_SIGTERM": "1"})}, stop_timeout_s=10)
    async with running(cfg) as (sup, _):
        assert await sup.wait_ready(10)
        pids = [r.pid for r in sup.replicas("m")]
        t0 = time.monotonic()
        await sup.stop(asyncio.get_running_loop().time() + 0.5)
        assert time.monotonic() - t0 < 1.5
        assert all(p is not None and proc_state(p) is None for p in pids)


@on_uvloop
async def test_stop_during_start() -> None:
    async with running(config({"m": fake(load_delay_s=30)})) as (sup, _):
        [replica] = sup.replicas("m")
        assert await until(lambda: replica.state is S.STARTING, 5)
        pid = replica.pid
        assert pid is not None
        await sup.stop(asyncio.get_running_loop().time() + 5)
        assert replica.state is S.STOPPED and proc_state(pid) is None


# --- reload ------------------------------------------------------------------------------------


@on_uvloop
async def test_reconcile_keeps_unchanged_starts_new_drains_removed_replaces_changed() -> None:
    """1. Run keep (2 replicas), change (1), gone (1), remote (an openai url).
    2. Reload with: keep as it was, change with other args, gone removed, new added.
    3. keep: same pids. new: starts. gone: draining while a request is in flight, stopped
       when it finishes. change: the old one serves until the new one is READY, then it is
       replaced in replicas() and the old process stops.
    4. Two reloads in a row (the first one's replacement still starting) back to the first
       config: the end state is the first config's, with no stray process."""
    rec = Recorder()
    before = live_children()  # the worker's other children (servers of session fixtures)
    remote = ModelConfig(backend="openai", urls=["http://10.0.0.5:8000/v1/"])
    first = {"keep": fake(replicas=2), "change": fake(), "gone": fake(), "remote": remote}
    async with running(config(first), rec) as (sup, _):
        assert await sup.wait_ready(10)
        keep_pids = [r.pid for r in sup.replicas("keep")]
        [old_change] = sup.replicas("change")
        [gone] = sup.replicas("gone")
        [remote_replica] = sup.replicas("remote")
        assert remote_replica.state is S.READY and remote_replica.slots == 16
        assert remote_replica.url == "http://10.0.0.5:8000/v1"
        gone_pid, old_change_pid = gone.pid, old_change.pid
        assert gone_pid is not None and old_change_pid is not None
        gone.in_flight = 1  # a request still running on it

        second = {"keep": fake(replicas=2), "change": fake("-np", "2", load_delay_s=0.5), "new": fake(),
                  "remote": remote}
        await sup.reconcile(config(second))
        # It returned without waiting for the replacement: the old one is still the one serving.
        assert [r.pid for r in sup.replicas("keep")] == keep_pids
        assert sup.replicas("remote") == [remote_replica]
        assert sup.replicas("gone") == [] and gone.draining
        # Until the replacement is READY, the old one keeps serving.
        assert sup.replicas("change") == [old_change] and not old_change.draining
        assert await until(lambda: sup.replicas("change") != [old_change], 10)
        [new_change] = sup.replicas("change")
        assert new_change.state is S.READY and new_change.slots == 2
        assert old_change.draining
        assert await until(lambda: dead(old_change_pid), 5)
        assert await until(lambda: all(r.state is S.READY for r in sup.replicas("new")), 10)
        # The removed one waits for its request.
        await asyncio.sleep(0.3)
        assert not dead(gone_pid) and gone.state is S.READY
        gone.in_flight = 0
        assert await until(lambda: dead(gone_pid), 5)
        assert await until(lambda: gone.state is S.STOPPED, 5)
        assert rec.states(gone)[-3:] == [S.READY, S.STOPPING, S.STOPPED]

        await sup.reconcile(config({**second, "change": fake("-np", "3", load_delay_s=2)}))
        await sup.reconcile(config(first))
        assert await sup.wait_ready(10)
        assert [r.pid for r in sup.replicas("keep")] == keep_pids
        assert sup.replicas("new") == [] and sup.replicas("gone")[0].state is S.READY
        assert sup.replicas("change")[0].slots == 4  # the fake's default -np
        expected = {r.pid for name in first for r in sup.replicas(name) if r.pid}
        assert await until(lambda: live_children() - before == expected, 10)


@on_uvloop
async def test_reconcile_with_shared_cpus_stops_the_old_one_first(caplog: pytest.LogCaptureFixture) -> None:
    """1. A replica pinned to CPU 0 is changed (other args), still pinned to CPU 0.
    2. The old one is drained and stopped before the new one is spawned; the log says so."""
    caplog.set_level(logging.INFO, logger="llmd.supervisor")
    rec = Recorder()
    async with running(config({"m": fake(cpus=[[0]])}), rec) as (sup, _):
        assert await sup.wait_ready(10)
        [old] = sup.replicas("m")
        await sup.reconcile(config({"m": fake("-np", "2", cpus=[[0]])}))
        assert await sup.wait_ready(10)
        [new] = sup.replicas("m")
        assert new is not old and new.slots == 2
        order = [(r, s) for r, s in rec.events if (r is old and s is S.STOPPED) or (r is new and s is S.STARTING)]
        assert order == [(old, S.STOPPED), (new, S.STARTING)]
        assert any("shares CPUs/GPUs" in r.getMessage() for r in caplog.records)


@on_uvloop
async def test_reconcile_with_new_timeouts_only_keeps_the_process() -> None:
    async with running(config({"m": fake()})) as (sup, _):
        assert await sup.wait_ready(10)
        [replica] = sup.replicas("m")
        pid = replica.pid
        await sup.reconcile(config({"m": fake()}, health_interval_s=1.0, start_timeout_s=99))
        assert sup.replicas("m") == [replica] and replica.pid == pid


# --- llmd killed -------------------------------------------------------------------------------

PARENT = """
import asyncio, sys
import aiohttp, msgspec, uvloop
from llmd.config import Config
from llmd.supervisor import Supervisor

async def main() -> None:
    cfg = msgspec.json.decode(sys.argv[1].encode(), type=Config)
    async with aiohttp.ClientSession() as session:
        sup = Supervisor(cfg, session)
        await sup.start()
        await sup.wait_ready(20)
        print(sup.replicas("m")[0].pid, flush=True)
        await asyncio.sleep(60)

uvloop.run(main())
"""


def test_children_die_when_llmd_is_killed() -> None:
    """PR_SET_PDEATHSIG:
    1. A parent process (llmd in miniature, on uvloop) supervises one fake replica and
       prints the child's pid once it is READY.
    2. The parent is SIGKILLed: it can run no cleanup.
    3. The child is gone within 2 s."""
    cfg = msgspec.json.encode(config({"m": fake()})).decode()
    parent = subprocess.Popen([sys.executable, "-c", PARENT, cfg], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not dead(child)
        parent.kill()
        parent.wait(5)
        end = time.monotonic() + 2.0
        while not dead(child) and time.monotonic() < end:
            time.sleep(0.02)
        assert dead(child), f"child {child} survived its parent"
    finally:
        parent.kill()
        parent.wait(5)
        if child and not dead(child):
            os.killpg(child, signal.SIGKILL)  # do not leave it running when the test fails
