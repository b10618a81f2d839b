"""The usage ledger on a real SQLite file: batching, rollup, months, migrations, failures, reports."""

from __future__ import annotations

import asyncio
import calendar
import csv
import io
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec
import pytest

from llmd import schema, usage
from llmd.config import UsageConfig
from llmd.months import month_of, month_start
from llmd.outcome import Outcome
from llmd.report import ReportRow, format_report, report_file, report_query
from llmd.schema import MONTH_TOTALS_SQL, UPSERT_MONTHLY_SQL, LedgerError, UsageRow
from llmd.usage import Ledger

JAN_15 = calendar.timegm((2025, 1, 15, 12, 0, 0))
MANUAL = 60_000  # flush_ms so long that the flusher never ticks: the test calls flush() itself


def row(
    i: int = 0,
    *,
    ts: float = JAN_15,
    key: str = "dev",
    model: str = "m1",
    outcome: str = Outcome.OK,
    prompt: int = 10,
    completion: int = 5,
    cached: int = 0,
) -> UsageRow:
    return UsageRow(
        ts=ts,
        request_id=f"req-{i}",
        key_id=key,
        tier="premium",
        model=model,
        replica=f"{model}-0",
        route="chat",
        status=200 if outcome == Outcome.OK else 502,
        stream=i % 2 == 0,
        outcome=outcome,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        ttft_ms=12.5 if i % 2 == 0 else None,
        duration_ms=100.0,
        client_ip="10.0.0.1",
    )


def make_cfg(tmp_path: Path, flush_ms: int = MANUAL, max_pending_rows: int = 100_000) -> UsageConfig:
    return UsageConfig(
        path=str(tmp_path / "state" / "usage.sqlite3"), flush_ms=flush_ms, max_pending_rows=max_pending_rows
    )


def query(path: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql, params).fetchall()


async def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    led = Ledger(make_cfg(tmp_path))
    await led.open()
    yield led
    await led.close()


class DiskFault:
    """Makes the ledger's SQLite writes fail like a sick disk until healed.

    ``on`` names the statement that fails: the first of the batch (the INSERT) or the last
    (the rollup UPSERT, after the INSERT already ran inside the transaction).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, on: str = "insert") -> None:
        self.failing = True
        self.calls = 0
        self.during: Callable[[], None] | None = None  # runs while the failing write is in progress
        original = aiosqlite.Connection.executemany

        async def executemany(conn: aiosqlite.Connection, sql: str, params: Any) -> Any:
            target = (sql == UPSERT_MONTHLY_SQL) == (on == "upsert")
            if self.failing and target:
                self.calls += 1
                if self.during is not None:
                    self.during()
                raise sqlite3.OperationalError("disk I/O error")
            return await original(conn, sql, params)

        monkeypatch.setattr(aiosqlite.Connection, "executemany", executemany)


# --- batching -------------------------------------------------------------------------------------


async def test_flush_writes_the_batch_in_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    statements: list[str] = []
    original = aiosqlite.Connection.execute

    def spy(conn: aiosqlite.Connection, sql: str, parameters: Any = None) -> Any:
        statements.append(sql)
        return original(conn, sql, parameters)

    monkeypatch.setattr(aiosqlite.Connection, "execute", spy)
    led = Ledger(make_cfg(tmp_path))
    await led.open()
    statements.clear()

    for i in range(50):
        led.record(row(i))
    assert led.pending_rows == 50
    assert await led.flush()
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1
    assert (led.flushes, led.rows_written, led.pending_rows) == (1, 50, 0)

    for i in range(50, 80):
        led.record(row(i))
    assert await led.flush()
    assert await led.flush()  # nothing pending: no transaction at all
    assert statements.count("BEGIN IMMEDIATE") == 2 and statements.count("COMMIT") == 2
    assert (led.flushes, led.rows_written) == (2, 80)
    await led.close()
    assert query(led.path, "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM requests") == [(80, 80)]


async def test_flusher_writes_behind_in_batches(tmp_path: Path) -> None:
    led = Ledger(make_cfg(tmp_path, flush_ms=10), tick_max_rows=100)
    await led.open()
    for i in range(250):  # recorded between two ticks: written as 100 + 100 + 50
        led.record(row(i))
    await wait_until(lambda: led.pending_rows == 0)
    assert (led.flushes, led.rows_written) == (3, 250)
    for i in range(250, 260):
        led.record(row(i))
    await wait_until(lambda: led.pending_rows == 0)
    assert led.flushes == 4
    await led.close()
    assert query(led.path, "SELECT COUNT(*) FROM requests") == [(260,)]


async def test_row_is_stored_as_given(ledger: Ledger) -> None:
    ledger.record(row(0, cached=3))
    ledger.record(msgspec.structs.replace(row(1), token_method="estimate", replica=""))
    await ledger.flush()
    got = query(
        ledger.path,
        "SELECT ts, month, request_id, stream, outcome, cached_tokens, ttft_ms, token_method, replica "
        "FROM requests ORDER BY id",
    )
    assert got == [
        (JAN_15, "2025-01", "req-0", 1, "ok", 3, 12.5, "upstream", "m1-0"),
        (JAN_15, "2025-01", "req-1", 0, "ok", 0, None, "estimate", ""),
    ]


async def test_malformed_row_is_dropped_alone(ledger: Ledger) -> None:
    ledger.record(row(0))
    ledger.record(msgspec.structs.replace(row(1), prompt_tokens="many"))  # type: ignore[arg-type]
    ledger.record(row(2))
    assert await ledger.flush()
    assert ledger.dropped_rows == 1
    assert query(ledger.path, "SELECT request_id FROM requests ORDER BY id") == [("req-0",), ("req-2",)]


# --- rollup and months ------------------------------------------------------------------------------


async def test_monthly_rollup_equals_the_rows(ledger: Ledger) -> None:
    feb = calendar.timegm((2025, 2, 3, 0, 0, 0))
    n = 0
    for batch in range(4):  # several flushes: the UPSERT must add to what is there
        for key in ("dev", "ci"):
            for model in ("m1", "m2"):
                for outcome in (Outcome.OK, Outcome.OK, Outcome.UPSTREAM_ERROR, Outcome.CLIENT_ABORT):
                    n += 1
                    ts = feb if n % 3 == 0 else JAN_15
                    ledger.record(
                        row(n, ts=ts, key=key, model=model, outcome=outcome, prompt=n, completion=batch, cached=1)
                    )
        await ledger.flush()
    from_rows = query(
        ledger.path,
        "SELECT key_id, month, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
        "SUM(cached_tokens), SUM(outcome != 'ok') FROM requests GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    rollup = query(
        ledger.path,
        "SELECT key_id, month, model, requests, prompt_tokens, completion_tokens, cached_tokens, errors "
        "FROM monthly ORDER BY 1, 2, 3",
    )
    assert rollup == from_rows
    assert len(rollup) == 8  # 2 keys x 2 models x 2 months
    assert sum(r[3] for r in rollup) == n


async def test_month_boundary_is_utc(ledger: Ledger) -> None:
    """1. A row one second before Feb 1 00:00 UTC and one at it. 2. They land in January
    and February, whatever the local time zone says."""
    feb_1 = calendar.timegm((2025, 2, 1, 0, 0, 0))
    assert month_start("2025-02") == feb_1
    assert (month_of(feb_1 - 1), month_of(feb_1)) == ("2025-01", "2025-02")
    assert month_of(calendar.timegm((2024, 12, 31, 23, 59, 59))) == "2024-12"
    ledger.record(row(1, ts=feb_1 - 0.5, prompt=100, completion=0))
    ledger.record(row(2, ts=feb_1, prompt=7, completion=0))
    await ledger.flush()
    assert await ledger.month_totals("2025-01") == {"dev": 100}
    assert await ledger.month_totals("2025-02") == {"dev": 7}
    assert query(ledger.path, "SELECT month, requests FROM monthly ORDER BY month") == [
        ("2025-01", 1),
        ("2025-02", 1),
    ]


async def test_month_totals_include_rows_not_yet_written(ledger: Ledger) -> None:
    ledger.record(row(1, key="dev", prompt=100, completion=50))
    ledger.record(row(2, key="ci", prompt=1, completion=1, model="m2"))
    await ledger.flush()
    ledger.record(row(3, key="dev", prompt=10, completion=0, model="m2"))
    ledger.record(row(4, key="new", prompt=5, completion=5))
    ledger.record(row(5, key="dev", ts=month_start("2025-02"), prompt=1000))  # another month
    assert await ledger.month_totals("2025-01") == {"dev": 160, "ci": 2, "new": 10}
    assert await ledger.month_totals("2024-12") == {}
    with pytest.raises(ValueError, match="month"):
        await ledger.month_totals("2025-13")


# --- schema and migrations ---------------------------------------------------------------------------


async def test_reopen_is_idempotent(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    for i in range(3):
        led = Ledger(cfg)
        await led.open()
        led.record(row(i))
        await led.close()
    assert query(cfg.path, "PRAGMA user_version") == [(len(schema.MIGRATIONS),)]
    assert query(cfg.path, "PRAGMA journal_mode") == [("wal",)]
    assert query(cfg.path, "SELECT COUNT(*) FROM requests") == [(3,)]
    assert query(cfg.path, "SELECT requests FROM monthly") == [(3,)]
    indexes = {r[0] for r in query(cfg.path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"requests_month_key", "monthly_month"} <= indexes


async def test_forward_migration_keeps_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. A file written by this version (v1) holds rows. 2. A later llmd adds a v2 step.
    3. Opening upgrades the file in place: user_version 2, the new column, the old rows."""
    cfg = make_cfg(tmp_path)
    led = Ledger(cfg)
    await led.open()
    led.record(row(1))
    await led.close()
    v1 = len(schema.MIGRATIONS)

    v2_step = ("ALTER TABLE requests ADD COLUMN region TEXT NOT NULL DEFAULT ''",)
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, v2_step))
    led = Ledger(cfg)
    await led.open()
    led.record(row(2))
    await led.close()
    assert query(cfg.path, "PRAGMA user_version") == [(v1 + 1,)]
    assert query(cfg.path, "SELECT request_id, region FROM requests ORDER BY id") == [
        ("req-1", ""),
        ("req-2", ""),
    ]
    assert query(cfg.path, "SELECT requests FROM monthly") == [(2,)]


async def test_report_file_reads_a_ledger_an_older_llmd_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`llmd usage` opens the file read-only (no migration): a v1 file, written before the
    completion cache's columns, still reports, with cache_hits 0."""
    cfg = make_cfg(tmp_path)
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    led = Ledger(cfg)
    await led.open()  # the v1 schema, as the first llmd made it
    await led.close()
    monkeypatch.undo()
    db = sqlite3.connect(cfg.path)
    db.execute("INSERT INTO monthly (key_id, month, model, requests, prompt_tokens, completion_tokens, "
               "cached_tokens, errors) VALUES ('dev', '2025-01', 'm1', 1, 10, 2, 0, 0)")  # fmt: skip
    db.commit()
    db.close()
    assert query(cfg.path, "PRAGMA user_version") == [(1,)]
    (r,) = report_file(cfg.path, month="2025-01")
    assert (r.key_id, r.requests, r.total_tokens, r.cache_hits) == ("dev", 1, 12, 0)


async def test_failed_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path)
    led = Ledger(cfg)
    await led.open()
    await led.close()
    broken = ("CREATE TABLE extra (x)", "THIS IS NOT SQL")
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, broken))
    with pytest.raises(LedgerError, match="syntax error"):
        await Ledger(cfg).open()
    assert query(cfg.path, "PRAGMA user_version") == [(len(schema.MIGRATIONS) - 1,)]
    assert query(cfg.path, "SELECT name FROM sqlite_master WHERE name = 'extra'") == []


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    Path(cfg.path).parent.mkdir(parents=True)
    with sqlite3.connect(cfg.path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(LedgerError, match="newer"):
        await Ledger(cfg).open()


async def test_open_fails_clearly_when_the_path_is_unusable(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    led = Ledger(UsageConfig(path=str(tmp_path / "afile" / "usage.sqlite3")))
    with pytest.raises(LedgerError, match="cannot open"):
        await led.open()


async def test_queries_search_an_index(ledger: Ledger) -> None:
    """Reports and quota totals read `monthly` through an index; `requests` is never scanned."""
    plans = []
    with sqlite3.connect(ledger.path) as db:
        for sql, params in [
            (MONTH_TOTALS_SQL, ["2025-01"]),
            report_query("2025-01"),
            report_query("2025-01", key="dev"),
            report_query("2025-01", model="m1"),
            report_query("2025-01", key="dev", model="m1"),
            report_query(None, key="dev"),
        ]:
            details = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
            plans.append(details)
            table_steps = [d for d in details if "monthly" in d or "requests" in d]
            assert table_steps, details
            assert all(d.startswith("SEARCH monthly USING") for d in table_steps), details
    # Every month of every key: a walk over the small rollup, still never `requests`.
    with sqlite3.connect(ledger.path) as db:
        sql, params = report_query()
        details = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    assert details and all("monthly" in d for d in details), details
    assert not any("requests" in d for details in [*plans, details] for d in details)


# --- failures ------------------------------------------------------------------------------------------


async def test_disk_errors_keep_rows_until_healed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. Every write fails halfway (the INSERT ran, the rollup UPSERT fails). 2. record()
    keeps working and pending grows. 3. The disk heals: every row is written exactly once
    and the rollup counts each once (the failed transactions left nothing behind)."""
    fault = DiskFault(monkeypatch, on="upsert")
    errors: list[BaseException] = []
    led = Ledger(make_cfg(tmp_path, flush_ms=10))
    led.on_flush_error = errors.append
    await led.open()
    for i in range(10):
        led.record(row(i))
    await wait_until(lambda: led.write_errors >= 3)
    assert not led.healthy
    for i in range(10, 20):
        led.record(row(i))
    assert led.pending_rows == 20
    fault.failing = False
    await wait_until(lambda: led.pending_rows == 0)
    assert led.healthy and led.dropped_rows == 0
    assert all(isinstance(e, sqlite3.OperationalError) for e in errors)
    assert len(errors) == led.write_errors == fault.calls
    await led.close()
    assert query(led.path, "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM requests") == [(20, 20)]
    assert query(led.path, "SELECT requests, prompt_tokens FROM monthly") == [(20, 200)]


async def test_replaced_file_is_reopened(tmp_path: Path) -> None:
    """1. The db file is deleted and a directory takes its place: writes fail, rows wait.
    2. The directory goes: the ledger creates a fresh file and writes the waiting rows."""
    led = Ledger(make_cfg(tmp_path))
    await led.open()
    led.record(row(0))
    assert await led.flush()
    for suffix in ("", "-wal", "-shm"):
        Path(led.path + suffix).unlink(missing_ok=True)
    os.mkdir(led.path)
    for i in range(1, 6):
        led.record(row(i))
    assert not await led.flush()
    assert not await led.flush()
    assert (led.pending_rows, led.write_errors) == (5, 2)
    os.rmdir(led.path)
    assert await led.flush()
    assert led.pending_rows == 0
    await led.close()
    assert query(led.path, "SELECT COUNT(*) FROM requests") == [(5,)]


async def test_pending_rows_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = DiskFault(monkeypatch)
    drops: list[int] = []
    led = Ledger(make_cfg(tmp_path, max_pending_rows=10))
    led.on_drop = drops.append
    await led.open()
    for i in range(15):
        led.record(row(i))
    assert (led.pending_rows, led.dropped_rows, sum(drops)) == (10, 5, 5)
    assert not await led.flush()  # the failed batch goes back without losing more
    assert (led.pending_rows, led.dropped_rows) == (10, 5)
    fault.failing = False
    assert await led.flush()
    await led.close()
    # The oldest rows were the ones dropped.
    ids = [r[0] for r in query(led.path, "SELECT request_id FROM requests ORDER BY id")]
    assert ids == [f"req-{i}" for i in range(5, 15)]


async def test_rows_arriving_during_a_failed_write_keep_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. Ten rows are being written. 2. Five more arrive meanwhile. 3. The write fails and
    its rows go back in front: fifteen, so the five oldest are dropped."""
    fault = DiskFault(monkeypatch)
    led = Ledger(make_cfg(tmp_path, max_pending_rows=10))
    await led.open()
    for i in range(10):
        led.record(row(i))

    def five_more() -> None:
        for i in range(10, 15):
            led.record(row(i))

    fault.during = five_more
    assert not await led.flush()
    assert (led.pending_rows, led.dropped_rows) == (10, 5)
    fault.failing = False
    assert await led.flush()
    await led.close()
    ids = [r[0] for r in query(led.path, "SELECT request_id FROM requests ORDER BY id")]
    assert ids == [f"req-{i}" for i in range(5, 15)]


async def test_close_writes_everything(tmp_path: Path) -> None:
    led = Ledger(make_cfg(tmp_path))
    await led.open()
    for i in range(7):
        led.record(row(i))
    await led.close()  # no explicit flush
    assert query(led.path, "SELECT COUNT(*) FROM requests") == [(7,)]
    led.record(row(8))  # too late: counted, not raised
    assert led.dropped_rows == 1
    await led.close()  # idempotent


async def test_close_on_a_dead_disk_counts_the_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    DiskFault(monkeypatch)
    led = Ledger(make_cfg(tmp_path))
    await led.open()
    for i in range(4):
        led.record(row(i))
    await led.close()
    assert (led.dropped_rows, led.pending_rows, led.write_errors) == (4, 0, usage.CLOSE_ATTEMPTS)


async def test_hooks_report_and_survive_their_own_errors(ledger: Ledger) -> None:
    seen: list[tuple[int, float]] = []

    def on_flush(rows: int, seconds: float) -> None:
        seen.append((rows, seconds))
        raise RuntimeError("a broken metrics hook")

    ledger.on_flush = on_flush
    ledger.record(row(1))
    ledger.record(row(2))
    assert await ledger.flush()
    # the write really took time (a monotonic clock over a SQLite transaction), and not a
    # timestamp or milliseconds by mistake
    assert len(seen) == 1 and seen[0][0] == 2 and 0 < seen[0][1] < 10


def test_abandoned_ledger_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """asyncio.run() ends with an error before close(): the connection's thread must not
    keep the interpreter from exiting."""
    script = textwrap.dedent(
        f"""
        import asyncio
        from llmd.config import UsageConfig
        from llmd.usage import Ledger

        async def main():
            led = Ledger(UsageConfig(path={str(tmp_path / "u.sqlite3")!r}))
            await led.open()
            raise SystemExit(3)

        asyncio.run(main())
        """
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, timeout=30, capture_output=True)
    assert proc.returncode == 3, proc.stderr


# --- reports ---------------------------------------------------------------------------------------------


async def test_report_file_reads_while_the_ledger_writes(ledger: Ledger) -> None:
    ledger.record(row(1, key="dev", model="m1", prompt=100, completion=20, cached=4))
    ledger.record(row(2, key="dev", model="m1", outcome=Outcome.TIMEOUT, prompt=10, completion=0))
    ledger.record(row(3, key="ci", model="m2", prompt=1, completion=2))
    await ledger.flush()
    expected = [
        ReportRow(
            month="2025-01", key_id="ci", model="m2", requests=1, prompt_tokens=1,
            completion_tokens=2, total_tokens=3, cached_tokens=0, errors=0,
        ),
        ReportRow(
            month="2025-01", key_id="dev", model="m1", requests=2, prompt_tokens=110,
            completion_tokens=20, total_tokens=130, cached_tokens=4, errors=1,
        ),
    ]  # fmt: skip
    assert report_file(ledger.path, month="2025-01") == expected
    assert await ledger.report(month="2025-01") == expected
    assert report_file(ledger.path, month="2025-01", key="ci") == expected[:1]
    assert report_file(ledger.path, month="2025-01", model="m1") == expected[1:]
    assert report_file(ledger.path, month="2025-02") == []

    # The ledger keeps writing while a reader has looked.
    ledger.record(row(4, key="ci", model="m2"))
    assert await ledger.flush()
    assert report_file(ledger.path, month="2025-01", key="ci")[0].requests == 2


async def test_report_without_a_month_lists_every_month(ledger: Ledger) -> None:
    ledger.record(row(1, ts=month_start("2025-02")))
    ledger.record(row(2))  # January 2025
    ledger.record(row(3, key="ci"))
    await ledger.flush()
    rows = await ledger.report()
    assert [(r.month, r.key_id, r.requests) for r in rows] == [
        ("2025-01", "ci", 1),
        ("2025-01", "dev", 1),
        ("2025-02", "dev", 1),
    ]
    assert report_file(ledger.path) == rows
    assert [r.month for r in report_file(ledger.path, key="dev")] == ["2025-01", "2025-02"]


def test_report_file_errors(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no such file"):
        report_file(str(tmp_path / "missing.sqlite3"))
    with pytest.raises(ValueError, match="month"):
        report_file(str(tmp_path / "missing.sqlite3"), month="May")
    empty = tmp_path / "empty.sqlite3"
    sqlite3.connect(empty).close()
    assert report_file(str(empty), month="2025-01") == []


def _rows() -> list[ReportRow]:
    return [
        ReportRow(
            month="2025-01", key_id="ci-bot", model="gemma-3-270m", requests=3, prompt_tokens=1200,
            completion_tokens=300, total_tokens=1500, cached_tokens=0, errors=1,
        ),
        ReportRow(
            month="2025-01", key_id="dev-team", model="llama-70b", requests=12, prompt_tokens=5,
            completion_tokens=7, total_tokens=12, cached_tokens=2, errors=0, cache_hits=4,
        ),
    ]  # fmt: skip


def test_format_report_table() -> None:
    lines = format_report(_rows(), "table").splitlines()
    assert lines[0].split() == [
        "MONTH", "KEY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL", "CACHED", "ERRORS", "CACHE_HITS",
    ]  # fmt: skip
    assert lines[1].split() == ["2025-01", "ci-bot", "gemma-3-270m", "3", "1200", "300", "1500", "0", "1", "0"]
    assert lines[3].split() == ["total", "15", "1205", "307", "1512", "2", "1", "4"]
    # numbers are right-aligned: every line's REQUESTS column ends at the same place
    end = lines[0].index("REQUESTS") + len("REQUESTS")
    assert {line[end - 2 : end] for line in lines[1:]} == {" 3", "12", "15"}
    assert "no usage" in format_report([], "table")


def test_format_report_csv_and_json() -> None:
    rows = _rows()
    parsed = list(csv.DictReader(io.StringIO(format_report(rows, "csv"))))
    assert parsed[1] == {
        "month": "2025-01", "key_id": "dev-team", "model": "llama-70b", "requests": "12",
        "prompt_tokens": "5", "completion_tokens": "7", "total_tokens": "12", "cached_tokens": "2",
        "errors": "0", "cache_hits": "4",
    }  # fmt: skip
    assert msgspec.json.decode(format_report(rows, "json"), type=list[ReportRow]) == rows
    assert msgspec.json.decode(format_report([], "json")) == []
    with pytest.raises(ValueError):
        format_report(rows, "xml")  # type: ignore[arg-type]
