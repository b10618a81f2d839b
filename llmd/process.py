"""ManagedProcess: one supervised replica's child process, as a small state machine.

One asyncio task (``_run``) owns the child and makes every state transition, each at one
place commented ``FROM -> TO``::

    STOPPED -> STARTING -> READY -> UNHEALTHY -> BACKOFF -> STARTING ...
                  \\-> BACKOFF (exited or timed out while starting)
    any -> STOPPING -> STOPPED (stop())

The child runs in its own process group (stopping signals the whole group, so helpers a
backend forks go too), on a free loopback port, pinned to its CPU set, and with
PR_SET_PDEATHSIG (SIGKILL; SIGTERM for vLLM) so that it dies with llmd even when llmd is SIGKILLed.
Its stdout/stderr lines go to the ``llmd.replica`` logger tagged with the replica name, each
at the level the child wrote it (childlog.py): routine per-request lines at DEBUG when quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import subprocess
from collections import deque
from collections.abc import Callable

import aiohttp
import msgspec

from llmd.childlog import ChildLog
from llmd.launchers import LaunchSpec
from llmd.probe import probe, read_slots, scrape_metrics
from llmd.replica import Replica, ReplicaState
from llmd.spawn import child_setup, death_signal, describe_exit, free_port

log = logging.getLogger("llmd.process")


class ProcOutcome(enum.Enum):
    """How one phase of a child's life ended; the owner task decides the next state from it."""

    READY = "ready"  # healthy: serve it
    FAILED = "failed"  # could not start, or never became healthy: BACKOFF
    STOP = "stop"  # llmd asked it to stop
    EXITED = "exited"  # died while starting (maybe its port was taken: try another)
    TIMEOUT = "timeout"  # not healthy within start_timeout_s
    CRASHED = "crashed"  # died while serving
    UNHEALTHY = "unhealthy"  # alive but failing health checks


child_log = logging.getLogger("llmd.replica")

MAX_LOG_LINE = 4096  # longer lines are split: a runaway child must not build huge records
START_POLL_S = 0.1  # health poll while loading: READY promptly after llama-server's 503s
BIND_ATTEMPTS = 3  # a port picked free may be taken before the child binds it
REAP_TIMEOUT_S = 10.0  # after SIGKILL; only a process stuck in the kernel takes longer
_BIND_ERRORS = ("address already in use", "couldn't bind", "could not bind")


class ManagedProcess:
    """Runs one replica's child: spawn, health, restart with backoff, stop.

    ``replica`` is updated in place (state, pid, port, url, slots, restarts,
    backend_metrics) and ``on_change(replica)`` is called after every state change and
    when a passing health check clears relay failures (the replica is routable again).
    A ManagedProcess is used once: after ``stop()``, ``start()`` does nothing.
    """

    def __init__(
        self,
        replica: Replica,
        spec: LaunchSpec,
        session: aiohttp.ClientSession,
        on_change: Callable[[Replica], None] | None = None,
    ) -> None:
        self.replica = replica
        self.spec = spec
        self._session = session
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._stop_deadline = float("inf")  # loop.time() by which the child must be gone
        self._proc: asyncio.subprocess.Process | None = None
        self._exit: asyncio.Task[int] | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._tail: deque[str] = deque(maxlen=20)  # last output lines, for failure messages
        self._failures = 0  # consecutive failed starts/crashes: the backoff exponent
        replica.cpus = list(spec.cpus) if spec.cpus is not None else None
        replica.gpus = list(spec.gpus) if spec.gpus is not None else None

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    @property
    def running(self) -> bool:
        """Started and not asked to stop: the child runs, starts or restarts."""
        return self._task is not None and not self._task.done() and not self.stopping

    def start(self) -> None:
        """Begin supervising (returns at once; the replica becomes READY later)."""
        if self._task is None and not self.stopping:
            self._task = asyncio.create_task(self._run(), name=f"replica {self.replica.name}")

    def update(self, spec: LaunchSpec) -> None:
        """Take new timeouts/health settings for a spec with the same identity (reload)."""
        self.spec = msgspec.structs.replace(spec, port=self.spec.port)

    async def stop(self, deadline: float | None = None) -> None:
        """Stop the child: SIGTERM its group, SIGKILL at ``deadline`` (loop.time()), reap.

        Safe to call again (a second, earlier deadline shortens the wait) and from many
        callers; returns when the child is reaped.
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.spec.stop_timeout_s
        self._stop_deadline = min(self._stop_deadline, deadline)
        self._stop_requested.set()
        if self._task is not None:
            # Shielded: a caller that gives up waiting must not cancel the reaping.
            await asyncio.shield(self._task)

    # --- the owner task ------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop_waiter = asyncio.ensure_future(self._stop_requested.wait())
        try:
            while not self.stopping:
                outcome = await self._start(stop_waiter)
                if outcome is ProcOutcome.READY:
                    ready_at = loop.time()
                    outcome = await self._watch(stop_waiter)
                    # Stable for as long as the longest backoff: the failure streak is over.
                    if loop.time() - ready_at >= self.spec.restart_max_delay_s:
                        self._failures = 0
                    if outcome in (ProcOutcome.CRASHED, ProcOutcome.UNHEALTHY):
                        # READY -> UNHEALTHY
                        self._set_state(ReplicaState.UNHEALTHY)
                        # A crashed child's group is only swept; a hung one gets SIGTERM first.
                        grace = self.spec.stop_timeout_s if outcome is ProcOutcome.UNHEALTHY else 0.0
                        await self._terminate(loop.time() + grace)
                if outcome is ProcOutcome.STOP:
                    break
                delay = min(self.spec.restart_delay_s * 2**self._failures, self.spec.restart_max_delay_s)
                self._failures += 1
                # STARTING/UNHEALTHY -> BACKOFF
                self._set_state(ReplicaState.BACKOFF)
                log.warning("%s: restarting in %.1fs", self.replica.name, delay, extra={"replica": self.replica.name})
                await asyncio.wait([stop_waiter], timeout=delay)
                if not self.stopping:
                    self.replica.restarts += 1
        except Exception:
            log.exception(
                "%s: supervision failed; stopping the replica", self.replica.name, extra={"replica": self.replica.name}
            )
        finally:
            stop_waiter.cancel()
            # any -> STOPPING
            if self._proc is not None:
                self._set_state(ReplicaState.STOPPING)
                limit = asyncio.get_running_loop().time() + self.spec.stop_timeout_s
                await self._terminate(min(self._stop_deadline, limit))
            # STOPPING -> STOPPED
            self._set_state(ReplicaState.STOPPED)

    async def _start(self, stop_waiter: asyncio.Future[object]) -> ProcOutcome:
        """Spawn and wait for health: READY, FAILED (child gone: go to BACKOFF) or STOP."""
        outcome = ProcOutcome.FAILED
        for attempt in range(1, BIND_ATTEMPTS + 1):
            spec = msgspec.structs.replace(self.spec, port=free_port())
            try:
                await self._spawn(spec)
            except (OSError, subprocess.SubprocessError) as e:
                log.error(
                    "%s: cannot start %s: %s",
                    self.replica.name,
                    spec.command[0],
                    e,
                    extra={"replica": self.replica.name},
                )
                return ProcOutcome.FAILED
            # STOPPED/BACKOFF -> STARTING
            self._set_state(ReplicaState.STARTING)
            outcome = await self._wait_healthy(spec, stop_waiter)
            if outcome is not ProcOutcome.EXITED:
                break
            await self._terminate(asyncio.get_running_loop().time())
            tail = "\n".join(self._tail)
            if attempt < BIND_ATTEMPTS and any(e in tail.lower() for e in _BIND_ERRORS):
                log.warning(
                    "%s: port %d was taken before it bound it; trying another port",
                    self.replica.name,
                    spec.port,
                    extra={"replica": self.replica.name},
                )
                continue
            log.error(
                "%s: %s while starting; last output:\n%s",
                self.replica.name,
                describe_exit(self._exit.result() if self._exit else None),
                tail,
                extra={"replica": self.replica.name},
            )
            return ProcOutcome.FAILED
        if outcome is ProcOutcome.TIMEOUT:
            log.error(
                "%s: not healthy within start_timeout_s=%gs; stopping it",
                self.replica.name,
                spec.start_timeout_s,
                extra={"replica": self.replica.name},
            )
            await self._terminate(asyncio.get_running_loop().time() + spec.stop_timeout_s)
            return ProcOutcome.FAILED
        if outcome is ProcOutcome.STOP:
            return ProcOutcome.STOP
        self.replica.slots = await read_slots(self._session, spec, self.replica.name)
        self.replica.failures = 0
        self.replica.ejected_until = 0.0
        # STARTING -> READY
        self._set_state(ReplicaState.READY)
        return ProcOutcome.READY

    async def _spawn(self, spec: LaunchSpec) -> None:
        self._tail.clear()
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=spec.env,
            start_new_session=True,  # own process group: stop signals reach its helpers too
            preexec_fn=child_setup(os.getpid(), spec.cpus, death_signal(spec.backend)),
        )
        # Only the port: update() may have brought new settings while this spawned.
        self.spec = msgspec.structs.replace(self.spec, port=spec.port)
        self._proc = proc
        self._exit = asyncio.ensure_future(proc.wait())
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._relay(proc.stdout, "stdout")),
            asyncio.ensure_future(self._relay(proc.stderr, "stderr")),
        ]
        r = self.replica
        r.pid, r.port, r.url = proc.pid, spec.port, f"{spec.origin}/v1"
        r.backend_metrics = {}
        log.info(
            "%s: started pid %d on port %d: %s",
            r.name,
            proc.pid,
            spec.port,
            " ".join(spec.argv),
            extra={"replica": r.name},
        )

    async def _wait_healthy(self, spec: LaunchSpec, stop_waiter: asyncio.Future[object]) -> ProcOutcome:
        """Poll health until 200: 'ready', 'exited', 'timeout' or 'stop'."""
        assert self._exit is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.start_timeout_s
        while True:
            if self.stopping:
                return ProcOutcome.STOP
            if self._exit.done():
                return ProcOutcome.EXITED
            # 503 (llama-server: "Loading model") and refused connections mean: not yet.
            if await probe(self._session, spec, timeout_s=1.0) == 200:
                return ProcOutcome.READY
            remaining = deadline - loop.time()
            if remaining <= 0:
                return ProcOutcome.TIMEOUT
            await asyncio.wait(
                [self._exit, stop_waiter], timeout=min(START_POLL_S, remaining), return_when=asyncio.FIRST_COMPLETED
            )

    async def _watch(self, stop_waiter: asyncio.Future[object]) -> ProcOutcome:
        """While READY: health and metrics every health_interval_s, until 'crashed' (the child
        exited), 'unhealthy' (health_failures checks in a row failed) or 'stop'."""
        assert self._exit is not None
        failed_checks = 0
        while True:
            spec = self.spec  # update() may change the interval while it runs
            await asyncio.wait(
                [self._exit, stop_waiter], timeout=spec.health_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
            if self.stopping:
                return ProcOutcome.STOP
            if self._exit.done():
                log.error(
                    "%s: %s; last output:\n%s",
                    self.replica.name,
                    describe_exit(self._exit.result()),
                    "\n".join(self._tail),
                    extra={"replica": self.replica.name},
                )
                return ProcOutcome.CRASHED
            status = await probe(self._session, spec, timeout_s=max(1.0, min(5.0, spec.health_interval_s)))
            if status == 200:
                failed_checks = 0
                if self.replica.failures or self.replica.ejected_until:
                    # Relay failures ejected it; the backend says it is fine: route to it again.
                    self.replica.failures = 0
                    self.replica.ejected_until = 0.0
                    self._notify()
                metrics = await scrape_metrics(self._session, spec, self.replica.name)
                if metrics is not None:
                    self.replica.backend_metrics = metrics
                continue
            failed_checks += 1
            log.warning(
                "%s: health check failed (%s), %d of %d",
                self.replica.name,
                status if status is not None else "no answer",
                failed_checks,
                spec.health_failures,
                extra={"replica": self.replica.name},
            )
            if failed_checks >= spec.health_failures:
                return ProcOutcome.UNHEALTHY

    # --- the child -----------------------------------------------------------------------------

    async def _relay(self, stream: asyncio.StreamReader, name: str) -> None:
        """Relay a child's output into the log line by line (long lines are split)."""
        extra = {"replica": self.replica.name, "stream": name}
        levels = ChildLog(self.spec.backend)
        buf = b""
        while chunk := await stream.read(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            while len(buf) > MAX_LOG_LINE:
                lines.append(buf[:MAX_LOG_LINE])
                buf = buf[MAX_LOG_LINE:]
            for raw in lines:
                self._log_line(raw, extra, levels)
        if buf:
            self._log_line(buf, extra, levels)

    def _log_line(self, raw: bytes, extra: dict[str, str], levels: ChildLog) -> None:
        for i in range(0, len(raw), MAX_LOG_LINE):
            line = raw[i : i + MAX_LOG_LINE].decode("utf-8", "replace").rstrip()
            if line.strip():
                self._tail.append(line)
                # The spec is read per line: a reload changes child_log without a restart.
                level = levels.level(line, self.spec.child_log)
                if child_log.isEnabledFor(level):
                    child_log.log(level, line, extra=extra)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        # start_new_session made the child a group leader: its pgid is its pid. After the
        # leader is gone this sweeps whatever it left in the group (vLLM's workers).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def _terminate(self, deadline: float) -> None:
        """SIGTERM the group, wait until ``deadline`` (or an earlier stop deadline), SIGKILL
        the group, reap, and finish relaying its output."""
        proc, exit_task = self._proc, self._exit
        if proc is None or exit_task is None:
            return
        loop = asyncio.get_running_loop()
        if not exit_task.done():
            self._signal_group(signal.SIGTERM)
            # Re-read the deadline while waiting: stop() may shorten it.
            while not exit_task.done():
                remaining = min(deadline, self._stop_deadline) - loop.time()
                if remaining <= 0:
                    log.warning(
                        "%s: pid %d still running after SIGTERM; sending SIGKILL",
                        self.replica.name,
                        proc.pid,
                        extra={"replica": self.replica.name},
                    )
                    break
                await asyncio.wait([exit_task], timeout=min(remaining, 0.5))
        self._signal_group(signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(exit_task), REAP_TIMEOUT_S)
        except TimeoutError:
            log.error(
                "%s: pid %d did not exit %gs after SIGKILL",
                self.replica.name,
                proc.pid,
                REAP_TIMEOUT_S,
                extra={"replica": self.replica.name},
            )
        # The pipes close when the group is gone; give the relays a moment to log the rest.
        _, pending = await asyncio.wait(self._readers, timeout=1.0)
        for t in pending:
            t.cancel()
        log.info(
            "%s: pid %d %s",
            self.replica.name,
            proc.pid,
            describe_exit(proc.returncode),
            extra={"replica": self.replica.name},
        )
        self._proc = None
        self.replica.pid = None
        self.replica.backend_metrics = {}

    # --- listeners -----------------------------------------------------------------------------

    def _set_state(self, state: ReplicaState) -> None:
        old = self.replica.state
        if old is state:
            return
        self.replica.state = state
        log.info("%s: %s -> %s", self.replica.name, old.name, state.name, extra={"replica": self.replica.name})
        self._notify()

    def _notify(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(self.replica)
        except Exception:
            # A listener's bug must not stop supervision.
            log.exception("%s: on_change listener failed", self.replica.name, extra={"replica": self.replica.name})
