"""Limit maths, no I/O: sliding windows, token reservation and settlement, concurrency,
monthly quota, OpenAI's x-ratelimit headers."""

from __future__ import annotations

import pytest

from llmd.auth import Principal
from llmd.config import LimitFields
from llmd.errors import ApiError
from llmd.limits import Limiter, MonthlyCounter, _duration
from llmd.months import month_of

T0 = 1_800_000_000.0  # a fixed clock


def principal(**limits: int) -> Principal:
    return Principal("k1", "standard", LimitFields(**limits), None)


def test_requests_per_minute_is_a_sliding_window_not_a_fixed_bucket() -> None:
    """1. 30 rpm, 30 requests at t=59s. 2. At t=61s (a fixed bucket would reset at 60) still
    refused: the window slides. 3. At t=59+60s the first ones leave the window."""
    lim, p = Limiter(), principal(requests_per_minute=30)
    for _ in range(30):
        lim.admit(p, 1, now=T0 + 59).release(1)
    with pytest.raises(ApiError) as e:
        lim.admit(p, 1, now=T0 + 61)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    assert "requests_per_minute=30" in e.value.message and "tier 'standard'" in e.value.message
    assert e.value.headers["Retry-After"] == "58"
    lim.admit(p, 1, now=T0 + 119.5)


def test_requests_per_hour() -> None:
    lim, p = Limiter(), principal(requests_per_hour=2)
    lim.admit(p, 1, now=T0)
    lim.admit(p, 1, now=T0 + 1000)
    with pytest.raises(ApiError) as e:
        lim.admit(p, 1, now=T0 + 2000)
    assert e.value.headers["Retry-After"] == "1600"
    lim.admit(p, 1, now=T0 + 3600.5)


def test_tokens_are_reserved_then_settled_so_concurrency_cannot_overshoot() -> None:
    """50 concurrent requests each reserving 100 tokens under tokens_per_minute=1000: only 10
    are admitted while they run. When they settle to their real 20 tokens each, room returns."""
    lim, p = Limiter(), principal(tokens_per_minute=1000)
    grants = []
    refused = 0
    for _ in range(50):
        try:
            grants.append(lim.admit(p, lim.reserve_for(p, 36, 64), now=T0))
        except ApiError:
            refused += 1
    assert len(grants) == 10 and refused == 40
    for g in grants:
        g.release(20)
    assert lim.state("k1").tokens_in_window == 200
    more = [lim.admit(p, 100, now=T0 + 1) for _ in range(8)]
    assert len(more) == 8


def test_a_request_larger_than_the_token_limit_is_refused_with_a_clear_message() -> None:
    lim, p = Limiter(), principal(tokens_per_minute=100)
    with pytest.raises(ApiError) as e:
        lim.admit(p, lim.reserve_for(p, 50, 500), now=T0)
    assert "Request too large" in e.value.message


def test_concurrency_is_released_on_every_exit_and_only_once() -> None:
    lim, p = Limiter(), principal(max_concurrent=2)
    a, b = lim.admit(p, 1, now=T0), lim.admit(p, 1, now=T0)
    with pytest.raises(ApiError) as e:
        lim.admit(p, 1, now=T0)
    assert e.value.headers["Retry-After"] == "1"
    a.release(0)
    a.release(0)  # a second release (e.g. two finally blocks) must not free a slot twice
    lim.admit(p, 1, now=T0)
    with pytest.raises(ApiError):
        lim.admit(p, 1, now=T0)
    b.release(0)


def test_monthly_quota_counts_from_the_ledger_and_says_insufficient_quota() -> None:
    monthly = MonthlyCounter()
    monthly.month = month_of(T0)
    monthly.load(month_of(T0), {"k1": 900})
    lim, p = Limiter(monthly=monthly), principal(monthly_tokens=1000)
    g = lim.admit(p, 50, now=T0)
    g.release(120, now=T0)  # settled in T0's month, like the admission
    assert monthly.used["k1"] == 1020
    with pytest.raises(ApiError) as e:
        lim.admit(p, 1, now=T0)
    assert e.value.status == 429 and e.value.type == "insufficient_quota" and e.value.code == "insufficient_quota"
    assert int(e.value.headers["Retry-After"]) > 0


def test_monthly_counter_rolls_over_at_utc_month_start() -> None:
    m = MonthlyCounter()
    m.month = "2020-01"
    m.used = {"k1": 5}
    m.roll(T0)
    assert m.month == month_of(T0) and m.used == {}


def test_openai_rate_limit_headers() -> None:
    lim, p = Limiter(), principal(requests_per_minute=10, tokens_per_minute=1000)
    lim.admit(p, 100, now=T0).release(40)
    h = lim.headers(p, now=T0 + 15)
    assert h["x-ratelimit-limit-requests"] == "10"
    assert h["x-ratelimit-remaining-requests"] == "9"
    assert h["x-ratelimit-reset-requests"] == "45s"
    assert h["x-ratelimit-limit-tokens"] == "1000"
    assert h["x-ratelimit-remaining-tokens"] == "960"
    assert h["x-ratelimit-reset-tokens"] == "45s"


def test_unlimited_key_gets_no_headers_and_no_state_growth() -> None:
    lim, p = Limiter(), principal()
    for _ in range(100):
        lim.admit(p, 10, now=T0).release(10)
    assert lim.headers(p) == {}
    s = lim.state("k1")
    assert not s.minute and not s.tokens and s.in_flight == 0


def test_duration_format() -> None:
    assert _duration(0.25) == "250ms"
    assert _duration(6) == "6s"
    assert _duration(360) == "6m0s"
    assert _duration(3723) == "1h2m3s"
