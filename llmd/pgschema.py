"""The usage ledger's schema on PostgreSQL: the same tables, columns and version numbers as the
SQLite file (schema.py), so a report, a month's totals and ``llmd usage migrate`` mean the same
thing on both. Migrations are forward only and run under an advisory lock, so several llmd
starting at once against one database migrate it exactly once.
"""

from __future__ import annotations

import logging
import re

import asyncpg

from .schema import MIGRATIONS as SQLITE_MIGRATIONS
from .schema import REQUEST_COLUMNS, LedgerError

log = logging.getLogger("llmd.usage")

# PG_MIGRATIONS[i] takes the database from version i to i + 1, step for step the same change as
# schema.MIGRATIONS[i] (a test keeps the two the same length). Never edit a shipped step.
PG_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE requests (
            id BIGSERIAL PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            month TEXT NOT NULL,
            request_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            tier TEXT NOT NULL,
            model TEXT NOT NULL,
            replica TEXT NOT NULL,
            route TEXT NOT NULL,
            status INTEGER NOT NULL,
            stream INTEGER NOT NULL,
            outcome TEXT NOT NULL,
            prompt_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0,
            cached_tokens BIGINT NOT NULL DEFAULT 0,
            ttft_ms DOUBLE PRECISION,
            duration_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
            client_ip TEXT NOT NULL DEFAULT '',
            token_method TEXT NOT NULL DEFAULT 'upstream'
        )""",
        "CREATE INDEX requests_month_key ON requests (month, key_id)",
        """CREATE TABLE monthly (
            key_id TEXT NOT NULL,
            month TEXT NOT NULL,
            model TEXT NOT NULL,
            requests BIGINT NOT NULL DEFAULT 0,
            prompt_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0,
            cached_tokens BIGINT NOT NULL DEFAULT 0,
            errors BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (key_id, month, model)
        )""",
        "CREATE INDEX monthly_month ON monthly (month, key_id, model)",
    ),
    (
        "ALTER TABLE requests ADD COLUMN cache TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE requests ADD COLUMN upstream_tokens BIGINT",
        "ALTER TABLE requests ADD COLUMN quota_exempt_tokens BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE monthly ADD COLUMN cache_hits BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE monthly ADD COLUMN quota_exempt_tokens BIGINT NOT NULL DEFAULT 0",
    ),
    (
        "ALTER TABLE requests ADD COLUMN instance TEXT NOT NULL DEFAULT ''",
        # "Which host served what" for ops; llmd itself reads only `monthly`.
        "CREATE INDEX requests_instance_month ON requests (instance, month)",
        # `llmd usage migrate` records each SQLite history it copied, so a second run of the
        # same copy is refused instead of counting that history twice.
        """CREATE TABLE imports (
            fingerprint TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            rows BIGINT NOT NULL,
            imported_at DOUBLE PRECISION NOT NULL
        )""",
    ),
)
assert len(PG_MIGRATIONS) == len(SQLITE_MIGRATIONS), "the two ledgers share one version scheme"

_LOCK_ID = 0x11D_0001  # pg_advisory_xact_lock key of the migration (any constant llmd alone uses)

INSERT_REQUEST_PG = (
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(REQUEST_COLUMNS)))})"
)
UPSERT_MONTHLY_PG = """
INSERT INTO monthly AS m (key_id, month, model, requests, prompt_tokens, completion_tokens, cached_tokens, errors,
                          cache_hits, quota_exempt_tokens)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (key_id, month, model) DO UPDATE SET
    requests = m.requests + excluded.requests,
    prompt_tokens = m.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = m.completion_tokens + excluded.completion_tokens,
    cached_tokens = m.cached_tokens + excluded.cached_tokens,
    errors = m.errors + excluded.errors,
    cache_hits = m.cache_hits + excluded.cache_hits,
    quota_exempt_tokens = m.quota_exempt_tokens + excluded.quota_exempt_tokens
"""

_QMARK = re.compile(r"\?")


def numbered(sql: str) -> str:
    """SQLite's ``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (report.py writes ``?``; its
    queries hold no literal question mark)."""
    n = iter(range(1, 1000))
    return _QMARK.sub(lambda _: f"${next(n)}", sql)


async def schema_version(db: asyncpg.Connection) -> int:
    exists = await db.fetchval("SELECT to_regclass('llmd_schema') IS NOT NULL")
    if not exists:
        return 0
    return int(await db.fetchval("SELECT COALESCE(MAX(version), 0) FROM llmd_schema"))


async def migrate(db: asyncpg.Connection, where: str) -> None:
    """Bring the database to len(PG_MIGRATIONS) in one transaction (all or nothing)."""
    target = len(PG_MIGRATIONS)
    if await schema_version(db) == target:
        return
    async with db.transaction():
        # Another llmd may be migrating right now: wait for it, then read the version again.
        await db.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await db.execute("CREATE TABLE IF NOT EXISTS llmd_schema (version INTEGER NOT NULL)")
        version = await schema_version(db)
        if version > target:
            raise LedgerError(
                f"usage ledger {where}: schema version {version} is newer than this llmd's ({target}); upgrade llmd"
            )
        for v in range(version, target):
            for stmt in PG_MIGRATIONS[v]:
                await db.execute(stmt)
        await db.execute("DELETE FROM llmd_schema")
        await db.execute("INSERT INTO llmd_schema (version) VALUES ($1)", target)
    if version < target:
        log.info("usage ledger %s: schema migrated from version %d to %d", where, version, target)
