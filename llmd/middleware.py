"""The one middleware: a Call per request (its id, client address, CORS decision), every
error rendered as its envelope, and the access log and metrics of llmd's own routes.

Inference calls are settled by the pipeline itself (it knows tokens and outcome); the
middleware only renders what they raise. Headers every response carries (``X-Request-ID``,
CORS) are set in ``on_prepare``, just before headers go out, so streams get them too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
import time
from typing import Any

from aiohttp import web

from .appkeys import CALL, SERVICES
from .call import Call
from .errors import ApiError, cors_forbidden, internal_error, method_not_allowed, not_found_route, too_large

log = logging.getLogger("llmd")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
QUIET_PATHS = frozenset({"/health", "/readyz", "/metrics"})


@web.middleware
async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    services = request.app[SERVICES]
    rt = services.runtime
    rid = request.headers.get("X-Request-ID", "")
    call = Call(
        request,
        rid if _REQUEST_ID_RE.match(rid) else f"{random.getrandbits(128):032x}",
        client_ip(request, rt.trusted_proxies),
    )
    request[CALL] = call
    origin = request.headers.get("Origin")
    if origin is not None and (origin in rt.cors_origins or "*" in rt.cors_origins):
        call.cors_origin = origin
    resp: web.StreamResponse
    try:
        if request.method == "OPTIONS" and origin is not None:
            if call.cors_origin is None:
                raise cors_forbidden(origin)
            resp = web.Response(status=204)
        else:
            resp = await handler(request)
    except ApiError as e:
        resp = e.response(call.route.errors if call.route is not None else "openai")
    except web.HTTPException as e:
        resp = _http_exception(e, request)
    except asyncio.CancelledError:
        if call.route is None:
            _own_route_done(call, 499, 0)
        raise
    except Exception:
        log.exception("unhandled error", extra={"request_id": call.request_id})
        resp = internal_error().response(call.route.errors if call.route is not None else "openai")
    if call.route is None:
        body = getattr(resp, "body", None)
        _own_route_done(call, resp.status, len(body) if isinstance(body, bytes) else 0)
    return resp


def _own_route_done(call: Call, status: int, nbytes: int) -> None:
    """Access log and metrics of llmd's own routes (health, models, admin, ...)."""
    request = call.request
    services = request.app[SERVICES]
    if request.path in QUIET_PATHS:
        if services.runtime.cfg.server.access_log_health:
            services.access.write(call.access_fields(status, nbytes))
        return
    services.access.write(call.access_fields(status, nbytes))
    services.metrics.observe_request("other", "", "", status, time.monotonic() - call.start, 0.0)


async def on_prepare(request: web.Request, resp: web.StreamResponse) -> None:
    """Headers every response carries, set just before its headers go out: so a stream
    (prepared inside the handler) gets them as a plain response does."""
    call = request.get(CALL)
    if call is None:
        return
    resp.headers["X-Request-ID"] = call.request_id
    if call.route is not None and call.route.errors == "anthropic":
        resp.headers["request-id"] = call.request_id  # what the anthropic SDK reads and reports
    if call.cors_origin is not None:
        resp.headers["Access-Control-Allow-Origin"] = call.cors_origin
        resp.headers["Vary"] = "Origin"
        resp.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After, x-ratelimit-remaining-requests"
        if request.method == "OPTIONS":
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = (
                request.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type"
            )
            resp.headers["Access-Control-Max-Age"] = "600"


def _http_exception(e: web.HTTPException, request: web.Request) -> web.Response:
    if e.status == 404:
        return not_found_route(request.path).response()
    if e.status == 405:
        return method_not_allowed(request.method, request.path).response()
    if e.status == 413:
        return too_large(request.app[SERVICES].runtime.cfg.server.max_body_bytes).response()
    return ApiError(e.status, e.reason or "error").response()


def client_ip(request: web.Request, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the right-most
    X-Forwarded-For hop that is not itself a trusted proxy."""
    peer = request.remote or ""
    xff = request.headers.get("X-Forwarded-For")
    if not xff:
        return peer
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if not any(addr in net for net in trusted):
        return peer  # only a trusted proxy may tell us who the client is
    for hop in reversed([h.strip() for h in xff.split(",") if h.strip()]):
        a = _hop_address(hop)
        if a is None:
            # Not the trusted proxy's own peer: never fall back to the proxy's address, which
            # is loopback for nginx and would pass as a local client (open-mode /admin).
            return "unknown"
        if not any(a in net for net in trusted):
            return str(a)
    return peer


def _hop_address(hop: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An X-Forwarded-For hop's address: bare, or as some proxies write it, ``1.2.3.4:5678``
    or ``[2001:db8::1]:5678``; None when it is neither."""
    if hop.startswith("["):
        hop = hop[1:].split("]", 1)[0]
    elif hop.count(":") == 1:
        hop = hop.split(":", 1)[0]
    try:
        return ipaddress.ip_address(hop)
    except ValueError:
        return None
