"""Per-key limits: sliding request windows, reserved-then-settled token windows, concurrency
and monthly quota.

Why these shapes:
- Request windows are sliding logs (timestamps of admitted requests), so no fixed bucket
  lets 2x the limit through at a boundary.
- Tokens per minute are *reserved* at admission (prompt estimate + max_tokens or the tier
  default) and *settled* to the real usage when the response ends, so 50 concurrent requests
  cannot overshoot the limit by 50x while each is still running.
- Concurrency is a counter released on every exit path through ``Grant.release``.
- Monthly tokens are counted per key and UTC month; counters are loaded from the usage
  ledger's rollup at start (``MonthlyCounter.load``) so a restart forgets nothing.

State lives in ``KeyState`` objects keyed by key id, handed from the old Limiter to the new
one on reload so that unchanged keys keep their windows.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec

from .auth import Principal
from .config import LimitFields
from .errors import RateLimited, quota_exhausted
from .months import month_of, month_start, seconds_to_next_month

MINUTE = 60.0
HOUR = 3600.0
DEFAULT_COMPLETION_RESERVE = 256  # reserved when neither the request nor the tier names max_tokens


class _TokenEntry:
    __slots__ = ("live", "tokens", "ts")

    def __init__(self, ts: float, tokens: int) -> None:
        self.ts = ts
        self.tokens = tokens
        self.live = True  # False once it left the window; settling it then changes nothing


@dataclass
class KeyState:
    minute: deque[float] = field(default_factory=deque)  # admission times, last 60 s
    hour: deque[float] = field(default_factory=deque)  # admission times, last 3600 s
    tokens: deque[_TokenEntry] = field(default_factory=deque)
    tokens_in_window: int = 0
    in_flight: int = 0

    def prune(self, now: float) -> None:
        while self.minute and self.minute[0] <= now - MINUTE:
            self.minute.popleft()
        while self.hour and self.hour[0] <= now - HOUR:
            self.hour.popleft()
        while self.tokens and self.tokens[0].ts <= now - MINUTE:
            e = self.tokens.popleft()
            e.live = False
            self.tokens_in_window -= e.tokens

    def tokens_reset_s(self, now: float, need: int, limit: int) -> float:
        """Seconds until the window has room for ``need`` more tokens."""
        excess = self.tokens_in_window + need - limit
        for e in self.tokens:
            excess -= e.tokens
            if excess <= 0:
                return e.ts + MINUTE - now
        return MINUTE


class MonthlyCounter:
    """Tokens used per key this month (UTC). The one interface the ledger backs: it is
    loaded from the ledger's rollup at start and added to as responses settle."""

    def __init__(self) -> None:
        now = time.time()
        self.month = month_of(now)
        self._month_span = (month_start(self.month), now + seconds_to_next_month(now))
        self.used: dict[str, int] = {}
        self.reserved: dict[str, int] = {}

    def load(self, month: str, totals: dict[str, int]) -> None:
        if month == self.month:
            for key, n in totals.items():
                self.used[key] = max(self.used.get(key, 0), n)

    def roll(self, now: float) -> None:
        if self._month_span[0] <= now < self._month_span[1]:
            return  # the common case, without working out a month per request
        m = month_of(now)
        if m != self.month:
            # Reservations of requests still running carry over: they settle into the new month.
            self.month, self.used = m, {}
        self._month_span = (month_start(self.month), now + seconds_to_next_month(now))

    def add(self, key_id: str, tokens: int, now: float | None = None) -> None:
        # Roll first: tokens settled after a month boundary belong to the new month, for every
        # key (not only keys with a monthly limit, whose admissions also roll).
        self.roll(time.time() if now is None else now)
        self.used[key_id] = self.used.get(key_id, 0) + tokens


class Grant:
    """What admission took for one request; settle() and release() give it back exactly once."""

    __slots__ = ("_limiter", "entry", "principal", "released", "reserved", "tokens")

    def __init__(
        self, limiter: Limiter, principal: Principal, entry: _TokenEntry | None, reserved: int, tokens: bool = True
    ) -> None:
        self._limiter = limiter
        self.principal = principal
        self.entry = entry
        self.reserved = reserved
        self.released = False
        self.tokens = tokens  # False: its tokens count against no token limit (a cache hit, by default)

    def release(self, used_tokens: int, now: float | None = None) -> None:
        """The request ended (any way): free its concurrency slot, settle tokens to real usage."""
        if self.released:
            return
        self.released = True
        self._limiter._release(self, used_tokens if self.tokens else 0, now)


class Limiter:
    def __init__(self, states: dict[str, KeyState] | None = None, monthly: MonthlyCounter | None = None) -> None:
        self.states: dict[str, KeyState] = states if states is not None else {}
        self.monthly = monthly or MonthlyCounter()

    def state(self, key_id: str) -> KeyState:
        s = self.states.get(key_id)
        if s is None:
            s = self.states[key_id] = KeyState()
        return s

    def reserve_for(self, p: Principal, prompt_estimate: int, max_tokens: int | None, n: int = 1) -> int:
        """Tokens to hold for one request: the prompt estimate plus what it may generate
        (max_tokens per choice x n, or the tier's default). Never below the prompt estimate,
        whatever the caller passes: a reservation is what keeps concurrent requests honest."""
        per_choice = max_tokens if max_tokens is not None else p.limits.default_max_tokens
        completion = (per_choice or DEFAULT_COMPLETION_RESERVE) * max(1, n)
        return max(1, prompt_estimate) + max(0, completion)

    def admit(
        self, p: Principal, reserve: int, now: float | None = None, *, requests: bool = True, tokens: bool = True
    ) -> Grant:
        """Admit one request or raise a 429 ApiError (with Retry-After). A cache hit may count
        as no request (``requests``: concurrency and request windows) or no tokens (``tokens``:
        tokens_per_minute and monthly_tokens), per its tier's cache_hit_* settings."""
        now = time.time() if now is None else now
        lim = p.limits
        s = self.state(p.key_id)
        s.prune(now)
        tier = f" of tier '{p.tier}'" if p.tier else ""
        if not requests or not tokens:
            lim = _counted(lim, requests, tokens)
        if lim.max_concurrent is not None and s.in_flight >= lim.max_concurrent:
            raise _rate_limited(
                f"Too many concurrent requests for key '{p.key_id}': max_concurrent={lim.max_concurrent}{tier}.",
                1.0,
                "concurrency",
            )
        if lim.requests_per_minute is not None and len(s.minute) >= lim.requests_per_minute:
            raise _rate_limited(
                f"Rate limit reached for key '{p.key_id}': requests_per_minute={lim.requests_per_minute}{tier}.",
                s.minute[len(s.minute) - lim.requests_per_minute] + MINUTE - now,
                "requests_per_minute",
            )
        if lim.requests_per_hour is not None and len(s.hour) >= lim.requests_per_hour:
            raise _rate_limited(
                f"Rate limit reached for key '{p.key_id}': requests_per_hour={lim.requests_per_hour}{tier}.",
                s.hour[len(s.hour) - lim.requests_per_hour] + HOUR - now,
                "requests_per_hour",
            )
        if lim.tokens_per_minute is not None:
            if reserve > lim.tokens_per_minute:
                raise _rate_limited(
                    f"Request too large for key '{p.key_id}': it may use {reserve} tokens "
                    f"(prompt estimate + max_tokens), tokens_per_minute={lim.tokens_per_minute}{tier}. "
                    "Lower max_tokens or the prompt.",
                    MINUTE,
                    "tokens_per_minute",
                )
            if s.tokens_in_window + reserve > lim.tokens_per_minute:
                raise _rate_limited(
                    f"Rate limit reached for key '{p.key_id}': tokens_per_minute={lim.tokens_per_minute}{tier} "
                    f"({s.tokens_in_window} used or reserved in the last minute, this request reserves {reserve}).",
                    s.tokens_reset_s(now, reserve, lim.tokens_per_minute),
                    "tokens_per_minute",
                )
        if lim.monthly_tokens:
            self.monthly.roll(now)
            used = self.monthly.used.get(p.key_id, 0) + self.monthly.reserved.get(p.key_id, 0)
            if used >= lim.monthly_tokens:
                raise quota_exhausted(
                    f"Monthly token quota exhausted for key '{p.key_id}': monthly_tokens={lim.monthly_tokens}{tier} "
                    f"({used} used in {self.monthly.month} UTC).",
                    seconds_to_next_month(now),
                )
        # Admitted: take everything at once (no await between the checks and here).
        s.in_flight += 1
        if lim.requests_per_minute is not None:
            s.minute.append(now)
        if lim.requests_per_hour is not None:
            s.hour.append(now)
        entry = None
        if lim.tokens_per_minute is not None:
            entry = _TokenEntry(now, reserve)
            s.tokens.append(entry)
            s.tokens_in_window += reserve
        if lim.monthly_tokens:
            self.monthly.reserved[p.key_id] = self.monthly.reserved.get(p.key_id, 0) + reserve
        return Grant(self, p, entry, reserve if tokens else 0, tokens)

    async def acquire(self, p: Principal, reserve: int, *, requests: bool = True, tokens: bool = True) -> Grant:
        """``admit`` as the pipeline calls it: a shared store (redislimits.py) answers over the
        network; in process this is admit itself, with no await before it decides."""
        return self.admit(p, reserve, requests=requests, tokens=tokens)

    async def seed_month(self, month: str, totals: dict[str, int]) -> None:
        """Monthly totals of the ledger at start (the rollup plus rows not yet written)."""
        self.monthly.load(month, totals)

    def _release(self, g: Grant, used_tokens: int, now: float | None = None) -> None:
        key = g.principal.key_id
        s = self.state(key)
        s.in_flight -= 1
        used_tokens = max(0, used_tokens)
        now = time.time() if now is None else now
        if g.entry is not None:
            s.prune(now)  # is the reservation still in the window?
            if g.entry.live:
                s.tokens_in_window += used_tokens - g.entry.tokens
                g.entry.tokens = used_tokens
            elif used_tokens > g.entry.tokens:
                # The request outlived its window (a long stream): its reservation already left
                # the window, so the tokens beyond it count now, in the current minute.
                extra = _TokenEntry(now, used_tokens - g.entry.tokens)
                s.tokens.append(extra)
                s.tokens_in_window += extra.tokens
        if g.principal.limits.monthly_tokens and g.reserved:
            self.monthly.reserved[key] = self.monthly.reserved.get(key, 0) - g.reserved
        self.monthly.add(key, used_tokens, now)

    def headers(self, p: Principal, now: float | None = None) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for an authenticated response."""
        lim = p.limits
        out: dict[str, str] = {}
        s = self.states.get(p.key_id)
        now = time.time() if now is None else now
        req_limit, window, log = (
            (lim.requests_per_minute, MINUTE, s.minute if s else None)
            if lim.requests_per_minute is not None
            else (lim.requests_per_hour, HOUR, s.hour if s else None)
        )
        if req_limit is not None:
            if s is not None:
                s.prune(now)
            used = len(log) if log else 0
            reset = (log[0] + window - now) if log else 0.0
            out["x-ratelimit-limit-requests"] = str(req_limit)
            out["x-ratelimit-remaining-requests"] = str(max(0, req_limit - used))
            out["x-ratelimit-reset-requests"] = _duration(max(0.0, reset))
        if lim.tokens_per_minute is not None:
            used_t = s.tokens_in_window if s else 0
            reset_t = (s.tokens[0].ts + MINUTE - now) if s and s.tokens else 0.0
            out["x-ratelimit-limit-tokens"] = str(lim.tokens_per_minute)
            out["x-ratelimit-remaining-tokens"] = str(max(0, lim.tokens_per_minute - used_t))
            out["x-ratelimit-reset-tokens"] = _duration(max(0.0, reset_t))
        return out


def _counted(lim: LimitFields, requests: bool, tokens: bool) -> LimitFields:
    """The limits a request is held to when it counts as no request and/or no tokens."""
    off: dict[str, None] = {}
    if not requests:
        off.update(max_concurrent=None, requests_per_minute=None, requests_per_hour=None)
    if not tokens:
        off.update(tokens_per_minute=None, monthly_tokens=None)
    return msgspec.structs.replace(lim, **off)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: '1s', '6m0s', '1h2m3s', '250ms'."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    s = math.ceil(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


def _rate_limited(message: str, retry_after_s: float, reason: str) -> RateLimited:
    return RateLimited(message, retry_after_s, reason)
