"""The usage ledger's file: the row llmd records, the SQLite schema and its forward migrations.

One row per request goes into ``requests``; ``monthly`` is the rollup per (key, month, model)
that reports and the limiter read. Both are written by ``llmd.usage.Ledger`` in one transaction
per batch, with the SQL below.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import aiosqlite
import msgspec

from .months import month_of
from .outcome import Outcome

log = logging.getLogger("llmd.usage")

BUSY_TIMEOUT_MS = 5000  # wait this long for another writer (a maintenance script) before failing a flush


class UsageRow(msgspec.Struct, kw_only=True):
    """One request that reached the limits (admitted or refused; ``status``/``outcome`` say which)."""

    ts: float  # unix seconds when the request arrived; its UTC month is the rollup's month
    request_id: str
    key_id: str
    tier: str
    model: str  # the configured model name (not an alias)
    replica: str  # "" when no replica was chosen (refused before the balancer)
    route: str
    status: int
    stream: bool
    outcome: str  # an Outcome value
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    client_ip: str = ""
    token_method: str = "upstream"  # how tokens were counted: upstream usage | tokenize | estimate | cache
    cache: str = ""  # the completion cache: hit | miss | bypass; "" when the model has no cache
    upstream_tokens: int | None = None  # tokens a replica worked on (0 for a cache hit); None: prompt + completion
    quota_exempt_tokens: int = 0  # of prompt + completion, not counted against monthly_tokens (cache hits by default)
    instance: str = ""  # the llmd that served it (usage.instance); the ledger fills it in when empty


class LedgerError(Exception):
    """The ledger's database cannot be opened or read (writes never raise; they retry)."""


# --- schema -----------------------------------------------------------------------------------

# Forward migrations: MIGRATIONS[i] takes a database from user_version i to i + 1. Append a new
# tuple to change the schema (e.g. ("ALTER TABLE requests ADD COLUMN ...",)); never edit a step
# that has shipped, because existing files already ran it.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
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
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            ttft_ms REAL,
            duration_ms REAL NOT NULL DEFAULT 0,
            client_ip TEXT NOT NULL DEFAULT '',
            token_method TEXT NOT NULL DEFAULT 'upstream'
        )""",
        # For ad-hoc queries by ops ("this key's requests in May"); llmd itself reads `monthly`.
        "CREATE INDEX requests_month_key ON requests (month, key_id)",
        """CREATE TABLE monthly (
            key_id TEXT NOT NULL,
            month TEXT NOT NULL,
            model TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            errors INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (key_id, month, model)
        ) WITHOUT ROWID""",
        # The primary key serves "one key's month"; this serves "everyone's month" in key order.
        "CREATE INDEX monthly_month ON monthly (month, key_id, model)",
    ),
    # 2: the completion cache. A hit is a row with cache = 'hit', the client's tokens and
    # upstream_tokens 0 (NULL on rows written before: they were all upstream work). Hit tokens
    # the tier does not count against the quota are quota_exempt_tokens, so the quota loaded at
    # start is prompt + completion - quota_exempt_tokens of the month, as it was counted live.
    (
        "ALTER TABLE requests ADD COLUMN cache TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE requests ADD COLUMN upstream_tokens INTEGER",
        "ALTER TABLE requests ADD COLUMN quota_exempt_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE monthly ADD COLUMN cache_hits INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE monthly ADD COLUMN quota_exempt_tokens INTEGER NOT NULL DEFAULT 0",
    ),
    # 3: several hosts share one ledger (PostgreSQL, pgschema.py): each row says which llmd
    # served it. SQLite keeps the same schema so `llmd usage migrate` copies rows as they are.
    ("ALTER TABLE requests ADD COLUMN instance TEXT NOT NULL DEFAULT ''",),
)

REQUEST_COLUMNS = (
    "ts",
    "month",
    "request_id",
    "key_id",
    "tier",
    "model",
    "replica",
    "route",
    "status",
    "stream",
    "outcome",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "ttft_ms",
    "duration_ms",
    "client_ip",
    "token_method",
    "cache",
    "upstream_tokens",
    "quota_exempt_tokens",
    "instance",
)
INSERT_REQUEST_SQL = (
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES ({', '.join('?' * len(REQUEST_COLUMNS))})"
)
UPSERT_MONTHLY_SQL = """
INSERT INTO monthly (key_id, month, model, requests, prompt_tokens, completion_tokens, cached_tokens, errors,
                     cache_hits, quota_exempt_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key_id, month, model) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cached_tokens = cached_tokens + excluded.cached_tokens,
    errors = errors + excluded.errors,
    cache_hits = cache_hits + excluded.cache_hits,
    quota_exempt_tokens = quota_exempt_tokens + excluded.quota_exempt_tokens
"""
MONTH_TOTALS_SQL = (
    "SELECT key_id, SUM(prompt_tokens + completion_tokens - quota_exempt_tokens) FROM monthly WHERE month = ? "
    "GROUP BY key_id"
)


def row_params(row: UsageRow) -> tuple[Any, ...]:
    """The INSERT parameters of a row, coerced so that a malformed row fails here, alone,
    rather than failing the whole batch in SQLite on every retry."""
    month = month_of(row.ts)
    ttft = None if row.ttft_ms is None else float(row.ttft_ms)
    return (
        float(row.ts),
        month,
        str(row.request_id),
        str(row.key_id),
        str(row.tier),
        str(row.model),
        str(row.replica),
        str(row.route),
        int(row.status),
        int(bool(row.stream)),
        str(row.outcome),
        int(row.prompt_tokens),
        int(row.completion_tokens),
        int(row.cached_tokens),
        ttft,
        float(row.duration_ms),
        str(row.client_ip),
        str(row.token_method),
        str(row.cache),
        int(row.prompt_tokens + row.completion_tokens if row.upstream_tokens is None else row.upstream_tokens),
        int(row.quota_exempt_tokens),
        str(row.instance),
    )


def rollup(params: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One UPSERT tuple per (key, month, model) in the batch."""
    acc: dict[tuple[str, str, str], list[int]] = {}
    for p in params:
        # indexes follow REQUEST_COLUMNS
        k = (p[3], p[1], p[5])
        a = acc.get(k)
        if a is None:
            a = acc[k] = [0, 0, 0, 0, 0, 0, 0]
        a[0] += 1
        a[1] += p[11]
        a[2] += p[12]
        a[3] += p[13]
        a[4] += p[10] != Outcome.OK
        a[5] += p[18] == "hit"
        a[6] += p[20]
    return [(*k, *a) for k, a in acc.items()]


async def _user_version(db: aiosqlite.Connection) -> int:
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(db: aiosqlite.Connection, path: str) -> None:
    """Bring the file to len(MIGRATIONS), all steps in one transaction (all or nothing)."""
    target = len(MIGRATIONS)
    if await _user_version(db) == target:
        return
    await db.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        version = await _user_version(db)
        if version > target:
            raise LedgerError(
                f"usage ledger {path}: schema version {version} is newer than this llmd's ({target}); "
                "upgrade llmd or point usage.path at another file"
            )
        for v in range(version, target):
            for stmt in MIGRATIONS[v]:
                await db.execute(stmt)
        await db.execute(f"PRAGMA user_version = {target}")
        await db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            await db.execute("ROLLBACK")
        raise
    if version < target:
        log.info("usage ledger %s: schema migrated from version %d to %d", path, version, target)
