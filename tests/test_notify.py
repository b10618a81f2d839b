"""llmd.notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmd.notify import NOTIFY_ENV_VARS, Notifier


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    # The test run itself may be under systemd (a CI runner service).
    for name in NOTIFY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def systemd_socket(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket at $NOTIFY_SOCKET, as PID 1 provides it."""
    path = tmp_path / "notify"
    # sun_path holds 108 bytes; pytest's tmp_path is well below that.
    assert len(os.fsencode(path)) < 100, path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.fspath(path))
    sock.settimeout(2)
    clean_env.setenv("NOTIFY_SOCKET", os.fspath(path))
    yield sock
    sock.close()


def recv_fields(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_each_message(systemd_socket: socket.socket) -> None:
    notifier = Notifier.from_env()
    assert notifier.enabled

    assert notifier.ready()
    assert recv_fields(systemd_socket) == ["READY=1"]

    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = recv_fields(systemd_socket)
    assert reloading == "RELOADING=1"
    key, _, value = monotonic.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before_usec <= int(value) <= after_usec

    assert notifier.stopping()
    assert recv_fields(systemd_socket) == ["STOPPING=1"]

    # A newline inside the text must not start a second assignment.
    assert notifier.status("2/3 replicas ready\nqwen: BACKOFF")
    assert recv_fields(systemd_socket) == ["STATUS=2/3 replicas ready qwen: BACKOFF"]

    assert notifier.watchdog()
    assert recv_fields(systemd_socket) == ["WATCHDOG=1"]
    notifier.close()


def test_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"llmd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier.from_env()
        assert notifier.ready()
        assert recv_fields(sock) == ["READY=1"]
        notifier.close()


async def test_watchdog_cadence(systemd_socket: socket.socket, clean_env: pytest.MonkeyPatch) -> None:
    """WatchdogSec=0.2s: a ping every 0.1 s on a fixed grid, the first one at once.

    1. systemd sets WATCHDOG_USEC=200000 and WATCHDOG_PID to our pid.
    2. run_watchdog runs as a task until the test has received 6 pings (an event, not a
       0.55 s window: a busy machine delays pings, it cannot make the test miss them).
    3. Ping k is never sent before start + k * 0.1 s (the grid: no bursts beyond it, no drift
       ahead of it); the first comes at once and the six within a loose bound.
    """
    clean_env.setenv("WATCHDOG_USEC", "200000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env()
    assert notifier.watchdog_interval_s == pytest.approx(0.1)

    loop = asyncio.get_running_loop()
    systemd_socket.setblocking(False)
    arrivals: list[float] = []

    async def receive(n: int) -> None:
        while len(arrivals) < n:
            data = await loop.sock_recv(systemd_socket, 4096)
            assert data == b"WATCHDOG=1"
            arrivals.append(loop.time())

    start = loop.time()
    pinger = asyncio.create_task(notifier.run_watchdog())
    try:
        await asyncio.wait_for(receive(6), timeout=10)
    finally:
        pinger.cancel()
        await asyncio.gather(pinger, return_exceptions=True)
        notifier.close()

    for k, at in enumerate(arrivals):
        assert at >= start + k * 0.1 - 1e-3, (k, [a - start for a in arrivals])
    assert arrivals[0] - start < 1.0, "the first ping is sent at once"
    assert arrivals[-1] - start < 5.0, [a - start for a in arrivals]


async def test_watchdog_meant_for_another_process(systemd_socket: socket.socket, clean_env: pytest.MonkeyPatch) -> None:
    # A replica that inherited llmd's environment sees llmd's WATCHDOG_PID.
    clean_env.setenv("WATCHDOG_USEC", "200000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = Notifier.from_env()
    assert notifier.watchdog_interval_s is None
    await asyncio.wait_for(notifier.run_watchdog(), timeout=1)


async def test_no_op_without_systemd(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "200000")  # no socket: still nothing to ping
    notifier = Notifier.from_env()
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready()
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    await asyncio.wait_for(notifier.run_watchdog(), timeout=1)
    notifier.close()


def test_errors_are_logged_not_raised(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # systemd gone (or the socket not there yet): the daemon keeps running.
    clean_env.setenv("NOTIFY_SOCKET", os.fspath(tmp_path / "absent"))
    notifier = Notifier.from_env()
    with caplog.at_level(logging.DEBUG, logger="llmd.notify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
    assert any("READY=1" in record.getMessage() for record in caplog.records)
    assert all(record.levelno == logging.DEBUG for record in caplog.records)
    notifier.close()


def test_full_socket_drops_instead_of_blocking(systemd_socket: socket.socket) -> None:
    """A systemd that does not read must never stall the event loop.

    1. Nobody reads the bound socket, so its queue fills up.
    2. Thousands of sends still return promptly; the excess returns False.
    """
    notifier = Notifier.from_env()
    results: list[bool] = []
    sender = threading.Thread(target=lambda: results.extend(notifier.watchdog() for _ in range(5000)), daemon=True)
    sender.start()
    sender.join(timeout=10)
    assert not sender.is_alive(), "sendto() blocked on a full notify socket"
    assert True in results
    assert False in results
    notifier.close()


def test_unset_environment() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    notifier = Notifier.from_env(env, unset=True)
    assert notifier.enabled
    assert env == {}


def test_unsupported_socket_address() -> None:
    # systemd >= 254 may hand out vsock addresses; llmd does not speak them.
    notifier = Notifier("vsock:2:1234", 30_000_000)
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready()
