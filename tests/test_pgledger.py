"""The usage ledger on a real PostgreSQL 15 (tests/pgproc.py): migrations, rows and rollup,
an outage, `llmd usage` and `llmd usage migrate --from sqlite`, `llmd check`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
import yaml

from llmd.config import UsageConfig
from llmd.pgledger import PgLedger
from llmd.pgschema import PG_MIGRATIONS
from llmd.schema import MIGRATIONS, LedgerError, UsageRow
from llmd.usage import Ledger
from tests.pgproc import PgServer, fresh_db

ROOT = Path(__file__).resolve().parent.parent


def row(i: int, key: str = "k", prompt: int = 3, completion: int = 4, outcome: str = "ok") -> UsageRow:
    return UsageRow(
        ts=time.time(), request_id=f"req-{i}", key_id=key, tier="t", model="m", replica="m-0", route="chat",
        status=200 if outcome == "ok" else 429, stream=False, outcome=outcome, prompt_tokens=prompt,
        completion_tokens=completion,
    )  # fmt: skip


def pg_ledger(dsn: str, monkeypatch: pytest.MonkeyPatch, instance: str = "host-a", **kw: object) -> PgLedger:
    monkeypatch.setenv("LLMD_PG_DSN", dsn)
    return PgLedger(UsageConfig(store="postgres", flush_ms=20, instance=instance, **kw))  # type: ignore[arg-type]


async def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    db = await asyncpg.connect(dsn)
    try:
        return await db.fetch(sql)
    finally:
        await db.close()


def test_same_version_scheme_as_sqlite() -> None:
    assert len(PG_MIGRATIONS) == len(MIGRATIONS)


async def test_two_ledgers_migrate_one_database_once(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = fresh_db(pg_server)
    a, b = pg_ledger(dsn, monkeypatch, "a"), pg_ledger(dsn, monkeypatch, "b")
    await asyncio.gather(a.open(), b.open())  # both start at once: one migrates, the other waits
    try:
        assert [r["version"] for r in await fetch(dsn, "SELECT version FROM llmd_schema")] == [len(PG_MIGRATIONS)]
        a.record(row(1))
        b.record(row(2, prompt=10))
        assert await a.flush() and await b.flush()
        rows = await fetch(dsn, "SELECT request_id, instance FROM requests ORDER BY request_id")
        assert [(r["request_id"], r["instance"]) for r in rows] == [("req-1", "a"), ("req-2", "b")]
        # The rollup is both hosts' rows; each host's month totals (quota seeding) see both.
        report = await a.report()
        assert [(r.key_id, r.requests, r.prompt_tokens, r.completion_tokens) for r in report] == [("k", 2, 13, 8)]
        month = report[0].month
        assert await b.month_totals(month) == {"k": 21}
    finally:
        await a.close()
        await b.close()


async def test_rows_wait_in_memory_while_postgres_is_down(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = fresh_db(pg_server)
    ledger = pg_ledger(dsn, monkeypatch)
    await ledger.open()
    try:
        ledger.record(row(0))
        assert await ledger.flush()
        pg_server.stop()
        for i in range(1, 51):
            ledger.record(row(i))
        assert not await ledger.flush()  # refused, kept
        assert not ledger.healthy and ledger.pending_rows == 50 and ledger.dropped_rows == 0
        with pytest.raises(LedgerError, match="cannot connect"):  # a read says so at once (/admin/usage: 503)
            await ledger.report()
    except Exception:
        pg_server.start_again()
        raise
    pg_server.start_again()
    try:
        deadline = time.monotonic() + 15
        while ledger.pending_rows and time.monotonic() < deadline:  # the flusher retries with backoff
            await asyncio.sleep(0.05)
        assert ledger.pending_rows == 0 and ledger.healthy
        rows = await fetch(dsn, "SELECT request_id FROM requests")
        assert sorted(r["request_id"] for r in rows) == sorted(f"req-{i}" for i in range(51))  # none lost, none twice
        assert (await ledger.report())[0].requests == 51
    finally:
        await ledger.close()


def llmd_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmd", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def pg_config(tmp_path: Path, extra: dict[str, object] | None = None) -> Path:
    doc = {"server": {"port": 0}, "usage": {"store": "postgres", "path": str(tmp_path / "unused.sqlite3")}}
    doc.update(extra or {})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_usage_report_and_migrate_from_sqlite(
    pg_server: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A single host's history in SQLite, as llmd wrote it.
    lite = Ledger(UsageConfig(path=str(tmp_path / "usage.sqlite3"), flush_ms=20, instance="old-host"))
    await lite.open()
    for i in range(120):
        lite.record(row(i, key=f"k{i % 3}", prompt=i, completion=1, outcome="ok" if i % 10 else "rejected_rate"))
    await lite.close()
    dsn = fresh_db(pg_server)
    cfg = pg_config(tmp_path)
    env = {"LLMD_PG_DSN": dsn}

    r = llmd_cli("usage", "migrate", "-c", str(cfg), "--from", "sqlite", str(tmp_path / "usage.sqlite3"), env=env)
    assert r.returncode == 0, r.stderr
    assert "copied 120 rows" in r.stdout
    rows = await fetch(dsn, "SELECT instance, count(*) AS n FROM requests GROUP BY instance")
    assert [(x["instance"], x["n"]) for x in rows] == [("old-host", 120)]

    # The same report from both ledgers.
    pg_json = llmd_cli("usage", "-c", str(cfg), "--format", "json", env=env)
    lite_json = llmd_cli("usage", "--db", str(tmp_path / "usage.sqlite3"), "--format", "json")
    assert pg_json.returncode == 0, pg_json.stderr
    assert pg_json.stdout == lite_json.stdout and '"requests": 40' in pg_json.stdout
    assert '"errors": 4' in pg_json.stdout

    # Twice is refused and counts nothing twice.
    again = llmd_cli("usage", "migrate", "-c", str(cfg), "--from", "sqlite", str(tmp_path / "usage.sqlite3"), env=env)
    assert again.returncode == 1 and "already imported" in again.stderr
    assert (await fetch(dsn, "SELECT count(*) AS n FROM requests"))[0]["n"] == 120
    assert llmd_cli("usage", "-c", str(cfg), "--format", "json", env=env).stdout == pg_json.stdout


def test_check_probes_the_stores(pg_server: PgServer, tmp_path: Path) -> None:
    dsn = fresh_db(pg_server)
    cfg = pg_config(tmp_path)
    ok = llmd_cli("check", "-c", str(cfg), env={"LLMD_PG_DSN": dsn})
    assert ok.returncode == 0, ok.stderr
    assert "usage store: ok: PostgreSQL 15" in ok.stdout
    dead = dsn.replace(f":{pg_server.port}/", ":1/")
    bad = llmd_cli("check", "-c", str(cfg), env={"LLMD_PG_DSN": dead})
    assert bad.returncode == 1 and "usage store: UNREACHABLE" in bad.stderr
    unset = llmd_cli("check", "-c", str(cfg), env={"LLMD_PG_DSN": ""})
    assert unset.returncode == 1 and "usage.dsn: empty, and environment variable LLMD_PG_DSN" in unset.stderr
    # The DSN in the file, its password (none here: trust) from PGPASSWORD, as libpq has it.
    in_file = pg_config(tmp_path, {"usage": {"store": "postgres", "dsn": dsn, "path": "x.sqlite3"}})
    ok = llmd_cli("check", "-c", str(in_file), env={"LLMD_PG_DSN": "", "PGPASSWORD": "unused"})
    assert ok.returncode == 0 and "usage store: ok" in ok.stdout, ok.stderr
    secret = dsn.replace("postgres@", "postgres:hunter2@")
    leaky = pg_config(tmp_path, {"usage": {"store": "postgres", "dsn": secret, "path": "x.sqlite3"}})
    refused = llmd_cli("check", "-c", str(leaky), env={"LLMD_PG_DSN": ""})
    assert refused.returncode == 1 and "usage.dsn: holds a password" in refused.stderr
    assert "hunter2" not in refused.stderr


async def test_a_database_away_at_start_does_not_stop_the_ledger(
    pg_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that (re)starts during an outage serves: rows wait in memory, the schema is created
    and the rows written once PostgreSQL answers."""
    dsn = fresh_db(pg_server)
    pg_server.stop()
    try:
        ledger = pg_ledger(dsn, monkeypatch)
        await ledger.open()
        assert not ledger.healthy
        ledger.record(row(1, prompt=5, completion=5))
        month = time.strftime("%Y-%m", time.gmtime())
        assert await ledger.month_totals(month) == {"k": 10}  # what this process holds
    finally:
        pg_server.start_again()
    try:
        deadline = time.monotonic() + 15
        while ledger.pending_rows and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert ledger.healthy and [r["request_id"] for r in await fetch(dsn, "SELECT request_id FROM requests")] == [
            "req-1"
        ]
    finally:
        await ledger.close()
