"""sd_notify(3) for llmd, without libsystemd.

systemd starts llm-api.service with `Type=notify` and `WatchdogSec=`: it waits
for READY=1 before `systemctl start` returns, shows STATUS= lines in
`systemctl status`, and kills the service when WATCHDOG=1 stops arriving. The
protocol is one datagram of newline-separated `KEY=VALUE` lines sent to the
AF_UNIX socket named by $NOTIFY_SOCKET, so a few lines of socket code replace
the C library.

Contract: no method raises. A daemon must keep serving when systemd is absent
(a developer's shell, a container, tests) or when the socket is briefly
unavailable (daemon-reexec), so every failure is logged at debug and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

# The variables systemd sets for the main process. Replicas must not inherit
# them: a child that pinged the watchdog would hide a stuck llmd (systemd
# also refuses them under NotifyAccess=main, but logs each attempt).
NOTIFY_ENV_VARS: tuple[str, ...] = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify messages to systemd; every method is a no-op without it."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        # "@name" is the abstract namespace (no file; leading NUL byte).
        # Anything else that is not an absolute path (e.g. systemd >= 254's
        # "vsock:CID:PORT") is not something this daemon is run under.
        self._address: str | None = None
        if socket_path:
            if socket_path.startswith("@"):
                self._address = "\0" + socket_path[1:]
            elif socket_path.startswith("/"):
                self._address = socket_path
            else:
                log.debug("NOTIFY_SOCKET=%r is not a unix socket; notifications disabled", socket_path)
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID like sd_watchdog_enabled(3).

        `unset=True` removes the three variables from `environ` (os.environ by
        default), as sd_notify(unset_environment=1) does, so that children
        spawned later with the inherited environment do not see them.
        """
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET"), _watchdog_usec_for_this_process(env))
        if unset:
            for name in NOTIFY_ENV_VARS:
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a usable notify socket."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half of WatchdogSec=, as sd_watchdog_enabled(3) advises.

        None when the unit has no watchdog (or systemd is absent).
        """
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self) -> bool:
        """Startup finished (listening): `systemctl start` returns."""
        return self.send("READY=1")

    def reloading(self) -> bool:
        """A SIGHUP reload began; call ready() when it has finished or failed.

        MONOTONIC_USEC lets systemd (>= 253) match this message to the reload
        it asked for; older versions ignore the field.
        """
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> bool:
        """Shutdown began: systemd shows "deactivating" instead of a failure."""
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """One line for `systemctl status` (e.g. "3/4 replicas ready")."""
        # A newline would end the STATUS= field and start a bogus assignment.
        return self.send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Tell systemd the event loop is alive."""
        return self.send("WATCHDOG=1")

    def send(self, *assignments: str) -> bool:
        """Send KEY=VALUE assignments in one datagram; True when it was handed to the kernel."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                # Non-blocking: this runs on the event loop, and a full socket
                # buffer (systemd busy) must cost a dropped ping, not a stall.
                # Unconnected sendto() re-resolves the path each time, so it
                # keeps working after `systemctl daemon-reexec` re-creates it.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", message, exc)
            return False
        return True

    async def run_watchdog(self) -> None:
        """Send WATCHDOG=1 every `watchdog_interval_s` until cancelled.

        Run it as a task on the daemon's own event loop: the pings are only
        as regular as the loop, so a loop blocked for WatchdogSec= stops them
        and systemd restarts the service. Returns at once without a watchdog.
        """
        interval_s = self.watchdog_interval_s
        if interval_s is None:
            return
        loop = asyncio.get_running_loop()
        # Deadlines on a fixed grid, so the cadence does not drift by the
        # time each iteration takes.
        next_ping = loop.time()
        while True:
            self.watchdog()
            next_ping += interval_s
            await asyncio.sleep(max(0.0, next_ping - loop.time()))

    def close(self) -> None:
        """Release the socket; later calls reopen it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_usec_for_this_process(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC if it is meant for this process, else None.

    systemd sets WATCHDOG_PID to the main PID; a process that merely inherited
    the variables (a child started without cleaning its environment) must
    not take over the parent's watchdog.
    """
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec if usec > 0 else None
