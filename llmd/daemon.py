"""The daemon's life cycle: start, serve, reload on SIGHUP, drain and stop on SIGTERM/SIGINT.

Signal handlers only set events; the work happens in ``Daemon.run``'s loop, one thing at a
time, so reloads are serialized and a reload never races a shutdown.

Shutdown order, all phases sharing one deadline (``server.drain_seconds`` + STOP_BUDGET_S):
  1. stop accepting (listening socket closed), readiness goes 503;
  2. let in-flight requests, streams included, finish (aiohttp's graceful shutdown, up to
     drain_seconds);
  3. finish follow-up settles (aborted streams whose prompt is being tokenized);
  4. flush the usage ledger;
  5. stop the children (SIGTERM the group, wait, SIGKILL, reap);
  6. close the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from . import configfile as config_mod
from . import log as log_mod
from .app import create_app
from .config import Config, ConfigError
from .notify import Notifier
from .runtime import Services

log = logging.getLogger("llmd")

# After the drain: time for follow-up settles, replicas' SIGTERM/SIGKILL and the last ledger flush.
STOP_BUDGET_S = 10.0


class Daemon:
    def __init__(self, cfg: Config, config_path: Path) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.services = Services(cfg)
        # unset=True: children must not inherit NOTIFY_SOCKET and talk to systemd as llmd.
        self.notifier = Notifier.from_env(unset=True)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.port: int | None = None
        self._runner: web.AppRunner
        self._tasks: list[asyncio.Task[None]] = []

    def _signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)

    async def start(self) -> bool:
        """Start services and listen. False (after cleaning up) when the address is taken."""
        srv = self.cfg.server
        app = create_app(self.services)  # its cleanup_ctx opens the services in runner.setup()
        self._runner = runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,  # a client that goes away cancels its upstream request
            shutdown_timeout=srv.drain_seconds,
        )
        await runner.setup()
        site = web.TCPSite(runner, srv.host, srv.port, backlog=1024, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            log.error("cannot listen", extra={"host": srv.host, "port": srv.port, "error": str(e)})
            self.services.deadline = asyncio.get_running_loop().time() + STOP_BUDGET_S
            await runner.cleanup()  # closes the services (cleanup_ctx)
            return False
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else srv.port
        log.info("listening", extra={"host": srv.host, "port": self.port, "config": str(self.config_path)})
        self.notifier.ready()
        self._tasks = [asyncio.create_task(self.notifier.run_watchdog()), asyncio.create_task(self._status_loop())]
        return True

    async def stop(self) -> None:
        """Drain and stop. One deadline for every phase: in-flight requests get
        drain_seconds, then follow-up settles, children and the ledger share what is left of
        STOP_BUDGET_S beyond it (TimeoutStopSec in the unit is above both)."""
        loop = asyncio.get_running_loop()
        self.notifier.stopping()
        drain = self.services.runtime.cfg.server.drain_seconds
        deadline = loop.time() + drain + STOP_BUDGET_S
        log.info("stopping: draining in-flight requests", extra={"drain_seconds": drain})
        self.services.draining = True
        self.services.deadline = deadline
        # Requests queued for a cold start would be cut at the drain deadline with no answer
        # (and a client_abort row): the start is not worth finishing now; answer them 503.
        for name, pool in self.services.pools.items():
            if self.services.loader.state(name) in ("cold", "starting"):
                pool.admission.fail_all(f"llmd is stopping: model '{name}' was starting for this request. Retry later.")
        # Stops listening, waits for in-flight handlers up to drain_seconds, then the app's
        # cleanup_ctx closes the services within the same deadline.
        await self._runner.cleanup()
        for t in self._tasks:
            t.cancel()
        log.info("stopped")

    async def run(self) -> int:
        self._signals(asyncio.get_running_loop())
        if not await self.start():
            return 1
        try:
            while not self._stop.is_set():
                stop_wait = asyncio.create_task(self._stop.wait())
                reload_wait = asyncio.create_task(self._reload.wait())
                await asyncio.wait({stop_wait, reload_wait}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                reload_wait.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    await self.reload()
        finally:
            await self.stop()
        return 0

    async def reload(self) -> bool:
        """Read, validate, swap. Any error: log every one, keep the old config serving."""
        metrics = self.services.metrics
        try:
            cfg = config_mod.load(self.config_path)
        except ConfigError as e:
            for err in e.errors:
                log.error("reload refused: %s", err, extra={"config": e.source})
            metrics.reloads.labels("error").inc()
            return False
        self.notifier.reloading()
        try:
            await self.services.ledger.flush()
            await self.services.reload(cfg)
        except Exception:
            log.exception("reload failed while applying; the previous runtime keeps serving")
            metrics.reloads.labels("error").inc()
            self.notifier.ready()
            return False
        log_mod.setup(cfg.server.log_level, cfg.server.log_format)
        ledger = self.services.ledger
        ledger.interval_s, ledger.max_pending_rows = cfg.usage.flush_ms / 1000, cfg.usage.max_pending_rows
        for name in restart_only_changes(self.cfg, cfg):
            log.warning("%s changed: it takes effect at the next restart; the running value stays", name)
        self.cfg = cfg
        metrics.reloads.labels("ok").inc()
        log.info("reloaded", extra={"config": str(self.config_path), "models": list(cfg.models)})
        self.notifier.ready()
        self._status()
        return True

    def _status(self) -> None:
        reps = self.services.supervisor.status() if self.services.supervisor else []
        ready = sum(1 for r in reps if r["state"] == "ready")
        in_flight = sum(int(r["in_flight"] or 0) for r in reps)  # type: ignore[call-overload]
        self.notifier.status(f"{ready}/{len(reps)} replicas ready, {in_flight} in flight")

    async def _status_loop(self) -> None:
        while True:
            self._status()
            await asyncio.sleep(5)


# Settings a reload cannot apply to a running process (the socket, the metrics registry and
# the ledger's file are made once at start); everything else in the config applies on reload.
RESTART_ONLY = (
    ("server.host", lambda c: c.server.host),
    ("server.port", lambda c: c.server.port),
    ("server.metrics", lambda c: c.server.metrics),
    ("usage.enabled", lambda c: c.usage.enabled),
    ("usage.path", lambda c: c.usage.path),
    ("usage.store", lambda c: c.usage.store),
    ("usage.dsn", lambda c: c.usage.dsn),
    ("usage.dsn_env", lambda c: c.usage.dsn_env),
    ("usage.instance", lambda c: c.usage.instance),
    ("limits.store", lambda c: c.limits.store),
    ("limits.url_env", lambda c: c.limits.url_env),
    ("limits.prefix", lambda c: c.limits.prefix),
    ("limits.timeout_ms", lambda c: c.limits.timeout_ms),
)


def restart_only_changes(old: Config, new: Config) -> list[str]:
    return [name for name, get in RESTART_ONLY if get(old) != get(new)]


def serve(config_path: Path) -> int:
    cfg = config_mod.load(config_path)
    log_mod.setup(cfg.server.log_level, cfg.server.log_format)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(Daemon(cfg, config_path).run())
