"""Per-key limits shared through Redis (``limits.store: redis``): N llmd behind one name hold a
key to its limits together, exactly as one llmd alone does (the scripts: redisscripts.py).

One round trip per admission (the ADMIT script decides and takes everything) and one per settle
(SETTLE, sent after the response, off the request path). Concurrency slots and monthly-quota
reservations are leases: each llmd renews the leases of its running requests every
``lease_s / 3``; those of an llmd that was killed (kill -9, a lost host) expire at most
``limits.lease_s`` after its last renewal. (Token-window reservations need no lease: they leave
the window after a minute anyway.)

Redis unreachable (refused, reset, or slower than ``limits.timeout_ms``) is decided by
``limits.on_store_error``: ``fail_closed`` answers 503 ``limits_unavailable`` (no request goes
unlimited); ``local`` admits against this process's own in-memory limits (each llmd then
allows a key the full limit on its own). Either way ``llmd_limit_store_errors_total`` counts
it, a warning is logged (at most every 30 s), /readyz says so, and Redis is asked again after
at most ``RETRY_AFTER_S``. Settles that fail are kept (bounded) and sent when Redis is back,
so monthly totals do not forget tokens that were served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .auth import Principal
from .config import LimitsConfig
from .errors import ApiError, RateLimited, limits_unavailable, quota_exhausted
from .limits import HOUR, MINUTE, Grant, KeyState, Limiter, MonthlyCounter, _counted, _duration
from .months import seconds_to_next_month
from .redisscripts import ADMIT, RENEW, SEED, SETTLE
from .resp import ReplyError, RespClient, StoreError

log = logging.getLogger("llmd.limits")

# After a failure, requests do not wait on Redis again for this long. Short: a refused connection
# costs nothing to retry, and one slow reply should not refuse (fail_closed) for long.
RETRY_AFTER_S = 0.25
MAX_PENDING_SETTLES = 100_000  # settles kept while Redis is away; beyond: the oldest are dropped
LOG_EVERY_S = 30.0
STORE_ERRORS = (StoreError, OSError, TimeoutError)


class RedisStore:
    """The process-long side: the client, the scripts, the lease renewer, health and the settles
    waiting for Redis. A Runtime's SharedLimiter uses it; a reload keeps it."""

    def __init__(self, cfg: LimitsConfig, url: str | None = None) -> None:
        self.cfg = cfg
        self.url = url if url is not None else os.environ.get(cfg.url_env, "")
        if not self.url:
            raise ValueError(f"limits.store is redis but {cfg.url_env} (limits.url_env) is empty")
        # One pipelined connection (resp.py): concurrent calls share it, those of one tick in one write.
        self.client = RespClient(self.url, cfg.timeout_ms / 1000)
        self.client.on_connect = self._connected
        # The ledger's monthly totals (Services sets it): sent again after Redis was away, since a
        # restarted Redis (no persistence) would otherwise start every quota of the month from 0.
        self.month_totals: Callable[[], Awaitable[tuple[str, dict[str, int]]]] | None = None
        # grant id -> its leased sets (concurrency, monthly reservation), while the request runs
        self.leases: dict[str, tuple[str, ...]] = {}
        self.pending: deque[tuple[list[str], list[Any]]] = deque()  # settles Redis has not taken yet
        self.healthy = True
        self.errors = 0
        self.dropped_settles = 0
        self.on_error: Callable[[str], None] | None = None  # metrics hook: the operation that failed
        self._failed_at = float("-inf")
        self._logged_at = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None

    def key(self, key_id: str, part: str) -> str:
        return f"{self.cfg.prefix}{{{key_id}}}:{part}"

    @property
    def where(self) -> str:
        return self.url.split("@")[-1]  # without a password

    async def open(self) -> None:
        """Check that Redis answers (a warning, not a failure: on_store_error decides per request)."""
        try:
            await self.client.call("PING")
        except STORE_ERRORS as e:
            self.failed("open", e)
        else:
            log.info("limits: shared through redis %s (lease %gs, on_store_error %s)",
                     self.where, self.cfg.lease_s, self.cfg.on_store_error)  # fmt: skip
        self._renewer = asyncio.create_task(self._renew_loop(), name="llmd-limits-leases")

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self.pending and self.usable():
            await self._send_pending()
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.client.close()

    # --- health ------------------------------------------------------------------------------

    def usable(self) -> bool:
        """False for RETRY_AFTER_S after a failure: requests then do not wait on a dead Redis."""
        return self.healthy or time.monotonic() - self._failed_at >= RETRY_AFTER_S

    def failed(self, op: str, e: BaseException) -> None:
        self.errors += 1
        if self.on_error is not None:
            self.on_error(op)
        if isinstance(e, ReplyError):
            # Redis answered: it is reachable, so no request should stop asking it. A bug.
            log.error("limits: redis %s refused %s: %s", self.where, op, e)
            return
        self._failed_at = time.monotonic()
        was, self.healthy = self.healthy, False
        if was or time.monotonic() - self._logged_at >= LOG_EVERY_S:
            self._logged_at = time.monotonic()
            log.warning("limits: redis %s unreachable (%s: %s: %s); on_store_error=%s; %d store errors since start",
                        self.where, op, type(e).__name__, e, self.cfg.on_store_error, self.errors)  # fmt: skip

    def succeeded(self) -> None:
        if not self.healthy:
            log.warning("limits: redis %s answers again after %d store errors", self.where, self.errors)
            self.healthy = True

    # --- operations ----------------------------------------------------------------------------

    async def admit(self, keys: list[str], args: list[Any]) -> list[Any]:
        try:
            reply = await self.client.script(ADMIT, keys, args)
        except STORE_ERRORS as e:
            self.failed("admit", e)
            raise
        self.succeeded()
        return reply

    def settle(self, keys: list[str], args: list[Any]) -> None:
        """Send a settle in the background (the response is already on its way)."""
        task = asyncio.create_task(self._settle_now(keys, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_now(self, keys: list[str], args: list[Any]) -> None:
        if self.usable():
            try:
                await self.client.script(SETTLE, keys, args)
                self.succeeded()
                return
            except STORE_ERRORS as e:
                self.failed("settle", e)
                if isinstance(e, ReplyError):
                    return  # it would fail again; its lease and reservations lapse on their own
        self.pending.append((keys, args))
        if len(self.pending) > MAX_PENDING_SETTLES:
            self.pending.popleft()
            self.dropped_settles += 1

    async def _send_pending(self) -> None:
        while self.pending:
            keys, args = self.pending[0]
            try:
                await self.client.script(SETTLE, keys, args)
            except ReplyError as e:
                self.failed("settle", e)  # dropped, as above
            except STORE_ERRORS as e:
                self.failed("settle", e)
                return
            self.pending.popleft()
        self.succeeded()

    async def seed_month(self, month: str, totals: dict[str, int]) -> None:
        """Monthly counters up to the ledger's totals (never lowered: other hosts count too)."""
        if not totals:
            return
        keys = list(totals)
        try:
            await self.client.script(SEED, [self.key(k, f"m:{month}") for k in keys], [totals[k] for k in keys])
        except STORE_ERRORS as e:
            self.failed("seed", e)

    def _connected(self, n: int) -> None:
        if n > 1 and self.month_totals is not None:
            task = asyncio.create_task(self._reseed())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _reseed(self) -> None:
        assert self.month_totals is not None
        try:
            month, totals = await self.month_totals()
        except Exception as e:  # the ledger may be away too; the next reconnection tries again
            log.warning("limits: cannot read the month's totals to seed redis again: %s", e)
            return
        await self.seed_month(month, totals)
        log.info("limits: monthly counters of %d keys seeded again after redis was away", len(totals))

    async def _renew_loop(self) -> None:
        every = self.cfg.lease_s / 3
        while True:
            await asyncio.sleep(every)
            if self.pending and self.usable():
                await self._send_pending()
            leases = [(key, gid) for gid, keys in list(self.leases.items()) for key in keys]
            if not leases:
                if not self.healthy:  # nobody asks while fail_closed refuses: see whether Redis is back
                    with contextlib.suppress(*STORE_ERRORS):
                        await self.client.call("PING")
                        self.succeeded()
                continue
            try:
                await self.client.script(RENEW, [k for k, _ in leases], [self.cfg.lease_s, *(g for _, g in leases)])
                self.succeeded()
            except STORE_ERRORS as e:
                self.failed("renew", e)
            except Exception:  # a bug must not end the renewals: every lease would lapse
                log.exception("limits: lease renewal failed")


class SharedGrant(Grant):
    __slots__ = ("entry_tokens", "gid")

    def __init__(self, limiter: Limiter, principal: Principal, gid: str, entry_tokens: int, reserved: int,
                 tokens: bool) -> None:  # fmt: skip
        super().__init__(limiter, principal, None, reserved, tokens)
        self.gid = gid
        self.entry_tokens = entry_tokens


class SharedLimiter(Limiter):
    """Limiter whose decisions are Redis's (see the module docstring). The in-process state it
    inherits serves only ``on_store_error: local`` while Redis is away."""

    def __init__(self, store: RedisStore, states: dict[str, KeyState] | None = None,
                 monthly: MonthlyCounter | None = None) -> None:  # fmt: skip
        super().__init__(states, monthly)
        self.store = store
        self._views: dict[str, dict[str, str]] = {}  # key -> x-ratelimit-* headers of its last answer

    async def acquire(self, p: Principal, reserve: int, *, requests: bool = True, tokens: bool = True) -> Grant:
        store = self.store
        if not store.usable():
            return self._store_down(p, reserve, requests, tokens, "not answering")
        lim = p.limits if requests and tokens else _counted(p.limits, requests, tokens)
        now = time.time()
        self.monthly.roll(now)
        gid = uuid.uuid4().hex
        key = store.key
        keys = [key(p.key_id, "conc"), key(p.key_id, "rpm"), key(p.key_id, "rph"), key(p.key_id, "tpm"),
                key(p.key_id, "tpmv"), key(p.key_id, f"m:{self.monthly.month}"), key(p.key_id, "mlease"),
                key(p.key_id, "mres")]  # fmt: skip
        args = [gid, store.cfg.lease_s, lim.max_concurrent or 0, lim.requests_per_minute or 0,
                lim.requests_per_hour or 0, lim.tokens_per_minute or 0, reserve, lim.monthly_tokens or 0]  # fmt: skip
        call = asyncio.ensure_future(store.admit(keys, args))
        try:
            # Shielded: a client that hangs up while Redis decides must not leave a slot taken.
            reply = await asyncio.shield(call)
        except STORE_ERRORS as e:
            return self._store_down(p, reserve, requests, tokens, f"{type(e).__name__}: {e}")
        except asyncio.CancelledError:
            entry, reserved = reserve * bool(lim.tokens_per_minute), reserve * bool(lim.monthly_tokens)
            call.add_done_callback(lambda c: self._undo(c, p, gid, entry, reserved))
            raise
        ok, reason, detail, rnow, rcount, roldest, tsum, toldest = reply
        self._views[p.key_id] = self._view(p, float(rnow), int(rcount), float(roldest), int(tsum), float(toldest))
        if not int(ok):
            raise self._refusal(p, reserve, _text(reason), _text(detail), int(tsum))
        leased = (keys[0],) * bool(lim.max_concurrent) + (keys[6],) * bool(lim.monthly_tokens)
        if leased:
            store.leases[gid] = leased
        entry = reserve if lim.tokens_per_minute is not None else 0
        return SharedGrant(self, p, gid, entry, reserve if tokens else 0, tokens)

    def _undo(self, call: asyncio.Future[list[Any]], p: Principal, gid: str, entry: int, reserved: int) -> None:
        """Settle at 0 what Redis granted to a request that was cancelled meanwhile."""
        if call.cancelled() or call.exception() is not None or not int(call.result()[0]):
            return
        self._release(SharedGrant(self, p, gid, entry, reserved, True), 0)

    def _store_down(self, p: Principal, reserve: int, requests: bool, tokens: bool, detail: str) -> Grant:
        if self.store.cfg.on_store_error == "local":
            return self.admit(p, reserve, requests=requests, tokens=tokens)
        raise limits_unavailable(detail)

    def _release(self, g: Grant, used_tokens: int, now: float | None = None) -> None:
        if not isinstance(g, SharedGrant):
            super()._release(g, used_tokens, now)  # admitted locally while Redis was away
            return
        store, key = self.store, g.principal.key_id
        store.leases.pop(g.gid, None)
        used_tokens = max(0, used_tokens)
        self.monthly.add(key, used_tokens)  # rolls the month; the local count only serves `local`
        mres = g.reserved if g.principal.limits.monthly_tokens else 0
        month = f"m:{self.monthly.month}"
        keys = [store.key(key, "conc"), store.key(key, "tpm"), store.key(key, "tpmv"), store.key(key, month),
                store.key(key, "mlease"), store.key(key, "mres")]  # fmt: skip
        store.settle(keys, [g.gid, used_tokens, g.entry_tokens, mres])

    async def seed_month(self, month: str, totals: dict[str, int]) -> None:
        await super().seed_month(month, totals)
        await self.store.seed_month(month, totals)

    def headers(self, p: Principal, now: float | None = None) -> dict[str, str]:
        view = self._views.get(p.key_id)
        return dict(view) if view is not None else super().headers(p, now)

    @staticmethod
    def _view(p: Principal, now: float, rcount: int, roldest: float, tsum: int, toldest: float) -> dict[str, str]:
        lim = p.limits
        out: dict[str, str] = {}
        req_limit, window = (
            (lim.requests_per_minute, MINUTE) if lim.requests_per_minute is not None else (lim.requests_per_hour, HOUR)
        )
        if req_limit is not None:
            reset = roldest + window - now if rcount else 0.0
            out["x-ratelimit-limit-requests"] = str(req_limit)
            out["x-ratelimit-remaining-requests"] = str(max(0, req_limit - rcount))
            out["x-ratelimit-reset-requests"] = _duration(max(0.0, reset))
        if lim.tokens_per_minute is not None:
            reset_t = toldest + MINUTE - now if toldest else 0.0
            out["x-ratelimit-limit-tokens"] = str(lim.tokens_per_minute)
            out["x-ratelimit-remaining-tokens"] = str(max(0, lim.tokens_per_minute - tsum))
            out["x-ratelimit-reset-tokens"] = _duration(max(0.0, reset_t))
        return out

    def _refusal(self, p: Principal, reserve: int, reason: str, detail: str, tsum: int) -> ApiError:
        """The same 429s, messages and Retry-After as limits.Limiter.admit."""
        lim, k = p.limits, p.key_id
        tier = f" of tier '{p.tier}'" if p.tier else ""
        if reason == "concurrency":
            msg = f"Too many concurrent requests for key '{k}': max_concurrent={lim.max_concurrent}{tier}."
            return RateLimited(msg, 1.0, "concurrency")
        if reason == "requests_per_minute":
            msg = f"Rate limit reached for key '{k}': requests_per_minute={lim.requests_per_minute}{tier}."
            return RateLimited(msg, float(detail), reason)
        if reason == "requests_per_hour":
            msg = f"Rate limit reached for key '{k}': requests_per_hour={lim.requests_per_hour}{tier}."
            return RateLimited(msg, float(detail), reason)
        if reason == "tokens_too_large":
            msg = (f"Request too large for key '{k}': it may use {reserve} tokens (prompt estimate + max_tokens), "
                   f"tokens_per_minute={lim.tokens_per_minute}{tier}. Lower max_tokens or the prompt.")  # fmt: skip
            return RateLimited(msg, MINUTE, "tokens_per_minute")
        if reason == "tokens_per_minute":
            msg = (f"Rate limit reached for key '{k}': tokens_per_minute={lim.tokens_per_minute}{tier} "
                   f"({tsum} used or reserved in the last minute, this request reserves {reserve}).")  # fmt: skip
            return RateLimited(msg, float(detail), reason)
        now = time.time()
        return quota_exhausted(
            f"Monthly token quota exhausted for key '{k}': monthly_tokens={lim.monthly_tokens}{tier} "
            f"({detail} used in {self.monthly.month} UTC).",
            seconds_to_next_month(now),
        )


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
