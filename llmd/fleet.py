"""The optional shared stores seen from the command line: ``llmd check`` probes PostgreSQL
(usage.store: postgres) and Redis (limits.store: redis) with the running config's settings;
``llmd usage`` reads and fills the PostgreSQL ledger. Each call opens its own short connection.
"""

from __future__ import annotations

import asyncio
import os

from .config import Config
from .pgledger import connect, dsn_from_env, import_sqlite, redact, report_pg
from .pgschema import PG_MIGRATIONS, schema_version
from .redislimits import STORE_ERRORS
from .report import ReportRow
from .resp import RespClient
from .schema import LedgerError

PROBE_TIMEOUT_S = 5.0


async def _probe_pg(cfg: Config) -> str:
    dsn = dsn_from_env(cfg.usage)
    db = await connect(dsn)
    try:
        version = await schema_version(db)
        server = db.get_server_version()
    finally:
        await db.close()
    state = "up to date" if version == len(PG_MIGRATIONS) else f"version {version}, llmd migrates it at start"
    return f"PostgreSQL {server.major}.{server.minor} at {redact(dsn)}: schema {state}"


async def _probe_redis(cfg: Config) -> str:
    url = os.environ.get(cfg.limits.url_env, "")
    client = RespClient(url, PROBE_TIMEOUT_S)
    try:
        info = (await client.call("INFO", "server")).decode()
    finally:
        await client.close()
    version = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("redis_version:")), "?"
    )
    return f"Redis {version} at {url.split('@')[-1]}"


async def probe(cfg: Config) -> list[tuple[str, bool, str]]:
    """(store, answered, what it said) for each shared store the config names."""
    out: list[tuple[str, bool, str]] = []
    if cfg.usage.enabled and cfg.usage.store == "postgres":
        try:
            out.append(("usage", True, await asyncio.wait_for(_probe_pg(cfg), PROBE_TIMEOUT_S + 1)))
        except (LedgerError, TimeoutError) as e:
            out.append(("usage", False, str(e) or "no answer"))
    if cfg.limits.store == "redis":
        try:
            out.append(("limits", True, await asyncio.wait_for(_probe_redis(cfg), PROBE_TIMEOUT_S + 1)))
        except STORE_ERRORS as e:
            out.append(("limits", False, f"redis: {type(e).__name__}: {e}"))
    return out


def report(cfg: Config, month: str | None, key: str | None, model: str | None) -> list[ReportRow]:
    return asyncio.run(report_pg(dsn_from_env(cfg.usage), month, key, model))


def migrate_from_sqlite(cfg: Config, path: str, instance: str) -> int:
    return asyncio.run(import_sqlite(dsn_from_env(cfg.usage), path, instance))
