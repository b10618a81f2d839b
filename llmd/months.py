"""UTC months, the unit of monthly quotas, the usage rollup and reports.

Every part of llmd that names a month uses these helpers, so that the limiter, the ledger and
``llmd usage`` can never disagree about which month a request belongs to (the local time zone
never matters). A month is written ``YYYY-MM``.
"""

from __future__ import annotations

import calendar
import re
import time

# fullmatch and [0-9]: "$" passes "2025-01\n" and \d passes other scripts' digits.
_MONTH_RE = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def month_of(ts: float) -> str:
    """``YYYY-MM`` of unix time ``ts`` in UTC. Raises (TypeError, ValueError, OverflowError,
    OSError) for what ``time.gmtime`` refuses, which the ledger relies on to drop a malformed row."""
    t = time.gmtime(ts)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


def current_month() -> str:
    """The UTC month now."""
    return month_of(time.time())


def check_month(month: str) -> str:
    """``month`` itself if it is a valid ``YYYY-MM``; else ValueError with a message for users."""
    if not _MONTH_RE.fullmatch(month):
        raise ValueError(f"month must look like 2025-01, got {month!r}")
    return month


def month_start(month: str) -> float:
    """Unix time of the first second of ``month`` (UTC)."""
    year, mon = check_month(month).split("-")
    return float(calendar.timegm((int(year), int(mon), 1, 0, 0, 0)))


def seconds_to_next_month(ts: float) -> float:
    """Seconds from ``ts`` to the first second of the next UTC month (a quota's Retry-After)."""
    t = time.gmtime(ts)
    nxt = calendar.timegm((t.tm_year + (t.tm_mon == 12), t.tm_mon % 12 + 1, 1, 0, 0, 0))
    return nxt - ts
