"""Spawning a supervised child: a free loopback port, the signal it gets when llmd dies, what it
runs between fork and exec (PR_SET_PDEATHSIG, its CPU set), and how its exit reads in a log."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Callable

from llmd.launchers import LOOPBACK

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago: bind port 0, read it, close.

    Another process may take it before the child binds it; the caller retries with a new
    one when the child dies of that.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def death_signal(backend: str) -> int:
    """The signal a child gets when llmd dies. SIGKILL for llama-server (one process). vLLM's
    API server must shut its EngineCore and worker processes down itself: killed outright it
    leaves them running, reparented to pid 1 and holding memory (vllm-project/vllm#55510), so
    it gets SIGTERM, on which its own shutdown takes the whole group down in under a second."""
    return signal.SIGTERM if backend == "vllm" else signal.SIGKILL


def child_setup(parent_pid: int, cpus: tuple[int, ...] | None, sig: int = signal.SIGKILL) -> Callable[[], None]:
    """The function the child runs between fork and exec (works under uvloop too)."""
    # Resolve prctl in the parent: dlopen/dlsym after fork in a threaded process can deadlock.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, sig)
        # If llmd died between fork and prctl, no signal will come: the child was already
        # re-parented. Exit instead of running orphaned.
        if os.getppid() != parent_pid:
            os._exit(1)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
