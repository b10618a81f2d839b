"""Usage reports: per (month, key, model) totals read from the ledger's rollup, and their
table/csv/json forms. ``llmd usage`` reads the file directly (``report_file``); ``/admin/usage``
asks the running ledger (``Ledger.report``), which runs the same query.
"""

from __future__ import annotations

import contextlib
import csv
import io
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from .months import check_month
from .schema import BUSY_TIMEOUT_MS, LedgerError

CACHE_HITS_VERSION = 2  # the migration that added monthly.cache_hits (schema.MIGRATIONS)


class ReportRow(msgspec.Struct, kw_only=True):
    month: str
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    errors: int  # rows whose outcome is not "ok"
    cache_hits: int = 0  # requests the completion cache answered (their tokens cost no model time)


def report_query(
    month: str | None = None, key: str | None = None, model: str | None = None, hits: bool = True
) -> tuple[str, list[str]]:
    """The SQL and parameters of a report: one row per (month, key, model), every month when
    ``month`` is None. It reads only the rollup; with a month or a key, through an index."""
    where: list[str] = []
    params: list[str] = []
    if month is not None:
        where.append("month = ?")
        params.append(check_month(month))
    if key is not None:
        where.append("key_id = ?")
        params.append(key)
    if model is not None:
        where.append("model = ?")
        params.append(model)
    sql = (
        "SELECT month, key_id, model, requests, prompt_tokens, completion_tokens, cached_tokens, errors, "
        f"{'cache_hits' if hits else '0'} "
        f"FROM monthly {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY month, key_id, model"
    )
    return sql, params


def report_rows(rows: Iterable[Sequence[Any]]) -> list[ReportRow]:
    return [
        ReportRow(
            month=month,
            key_id=key_id,
            model=model,
            requests=requests,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cached_tokens=cached,
            errors=errors,
            cache_hits=hits,
        )
        for month, key_id, model, requests, prompt, completion, cached, errors, hits in rows
    ]


class DailyRow(msgspec.Struct, kw_only=True):
    """One (UTC day, key, tier, model) of a month: what the admin page charts."""

    day: str  # YYYY-MM-DD, UTC
    key_id: str
    tier: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    errors: int


def daily_query(month: str, key: str | None = None, model: str | None = None,
                tier: str | None = None) -> tuple[str, list[str]]:
    """Per (day, key, tier, model) totals of one month, read from ``requests`` (the rollup has
    no days) through its (month, key_id) index."""
    where = ["month = ?"]
    params = [check_month(month)]
    for column, value in (("key_id", key), ("model", model), ("tier", tier)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    sql = (
        "SELECT strftime('%Y-%m-%d', ts, 'unixepoch') AS day, key_id, tier, model, COUNT(*), "
        "SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), SUM(outcome != 'ok') "
        f"FROM requests WHERE {' AND '.join(where)} GROUP BY day, key_id, tier, model ORDER BY day, key_id, model"
    )
    return sql, params


def daily_rows(rows: Iterable[Sequence[Any]]) -> list[DailyRow]:
    return [
        DailyRow(day=day, key_id=key_id, tier=tier, model=model, requests=n, prompt_tokens=prompt,
                 completion_tokens=completion, total_tokens=prompt + completion, cached_tokens=cached, errors=errors)
        for day, key_id, tier, model, n, prompt, completion, cached, errors in rows
    ]


# --- reading from another process (`llmd usage`) ------------------------------------------------


def report_file(
    path: str, month: str | None = None, key: str | None = None, model: str | None = None
) -> list[ReportRow]:
    """A report straight from the file, read-only; safe while llmd writes it (WAL)."""
    if month is not None:
        check_month(month)  # a bad month is the caller's error before the file's
    p = Path(path)
    if not p.is_file():
        raise LedgerError(f"usage ledger {path}: no such file")
    try:
        with contextlib.closing(
            sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        ) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                return []  # created but never migrated: nothing recorded yet
            # Read-only: a file an older llmd wrote (not migrated yet) has no cache_hits column.
            sql, params = report_query(month, key, model, hits=version >= CACHE_HITS_VERSION)
            return report_rows(db.execute(sql, params).fetchall())
    except sqlite3.Error as e:
        raise LedgerError(f"usage ledger {path}: {e}") from e


_DAILY_FIELDS = tuple(f.name for f in msgspec.structs.fields(DailyRow))


def format_daily(rows: Sequence[DailyRow]) -> str:
    """CSV of daily rows, as the admin page downloads it."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_DAILY_FIELDS)
    w.writerows(msgspec.structs.astuple(r) for r in rows)
    return buf.getvalue()


_REPORT_FIELDS = tuple(f.name for f in msgspec.structs.fields(ReportRow))


def format_report(rows: Sequence[ReportRow], fmt: Literal["table", "csv", "json"] = "table") -> str:
    if fmt == "json":
        return msgspec.json.format(msgspec.json.encode(list(rows)), indent=2).decode() + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(_REPORT_FIELDS)
        w.writerows(msgspec.structs.astuple(r) for r in rows)
        return buf.getvalue()
    if fmt != "table":
        raise ValueError(f"format must be table, csv or json, got {fmt!r}")
    header = ("MONTH", "KEY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL", "CACHED", "ERRORS", "CACHE_HITS")
    lines: list[tuple[str, ...]] = [header]
    lines += [tuple(str(v) for v in msgspec.structs.astuple(r)) for r in rows]
    if len(rows) > 1:
        sums = [sum(getattr(r, f) for r in rows) for f in _REPORT_FIELDS[3:]]
        lines.append(("", "total", "", *map(str, sums)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    # Names left-aligned, numbers right-aligned so that digits line up.
    out = [
        "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    if not rows:
        out.append("(no usage recorded)")
    return "\n".join(out) + "\n"
