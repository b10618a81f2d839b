"""The operator's view: the /admin/ page (static files shipped in ``llmd/web``), its live
``/admin/events`` stream, and the JSON it reads (daily usage, keys, queues and limits).

Every data route needs an admin key (``require_admin``); the page itself holds no data, so it
is served to anyone, and its script sends the key the operator pasted (kept in the browser's
session storage) as ``Authorization: Bearer`` on each fetch, the event stream included: an
EventSource cannot send headers, and a key in a URL would end up in logs and history.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import time
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web
from aiohttp_sse import sse_response

from .appkeys import CALL, SERVICES
from .auth import Principal, hash_secret, new_secret
from .errors import ApiError, admin_required, bad_request, ledger_unavailable
from .limits import HOUR, MINUTE
from .months import current_month
from .report import format_daily
from .runtime import Runtime, Services
from .usage import LedgerError

# Headers of every /admin response: the page runs only its own script and style (no inline
# code, no other origin), is never framed, and nothing it shows is cached or leaks a referrer.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

EVENTS_TICK_S = 0.5  # how often a stream looks for a change; a snapshot goes out only when one happened
_STATIC = {"": ("index.html", "text/html"), "app.js": ("app.js", "text/javascript"), "app.css": ("app.css", "text/css")}
# fullmatch, not match + "$": "$" also matches before a trailing newline ("abc\n").
_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MONTH_RE = re.compile(r"[0-9]{4}-[0-9]{2}")
_KEYS_NEW_MAX_BYTES = 4096


def require_admin(rt: Runtime, request: web.Request) -> Principal:
    p = rt.keys.authenticate(request)
    if rt.keys.open:
        # Open mode (no keys) is loopback-only by config, but a proxy on the same host (nginx)
        # forwards remote clients from loopback: /admin/* answers only a client that is
        # itself local, so `llmd status` works on the host and nobody behind nginx sees it.
        if not _is_loopback(request[CALL].client_ip):
            raise admin_required(
                "Admin routes need an admin key; this llmd has no keys, so they answer local clients only."
            )
        return p
    if not p.admin:
        raise admin_required()
    return p


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin", _to_page)
    app.router.add_get("/admin/", _static)
    app.router.add_get("/admin/{file:app\\.(?:js|css)}", _static)
    app.router.add_get("/admin/events", events)
    app.router.add_get("/admin/usage/daily", usage_daily)
    app.router.add_get("/admin/keys", keys)
    app.router.add_post("/admin/keys/new", keys_new)


# --- the page ------------------------------------------------------------------------------------


async def _to_page(request: web.Request) -> web.Response:
    # Returned, not raised: the middleware renders raised HTTP errors as API envelopes.
    return web.Response(status=308, headers={"Location": "/admin/"})


def _read_static(name: str) -> bytes:
    return resources.files("llmd").joinpath("web", name).read_bytes()


async def _static(request: web.Request) -> web.Response:
    name, ctype = _STATIC[request.match_info.get("file", "")]
    return web.Response(body=_read_static(name), content_type=ctype, charset="utf-8")


async def on_prepare(request: web.Request, resp: web.StreamResponse) -> None:
    if request.path == "/admin" or request.path.startswith("/admin/"):
        resp.headers.update(SECURITY_HEADERS)


# --- live state ----------------------------------------------------------------------------------


def snapshot(services: Services) -> dict[str, Any]:
    """Replicas, queues and per-key limits now: what the page's live views draw."""
    rt = services.runtime
    queues = []
    for name, pool in services.pools.items():
        adm = pool.admission
        reps = services.supervisor.replicas(name)
        queues.append({
            "model": name,
            "depth": adm.depth,
            "max_queue": adm.max_queue,
            "oldest_wait_s": round(adm.oldest_wait_s(), 2),
            "last_wait_s": round(adm.last_wait_s, 3),
            "in_flight": sum(r.in_flight for r in reps),
            "slots": sum(r.slots for r in reps if r.accepting),
        })
    return {
        "replicas": services.supervisor.status(),
        "queues": queues,
        "limits": [_key_limits(rt, p) for p in rt.keys.principals()],
        "month": rt.limiter.monthly.month,
        "ledger": {"pending_rows": services.ledger.pending_rows, "dropped_rows": services.ledger.dropped_rows},
    }


def _key_limits(rt: Runtime, p: Principal) -> dict[str, Any]:
    now = time.time()
    lim = p.limits
    limiter = rt.limiter
    s = limiter.states.get(p.key_id)
    if s is not None:
        s.prune(now)
    limiter.monthly.roll(now)

    def window(limit: int | None, used: int, oldest: float | None, span: float) -> dict[str, Any] | None:
        if limit is None:
            return None
        reset = max(0.0, oldest + span - now) if oldest is not None else 0.0
        return {"limit": limit, "used": used, "remaining": max(0, limit - used), "reset_s": round(reset, 1)}

    used_month = limiter.monthly.used.get(p.key_id, 0)
    return {
        "key_id": p.key_id,
        "tier": p.tier,
        "in_flight": s.in_flight if s else 0,
        "max_concurrent": lim.max_concurrent,
        "requests_per_minute": window(lim.requests_per_minute, len(s.minute) if s else 0,
                                      s.minute[0] if s and s.minute else None, MINUTE),
        "requests_per_hour": window(lim.requests_per_hour, len(s.hour) if s else 0,
                                    s.hour[0] if s and s.hour else None, HOUR),
        "tokens_per_minute": window(lim.tokens_per_minute, s.tokens_in_window if s else 0,
                                    s.tokens[0].ts if s and s.tokens else None, MINUTE),
        "monthly_tokens": {
            "limit": lim.monthly_tokens or None,
            "used": used_month,
            "remaining": max(0, lim.monthly_tokens - used_month) if lim.monthly_tokens else None,
        },
    }


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent ``snapshot`` events: one at once, then one whenever the state changed (at
    once for a replica's state, else looked at every EVENTS_TICK_S). Ends at shutdown so the
    drain does not wait for it; the page reconnects by itself."""
    services = request.app[SERVICES]
    rt = services.runtime
    require_admin(rt, request)
    last = b""
    async with sse_response(request) as resp:
        while not services.draining and resp.is_connected():
            if services.runtime is not rt:
                # A reload may have revoked this key or taken its admin flag: a stream opened
                # before must not outlive it. (Ends the stream; the page reconnects and is refused.)
                rt = services.runtime
                try:
                    require_admin(rt, request)
                except ApiError:
                    break
            data = msgspec.json.encode(snapshot(services))
            if data != last:
                await resp.send(data.decode(), event="snapshot")
                last = data
            # A replica's state change wakes it at once; queues and windows are looked at per tick.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EVENTS_TICK_S):
                    await services.replica_changed.wait()
    return resp


# --- usage and keys ------------------------------------------------------------------------------


async def usage_daily(request: web.Request) -> web.Response:
    """Tokens per (day, key, tier, model) of one month (default this one); ``format=csv`` too."""
    services = request.app[SERVICES]
    require_admin(services.runtime, request)
    q = request.query
    month = q.get("month") or current_month()
    if not _MONTH_RE.fullmatch(month):  # it goes into a Content-Disposition header too
        raise bad_request("month must be YYYY-MM", param="month")
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise bad_request("format must be json or csv", param="format")
    try:
        rows = await services.ledger.daily(month, key=q.get("key"), model=q.get("model"), tier=q.get("tier"))
    except ValueError as e:
        raise bad_request(str(e), param="month") from None
    except LedgerError as e:
        raise ledger_unavailable(str(e)) from None
    if fmt == "csv":
        return web.Response(
            text=format_daily(rows), content_type="text/csv", charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="llmd-usage-{month}.csv"'},
        )
    return web.Response(body=msgspec.json.encode({"month": month, "rows": rows}), content_type="application/json")


async def keys(request: web.Request) -> web.Response:
    """The configured keys: id, tier, models, admin, revoked and limits; never a secret or hash."""
    rt = request.app[SERVICES].runtime
    require_admin(rt, request)
    by_id = {p.key_id: p for p in rt.keys.principals()}
    data = []
    for k in rt.cfg.keys:
        p = by_id.get(k.id)
        data.append({
            "id": k.id,
            "tier": k.tier or "",
            "models": k.models,
            "admin": k.admin,
            "revoked": k.revoked,
            "default_model": k.default_model,
            "limits": msgspec.to_builtins(p.limits) if p is not None else None,
        })
    return web.json_response({"keys": data, "tiers": sorted(rt.cfg.tiers)})


async def keys_new(request: web.Request) -> web.Response:
    """A fresh secret and the YAML to add it, as ``llmd keys new`` prints them; llmd keeps
    nothing (the key works once the operator adds the YAML and reloads)."""
    rt = request.app[SERVICES].runtime
    require_admin(rt, request)
    # {"id", "tier"}: tiny, whatever is sent. read(n) returns what has arrived so far (up to n):
    # loop, or a body split over two TCP segments is cut.
    raw = b""
    while len(raw) <= _KEYS_NEW_MAX_BYTES and (chunk := await request.content.read(_KEYS_NEW_MAX_BYTES + 1)):
        raw += chunk
    try:
        if len(raw) > _KEYS_NEW_MAX_BYTES:
            raise msgspec.DecodeError("too large")
        body = msgspec.json.decode(raw, type=dict[str, str | None])
    except msgspec.DecodeError:
        raise bad_request('Send a JSON object: {"id": "...", "tier": "..."}.') from None
    key_id = body.get("id") or ""
    tier = body.get("tier") or None
    if not _KEY_ID_RE.fullmatch(key_id):
        raise bad_request("id must be 1-64 letters, digits, '.', '_' or '-'", param="id")
    if key_id in {k.id for k in rt.cfg.keys}:
        raise bad_request(f"A key with id '{key_id}' already exists.", param="id")
    if tier is not None and tier not in rt.cfg.tiers:
        raise bad_request(f"Unknown tier '{tier}'.", param="tier")
    secret = new_secret()
    digest = hash_secret(secret)
    yaml = f"  - id: {key_id}\n" + (f"    tier: {tier}\n" if tier else "") + f"    sha256: {digest}\n"
    return web.json_response({"id": key_id, "secret": secret, "sha256": digest, "yaml": yaml})
