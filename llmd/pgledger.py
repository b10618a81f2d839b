"""The usage ledger on PostgreSQL (``usage.store: postgres``): several llmd write one database.

Everything that makes the ledger a promise is the SQLite ledger's (usage.Ledger): the request
path only queues a row; the flusher commits a batch and its rollup in one transaction; while
the database is away the rows stay in memory (at most ``usage.max_pending_rows``, the oldest
beyond that dropped and counted) and the write is retried with backoff on a fresh connection.
This class replaces only the connection, the transaction and the reads.

Also here: what ``llmd usage`` needs without a running llmd (a report, ``usage migrate
--from sqlite FILE``), each on a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from .config import UsageConfig
from .pgschema import INSERT_REQUEST_PG, UPSERT_MONTHLY_PG, migrate, numbered
from .report import ReportRow, report_query, report_rows
from .schema import REQUEST_COLUMNS, LedgerError, UsageRow, rollup, row_params
from .usage import Ledger

log = logging.getLogger("llmd.usage")

CONNECT_TIMEOUT_S = 5.0  # a database that does not answer within this is "down" for this try
COMMAND_TIMEOUT_S = 30.0
IMPORT_BATCH = 5_000  # rows per executemany of `usage migrate`


def dsn_from_env(cfg: UsageConfig) -> str:
    dsn = os.environ.get(cfg.dsn_env, "") or cfg.dsn
    if not dsn:
        raise LedgerError(f"usage.store is postgres but neither usage.dsn nor {cfg.dsn_env} (usage.dsn_env) is set")
    return dsn


def redact(dsn: str) -> str:
    """The DSN without its password, for logs and errors."""
    with contextlib.suppress(ValueError):
        u = urlsplit(dsn)
        if u.password:
            host = u.hostname or ""
            netloc = f"{u.username}:***@{host}" + (f":{u.port}" if u.port else "")
            return urlunsplit(u._replace(netloc=netloc))
    return dsn


class LedgerUnreachable(LedgerError):
    """The database does not answer (as opposed to answering with a schema llmd cannot use)."""


async def connect(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S, command_timeout=COMMAND_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
        raise LedgerUnreachable(f"usage ledger {redact(dsn)}: cannot connect: {type(e).__name__}: {e}") from e


class PgLedger(Ledger):
    """usage.Ledger whose rows go to PostgreSQL (see the module docstring)."""

    def __init__(self, cfg: UsageConfig, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self._dsn = dsn_from_env(cfg)
        self.path = redact(self._dsn)  # what log lines and errors name
        self.store = "postgres"
        self._pg: asyncpg.Connection | None = None

    async def open(self) -> None:
        """As the SQLite ledger, except that a database that does not answer yet does not stop
        llmd: it serves, keeps the rows in memory and writes them once the database answers (a
        host restarting during a database outage keeps serving). A schema newer than this llmd's
        still stops it."""
        if self._task is not None:
            return
        try:
            await self._connection()
        except LedgerUnreachable as e:
            self._note_write_error(e, 0)
        self._task = asyncio.create_task(self._run(), name="llmd-usage-flusher")
        await asyncio.sleep(0)
        log.info("usage ledger %s open (flush every %g ms)", self.path, self.interval_s * 1000)

    async def month_totals(self, month: str) -> dict[str, int]:
        try:
            return await super().month_totals(month)
        except LedgerUnreachable as e:
            # Only at start or on a Redis reconnection: quotas then count from what this process
            # still holds (and, with limits.store: redis, from Redis's own counters).
            log.error(
                "usage ledger %s: monthly totals unavailable (%s); quotas count from the rows held here", self.path, e
            )
            return self._pending_totals(month)

    async def _connection(self) -> asyncpg.Connection:  # type: ignore[override]
        if self._pg is not None and self._pg.is_closed():
            self._pg = None
        if self._pg is None:
            db = await connect(self._dsn)
            try:
                await migrate(db, self.path)
            except BaseException:
                with contextlib.suppress(Exception):
                    await db.close(timeout=1)
                raise
            self._pg = db
        return self._pg

    async def _drop_connection(self) -> None:
        db, self._pg = self._pg, None
        if db is not None:
            # close() waits for the server; a server that went away must not hold the flusher.
            with contextlib.suppress(Exception):
                db.terminate()

    async def _commit(self, params: list[tuple[Any, ...]]) -> None:
        db = await self._connection()
        async with db.transaction():
            await db.executemany(INSERT_REQUEST_PG, params)
            await db.executemany(UPSERT_MONTHLY_PG, rollup(params))

    async def _read(self, sql: str, params: list[str]) -> list[Any]:
        if self._closed:
            raise LedgerError(f"usage ledger {self.path}: closed")
        try:
            db = await self._connection()
            return [tuple(r) for r in await db.fetch(numbered(sql), *params)]
        except (OSError, asyncpg.InterfaceError, TimeoutError) as e:
            await self._drop_connection()
            raise LedgerUnreachable(f"usage ledger {self.path}: {type(e).__name__}: {e}") from e
        except asyncpg.PostgresError as e:
            await self._drop_connection()
            raise LedgerError(f"usage ledger {self.path}: {type(e).__name__}: {e}") from e


# --- `llmd usage` against PostgreSQL --------------------------------------------------------------


async def report_pg(dsn: str, month: str | None, key: str | None, model: str | None) -> list[ReportRow]:
    sql, params = report_query(month, key, model)
    db = await connect(dsn)
    try:
        await migrate(db, redact(dsn))
        return report_rows(tuple(r) for r in await db.fetch(numbered(sql), *params))
    finally:
        await db.close()


def _sqlite_rows(path: str, instance: str) -> list[tuple[Any, ...]]:
    """Every row of a SQLite ledger as INSERT parameters, whatever its schema version; a row
    without an instance gets ``instance``."""
    p = Path(path)
    if not p.is_file():
        raise LedgerError(f"usage ledger {path}: no such file")
    try:
        with contextlib.closing(sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)) as db:
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                return []
            have = {r[1] for r in db.execute("PRAGMA table_info(requests)")}
            rows = db.execute(
                f"SELECT {', '.join(c for c in REQUEST_COLUMNS if c in have)} FROM requests ORDER BY id"
            ).fetchall()
            names = [c for c in REQUEST_COLUMNS if c in have]
    except sqlite3.Error as e:
        raise LedgerError(f"usage ledger {path}: {e}") from e
    fields = set(UsageRow.__struct_fields__)  # every column but `month` (derived from ts)
    out = []
    for r in rows:
        d = {k: v for k, v in zip(names, r, strict=True) if k in fields}
        d["stream"] = bool(d["stream"])
        d["instance"] = d.get("instance") or instance
        out.append(row_params(UsageRow(**d)))
    return out


async def import_sqlite(dsn: str, path: str, instance: str) -> int:
    """Copy a SQLite ledger's rows (and their rollup) into PostgreSQL in one transaction; the
    number of rows copied. The same history twice is refused (LedgerError), not counted twice."""
    params = await asyncio.to_thread(_sqlite_rows, path, instance)
    source = await asyncio.to_thread(os.path.abspath, path)
    h = hashlib.sha256()
    for p in params:
        h.update(repr(p).encode())
    fingerprint = h.hexdigest()
    db = await connect(dsn)
    try:
        await migrate(db, redact(dsn))
        async with db.transaction():
            done = await db.fetchrow("SELECT source, rows FROM imports WHERE fingerprint = $1", fingerprint)
            if done is not None:
                raise LedgerError(
                    f"{path}: these {done['rows']} rows were already imported (from {done['source']}); nothing copied"
                )
            for i in range(0, len(params), IMPORT_BATCH):
                await db.executemany(INSERT_REQUEST_PG, params[i : i + IMPORT_BATCH])
            await db.executemany(UPSERT_MONTHLY_PG, rollup(params))
            await db.execute(
                "INSERT INTO imports (fingerprint, source, rows, imported_at) VALUES ($1, $2, $3, $4)",
                fingerprint,
                source,
                len(params),
                time.time(),
            )
    finally:
        await db.close()
    return len(params)
