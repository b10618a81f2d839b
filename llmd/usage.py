"""The usage ledger: one SQLite row per request plus a monthly rollup, written behind the requests.

The request path only calls :meth:`Ledger.record`, which appends to an in-memory queue and
never touches SQLite. A flusher task writes the queue every ``usage.flush_ms`` in one
transaction: the rows into ``requests`` and, in the same transaction, one UPSERT per
(key, month, model) into ``monthly``, so the rollup always equals the sum of the rows.
Reports and the limiter's monthly quota counters read only ``monthly`` (a few rows per key).

When the disk fails (full, locked, file removed, read-only), llmd keeps serving: the rows go
back to the front of the queue, at most ``usage.max_pending_rows`` are kept (the oldest beyond
that are dropped and counted), and the write is retried with backoff on a fresh connection.

What a row is and the SQL that stores it live in ``schema.py``; report queries and their
formats in ``report.py``; this module owns the queue, the flusher and the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite

from .config import UsageConfig
from .months import check_month, month_of
from .months import current_month as current_month  # runtime.py imports it from here
from .report import DailyRow, ReportRow, daily_query, daily_rows, report_query, report_rows

# app.py imports LedgerError and UsageRow from here as well (with Ledger, the ledger's whole API).
from .schema import (
    BUSY_TIMEOUT_MS,
    INSERT_REQUEST_SQL,
    MONTH_TOTALS_SQL,
    UPSERT_MONTHLY_SQL,
    LedgerError,
    UsageRow,
    migrate,
    rollup,
    row_params,
)

log = logging.getLogger("llmd.usage")

MAX_BACKOFF_S = 5.0  # the longest wait between two failed writes; bounds recovery time after a disk heals
TICK_MAX_ROWS = 2_000  # rows per transaction from the flusher, so a backlog never stalls the event loop
LOG_EVERY_S = 30.0  # repeated drop/error warnings are summarised at most this often
CLOSE_ATTEMPTS = 3  # final flush tries on close before rows are declared lost


class _Throttle:
    """Says when a repeated warning may be logged again; counts what happened in between."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last = float("-inf")
        self.since_last = 0

    def hit(self, n: int = 1) -> bool:
        self.since_last += n
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True

    def reset(self) -> int:
        n, self.since_last = self.since_last, 0
        return n


class Ledger:
    """Write-behind usage ledger over one SQLite file (see the module docstring).

    Life cycle: ``await open()`` (creates/migrates the file, starts the flusher; raises
    LedgerError if the file cannot be opened at all) -> ``record()`` from any request ->
    ``await flush()`` on SIGTERM/SIGHUP -> ``await close()``.

    Metrics: ``pending_rows``, ``dropped_rows``, ``write_errors``, ``rows_written``, ``flushes``
    and ``healthy`` can be read at any time; ``on_flush(rows, seconds)``, ``on_flush_error(exc)``
    and ``on_drop(n)`` are called, if set, as things happen (exceptions in them are logged).
    """

    def __init__(self, cfg: UsageConfig, *, tick_max_rows: int = TICK_MAX_ROWS) -> None:
        self.path = cfg.path
        self.instance = cfg.instance or socket.gethostname()
        self.store = "sqlite"
        self.interval_s = cfg.flush_ms / 1000
        self.max_pending_rows = cfg.max_pending_rows
        self.tick_max_rows = tick_max_rows
        self.on_flush: Callable[[int, float], None] | None = None
        self.on_flush_error: Callable[[BaseException], None] | None = None
        self.on_drop: Callable[[int], None] | None = None
        self._queue: deque[UsageRow] = deque()
        self._in_flight = 0  # rows taken from the queue by the write in progress
        self._db: aiosqlite.Connection | None = None
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file the connection has open
        # One transaction or read at a time on the connection, so a read never sees a
        # half-written batch and the in-flight rows are either committed or back in the queue.
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._dropped = 0
        self._write_errors = 0
        self._failures_in_a_row = 0
        self._rows_written = 0
        self._flushes = 0
        self._drop_log = _Throttle()
        self._error_log = _Throttle()

    # --- counters -------------------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        """Rows recorded but not yet committed (queued or in the write in progress)."""
        return len(self._queue) + self._in_flight

    @property
    def dropped_rows(self) -> int:
        """Rows lost since start: over max_pending_rows, malformed, or recorded after close."""
        return self._dropped

    @property
    def write_errors(self) -> int:
        """Failed write transactions since start (each retry that fails counts)."""
        return self._write_errors

    @property
    def rows_written(self) -> int:
        return self._rows_written

    @property
    def flushes(self) -> int:
        """Committed write transactions since start."""
        return self._flushes

    @property
    def healthy(self) -> bool:
        """False while the last write failed (rows are accumulating in memory)."""
        return self._failures_in_a_row == 0

    # --- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._task is not None:
            return
        await self._connection()
        self._task = asyncio.create_task(self._run(), name="llmd-usage-flusher")
        # Let the flusher enter its try block now: a task cancelled before it ever ran skips
        # its handler, and then nothing would stop the connection's (non-daemon) thread.
        await asyncio.sleep(0)
        log.info("usage ledger %s open (flush every %g ms)", self.path, self.interval_s * 1000)

    async def close(self) -> None:
        """Stop the flusher, write everything still pending, close the file."""
        if self._closed:
            return
        self._stop.set()
        task, self._task = self._task, None
        if task is not None and not task.done():
            await task
        for attempt in range(CLOSE_ATTEMPTS):
            if await self.flush():
                break
            if attempt + 1 < CLOSE_ATTEMPTS:
                await asyncio.sleep(0.2 * (attempt + 1))
        # Rows recorded from here on have nowhere to go: record() counts them as dropped.
        self._closed = True
        if self._queue:
            lost = len(self._queue)
            self._queue.clear()
            self._dropped += lost
            log.error("usage ledger %s: %d rows could not be written before close and are lost", self.path, lost)
        await self._drop_connection()

    # --- the request path -----------------------------------------------------------------

    def record(self, row: UsageRow) -> None:
        """Queue one row. O(1), no I/O; drops the oldest pending row when the queue is full."""
        if self._closed:
            self._note_drop(1, "recorded after the ledger was closed")
            return
        if not row.instance:
            row.instance = self.instance
        if len(self._queue) >= self.max_pending_rows:
            self._queue.popleft()
            self._note_drop(1, f"more than usage.max_pending_rows={self.max_pending_rows} waiting")
        self._queue.append(row)

    # --- writing --------------------------------------------------------------------------

    async def flush(self) -> bool:
        """Write everything pending now in one transaction. True if it all reached the disk.

        Waits for a write already in progress first. A cancelled caller (a shutdown deadline)
        does not abandon the transaction: it runs to its end and its rows are either committed
        or back in the queue.
        """
        # Rows a failed flusher write put back just before us are in the queue again: covered.
        return await asyncio.shield(self._write(None))

    async def _run(self) -> None:
        try:
            while True:
                delay = self.interval_s
                if self._failures_in_a_row:
                    delay = min(max(self.interval_s, 0.05) * 2**self._failures_in_a_row, MAX_BACKOFF_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return  # close() does the final flush
                if self._queue:
                    try:
                        await asyncio.shield(self._write(self.tick_max_rows))
                    except Exception:
                        # A bug here must not end the flusher: rows would pile up unseen.
                        log.exception("usage ledger %s: flusher error", self.path)
        except asyncio.CancelledError:
            # Cancelled without close(): the loop is being torn down after an error. Stop the
            # connection's thread, which would otherwise keep the process from exiting.
            if self.pending_rows:
                log.error("usage ledger %s: abandoned with %d rows unwritten", self.path, self.pending_rows)
            await self._drop_connection()
            raise

    async def _write(self, limit: int | None) -> bool:
        """Take up to ``limit`` queued rows (all if None) and commit them in one transaction."""
        async with self._lock:
            n = len(self._queue) if limit is None else min(limit, len(self._queue))
            if n == 0:
                return True
            batch = [self._queue.popleft() for _ in range(n)]
            params: list[tuple[Any, ...]] = []
            rows: list[UsageRow] = []
            for row in batch:
                try:
                    params.append(row_params(row))
                    rows.append(row)
                except (TypeError, ValueError, OverflowError, OSError) as e:
                    self._note_drop(1, f"malformed, e.g. {row!r}: {e}")
            if not rows:
                return True
            self._in_flight = len(rows)
            t0 = time.perf_counter()
            try:
                await self._commit(params)
            except Exception as e:
                # Closing the connection rolls the transaction back; the next try opens afresh,
                # which is what a removed or replaced file needs.
                await self._drop_connection()
                self._in_flight = 0
                self._requeue(rows)
                self._note_write_error(e, len(rows))
                return False
            self._in_flight = 0
        elapsed = time.perf_counter() - t0
        self._flushes += 1
        self._rows_written += len(rows)
        if self._failures_in_a_row:
            log.warning(
                "usage ledger %s: writes recovered after %d failed attempts (%d rows written now)",
                self.path,
                self._failures_in_a_row,
                len(rows),
            )
            self._failures_in_a_row = 0
            self._error_log.reset()
        self._call(self.on_flush, len(rows), elapsed)
        return True

    async def _commit(self, params: list[tuple[Any, ...]]) -> None:
        """One transaction: the rows and their rollup, both or neither."""
        db = await self._connection()
        await db.execute("BEGIN IMMEDIATE")
        await db.executemany(INSERT_REQUEST_SQL, params)
        await db.executemany(UPSERT_MONTHLY_SQL, rollup(params))
        await db.execute("COMMIT")

    def _requeue(self, rows: list[UsageRow]) -> None:
        """Put a failed batch back in front of what arrived meanwhile, keeping the newest rows."""
        self._queue.extendleft(reversed(rows))
        over = len(self._queue) - self.max_pending_rows
        if over > 0:
            for _ in range(over):
                self._queue.popleft()
            self._note_drop(over, f"more than usage.max_pending_rows={self.max_pending_rows} waiting")

    def _note_drop(self, n: int, why: str) -> None:
        self._dropped += n
        if self._drop_log.hit(n):
            log.warning(
                "usage ledger %s: dropped %d rows (%s); %d dropped since start",
                self.path,
                self._drop_log.reset(),
                why,
                self._dropped,
            )
        self._call(self.on_drop, n)

    def _note_write_error(self, e: BaseException, n: int) -> None:
        self._write_errors += 1
        self._failures_in_a_row += 1
        # LedgerError already names the file; log the underlying error instead.
        cause = e.__cause__ if isinstance(e, LedgerError) and e.__cause__ else e
        if self._error_log.hit():
            log.error(
                "usage ledger %s: cannot write %d rows: %s: %s (%d failed writes; %d rows pending). "
                "Still serving; retrying with backoff",
                self.path,
                n,
                type(cause).__name__,
                cause,
                self._error_log.reset(),
                self.pending_rows,
            )
        self._call(self.on_flush_error, e)

    @staticmethod
    def _call(hook: Callable[..., None] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("usage ledger: metrics hook %r failed", hook)

    # --- reading --------------------------------------------------------------------------

    async def month_totals(self, month: str) -> dict[str, int]:
        """key_id -> prompt + completion tokens in ``month``, including rows not yet written,
        so a limiter rebuilt on reload starts from exactly what was served."""
        check_month(month)
        async with self._lock:
            rows = await self._read(MONTH_TOTALS_SQL, [month])
            totals = {key_id: int(total or 0) for key_id, total in rows}
            for key_id, used in self._pending_totals(month).items():
                totals[key_id] = totals.get(key_id, 0) + used
        return totals

    def _pending_totals(self, month: str) -> dict[str, int]:
        """Quota tokens of ``month`` in the rows not yet written."""
        totals: dict[str, int] = {}
        for row in self._queue:
            # A malformed row (dropped when written) must not stop the limiter from loading.
            with contextlib.suppress(TypeError, ValueError, OverflowError, OSError):
                if month_of(row.ts) == month:
                    used = int(row.prompt_tokens) + int(row.completion_tokens) - int(row.quota_exempt_tokens)
                    totals[row.key_id] = totals.get(row.key_id, 0) + used
        return totals

    async def report(
        self, month: str | None = None, key: str | None = None, model: str | None = None
    ) -> list[ReportRow]:
        """Per (month, key, model) totals from the committed rollup; every month if ``month`` is None."""
        sql, params = report_query(month, key, model)
        async with self._lock:
            return report_rows(await self._read(sql, params))

    async def daily(self, month: str, key: str | None = None, model: str | None = None,
                    tier: str | None = None) -> list[DailyRow]:
        """Per (day, key, tier, model) totals of ``month`` from committed rows (the admin page)."""
        sql, params = daily_query(month, key, model, tier)
        async with self._lock:
            return daily_rows(await self._read(sql, params))

    async def _read(self, sql: str, params: list[str]) -> list[Any]:
        if self._closed:
            raise LedgerError(f"usage ledger {self.path}: closed")
        try:
            db = await self._connection()
            async with db.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as e:
            await self._drop_connection()
            raise LedgerError(f"usage ledger {self.path}: {e}") from e

    # --- the connection -------------------------------------------------------------------

    async def _connection(self) -> aiosqlite.Connection:
        if self._db is not None and self._file_replaced():
            # In WAL mode SQLite keeps writing to a deleted file without an error, so look.
            log.warning("usage ledger %s: the file was removed or replaced while open; reopening", self.path)
            await self._drop_connection()
        if self._db is None:
            self._db = await self._connect()
            self._file_id = self._stat_id()
        return self._db

    def _stat_id(self) -> tuple[int, int] | None:
        if self.path == ":memory:":
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _file_replaced(self) -> bool:
        # One stat() per batch; cheap next to the write it guards.
        return self._file_id is not None and self._stat_id() != self._file_id

    async def _connect(self) -> aiosqlite.Connection:
        try:
            if self.path != ":memory:":
                await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so the write lock
            # is taken (and busy_timeout applies) at the start of a batch, never half-way.
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise LedgerError(f"usage ledger {self.path}: cannot open: {e}") from e
        try:
            await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            async with db.execute("PRAGMA journal_mode = WAL") as cur:
                mode = await cur.fetchone()
            if self.path != ":memory:" and (mode is None or str(mode[0]).lower() != "wal"):
                log.warning(
                    "usage ledger %s: journal_mode is %s, not wal; readers may block writes",
                    self.path,
                    mode and mode[0],
                )
            # NORMAL in WAL mode: a power cut may lose the last batches, never corrupt the file.
            await db.execute("PRAGMA synchronous = NORMAL")
            await migrate(db, self.path)
        except BaseException as e:
            with contextlib.suppress(Exception):
                await db.close()
            if isinstance(e, sqlite3.Error):
                raise LedgerError(f"usage ledger {self.path}: {e}") from e
            raise
        return db

    async def _drop_connection(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):
                await db.close()


class NullLedger(Ledger):
    """``usage.enabled: false``: rows are discarded; used to measure the ledger's own cost."""

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def record(self, row: UsageRow) -> None:
        return None

    async def flush(self) -> bool:
        return True

    async def month_totals(self, month: str) -> dict[str, int]:
        return {}

    async def report(
        self, month: str | None = None, key: str | None = None, model: str | None = None
    ) -> list[ReportRow]:
        return []

    async def daily(self, month: str, key: str | None = None, model: str | None = None,
                    tier: str | None = None) -> list[DailyRow]:
        return []
