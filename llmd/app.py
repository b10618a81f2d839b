"""The aiohttp application: middleware, routes, and the request path.

One inference request, step by step (DESIGN.md "One request"):
  1. ``middleware``: request id, error envelope, CORS, access log.
  2. ``auth``: the key -> Principal (``runtime.keys.authenticate``).
  3. ``decode``: a small msgspec envelope from the raw body -> model, stream, max_tokens.
  4. ``limits``: windows, concurrency, monthly quota (``runtime.limiter.admit``).
  5. ``admission``: a slot on the model, maybe after waiting (``pool.admission.acquire``).
  6. ``balancer``: which replica (inside admission, same synchronous step).
  7. ``relay``: forward and relay (``services.relay.forward``); retry before the first byte.
  8. ``finally``: usage row, metrics, slot and limits released.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from aiohttp import web

from . import __version__, openapi
from .auth import Principal
from .balancer import MAX_HASHED_BYTES, block_hashes
from .errors import ApiError, bad_request, model_not_found, not_found_route, overloaded
from .limits import Grant, RateLimited
from .relay import Exchange, UpstreamFailed, count_prompt_tokens
from .runtime import Runtime, Services
from .usage import LedgerError, UsageRow

log = logging.getLogger("llmd")

SERVICES = web.AppKey("services", Services)
CTX: web.RequestKey[RequestContext] = web.RequestKey("llmd.ctx", "RequestContext")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
QUIET_PATHS = frozenset({"/health", "/readyz", "/metrics"})


@dataclass
class RequestContext:
    request_id: str
    start: float = field(default_factory=time.monotonic)
    client_ip: str = ""
    key_id: str = ""
    tier: str = ""
    model: str = ""
    route: str = "other"
    stream: bool = False
    exchange: Exchange | None = None
    cors_origin: str | None = None  # set when the request's Origin is allowed


# --- step 3: the envelope --------------------------------------------------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


Positive = Annotated[int, msgspec.Meta(ge=1)]


class Envelope(msgspec.Struct):
    """The few fields llmd reads; everything else stays in the raw bytes, untouched."""

    model: str
    stream: bool | None = False
    # >= 1: they size the token reservation, so a negative one would switch the limits off.
    max_tokens: Positive | None = None
    max_completion_tokens: Positive | None = None
    n: Positive | None = None
    # UNSET (absent) differs from None (``"stream_options": null``): only when absent may
    # llmd add the field by inserting bytes; a present one is re-encoded (JSON parsers keep
    # the last duplicate key, so an inserted field in front of a null would be overridden).
    stream_options: StreamOptions | msgspec.UnsetType | None = msgspec.UNSET
    # Raw: kept as bytes, never decoded (an empty Raw means absent; Raw | None is not a msgspec type).
    messages: msgspec.Raw = msgspec.Raw(b"")
    prompt: msgspec.Raw = msgspec.Raw(b"")
    input: msgspec.Raw = msgspec.Raw(b"")


_decode_envelope = msgspec.json.Decoder(Envelope).decode
_generic = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

ROUTES = {
    "/v1/chat/completions": ("chat", "/chat/completions", "messages"),
    "/v1/completions": ("completions", "/completions", "prompt"),
    "/v1/embeddings": ("embeddings", "/embeddings", "input"),
}


def decode_envelope(body: bytes, required: str) -> Envelope:
    if not body:
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        env = _decode_envelope(body)
    except msgspec.ValidationError as e:
        msg = str(e)
        param = msg.split("at `$.", 1)[1].rstrip("`").split("[")[0].split(".")[0] if "at `$." in msg else None
        if msg.startswith("Object missing required field"):
            param = msg.split("`")[1]
            raise bad_request(f"Missing required parameter: '{param}'.", param=param) from None
        if " >= " in msg:
            raise bad_request(
                f"Invalid value for '{param}': {msg.split(' - at ')[0]}.", param=param, code="invalid_value"
            ) from None
        raise bad_request(f"Invalid type for '{param}': {msg.split(' - at ')[0]}.", param=param) from None
    except msgspec.DecodeError as e:
        raise bad_request(f"We could not parse the JSON body of your request: {e}.", code="invalid_json") from None
    raw = getattr(env, required)
    if not raw:
        raise bad_request(f"Missing required parameter: '{required}'.", param=required)
    if required == "messages" and not bytes(raw).lstrip().startswith(b"["):
        raise bad_request("Invalid type for 'messages': expected an array of message objects.", param="messages")
    if not env.model:
        raise bad_request("Missing required parameter: 'model'.", param="model")
    return env


def _upstream_body(body: bytes, env: Envelope, upstream_model: str) -> tuple[bytes, bool]:
    """The bytes to send upstream and whether llmd added include_usage (then it hides the
    usage chunk). The original bytes go out unless something must change."""
    opts = env.stream_options
    hide_usage = bool(env.stream) and not (opts and opts.include_usage)
    if env.model == upstream_model and not hide_usage:
        return body, False
    if env.model == upstream_model and opts is msgspec.UNSET:
        # Cheap and exact: add the field in front, no re-encoding of the rest.
        start = body.index(b"{") + 1
        sep = b"," if body[start:].strip() != b"}" else b""
        return body[:start] + b'"stream_options":{"include_usage":true}' + sep + body[start:], True
    try:
        doc: dict[str, Any] = _generic(body)
    except msgspec.DecodeError as e:
        # The envelope decoder skips the fields it does not read without checking them all
        # (a number like 1e999, invalid UTF-8): only a re-encoded body meets them.
        raise bad_request(f"We could not parse the JSON body of your request: {e}.", code="invalid_json") from None
    doc["model"] = upstream_model
    if hide_usage:
        opts = doc.get("stream_options") if isinstance(doc.get("stream_options"), dict) else {}
        doc["stream_options"] = {**opts, "include_usage": True}
    return _encode(doc), hide_usage


def _estimate_prompt_tokens(env: Envelope) -> int:
    raw = env.messages or env.prompt or env.input
    return max(1, len(raw) // 4)


def _completion_cap(env: Envelope) -> int | None:
    """The most tokens the request may generate, if it says: max_tokens per choice x n."""
    per_choice = env.max_completion_tokens or env.max_tokens
    return per_choice * (env.n or 1) if per_choice is not None else None


def _client_ip(request: web.Request, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
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
    # The right-most address not itself a trusted proxy is the client.
    for hop in reversed([h.strip() for h in xff.split(",") if h.strip()]):
        try:
            a = ipaddress.ip_address(hop)
        except ValueError:
            return peer
        if not any(a in net for net in trusted):
            return hop
    return peer


# --- the handlers ----------------------------------------------------------------------------


async def inference(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    rt: Runtime = services.runtime
    ctx: RequestContext = request[CTX]
    route, upstream_path, required = ROUTES[request.path]
    ctx.route = route

    principal = rt.keys.authenticate(request)  # 2. auth
    ctx.key_id, ctx.tier = principal.key_id, principal.tier
    body = await _read_body(request, rt.cfg.server.max_body_bytes)
    env = decode_envelope(body, required)  # 3. decode
    model = rt.model_names.get(env.model)
    if model is None or not principal.may_use(model):
        if model is not None and not rt.keys.open:
            raise ApiError(
                403,
                f"Key '{principal.key_id}' may not use model '{env.model}'.",
                type="permission_error",
                code="model_not_allowed",
                param="model",
            )
        raise model_not_found(env.model)
    ctx.model, ctx.stream = model, bool(env.stream)
    mcfg = rt.cfg.models[model]
    upstream_model = mcfg.upstream_model or model
    # Before the limits: a body that cannot be re-encoded is the client's 400, not a request.
    out_body, hide_usage = _upstream_body(body, env, upstream_model)

    reserve = rt.limiter.reserve_for(
        principal, _estimate_prompt_tokens(env), env.max_completion_tokens or env.max_tokens, env.n or 1
    )
    try:
        grant = rt.limiter.admit(principal, reserve)  # 4. limits
    except ApiError as e:
        outcome = "rejected_quota" if e.type == "insufficient_quota" else "rejected_rate"
        services.metrics.observe_rate_limited(
            principal.key_id, e.reason if isinstance(e, RateLimited) else "monthly_tokens"
        )
        _record(services, ctx, request, e.status, outcome, Exchange())
        e.headers.update(rt.limiter.headers(principal))
        raise

    ex = Exchange(t_start=ctx.start)
    ctx.exchange = ex
    status = 0
    try:
        prefix = env.messages if route == "chat" else env.prompt if route == "completions" else b""
        hashes = (
            block_hashes(bytes(memoryview(prefix)[:MAX_HASHED_BYTES]))
            if prefix and rt.cfg.routing.strategy == "prefix-affinity"
            else []
        )
        # identity: llmd reads usage from the answer and relays it as it is; a compressed
        # answer would reach the client without its Content-Encoding (the session still
        # decodes one that an upstream compresses anyway).
        headers = {"Content-Type": "application/json", "X-Request-ID": ctx.request_id, "Accept-Encoding": "identity"}
        if mcfg.api_key_env:
            headers["Authorization"] = f"Bearer {services.upstream_keys.get(mcfg.api_key_env, '')}"
        response_headers = {"X-Request-ID": ctx.request_id, **rt.limiter.headers(principal)}
        resp = await _relay_with_retries(
            request,
            services,
            rt,
            principal,
            model,
            upstream_path,
            out_body,
            headers,
            response_headers,
            hide_usage,
            hashes,
            ex,
        )
        status = resp.status
        return resp
    except ApiError as e:
        status = e.status
        if ex.outcome == "ok":
            ex.outcome = (
                "timeout"
                if e.status == 504
                else "rejected_queue"
                if e.status == 503 and not ex.replica
                else "upstream_error"
            )
        raise
    except asyncio.CancelledError:
        ex.outcome = "client_abort"
        status = 499
        raise
    finally:
        if _needs_count(ex):
            # The upstream worked on it but told no usage (a stream cut short by the client, a
            # timeout or a dying replica; an upstream that ignores include_usage): count what
            # was relayed (one token per streamed token chunk; a whole answer's text by size)
            # and ask the replica to tokenize the prompt, off the request path; the row, the
            # limits and the metrics settle when that answers.
            if ex.streamed or ex.outcome == "client_abort":
                ex.completion_tokens = ex.chunks
            ex.prompt_tokens = _estimate_prompt_tokens(env)
            ex.token_method = "stream_chunks+estimate" if ex.streamed else "estimate"
            services.spawn(_settle_abort(services, ctx, request, grant, model, route, out_body, ex, status))
        else:
            _settle(services, ctx, request, grant, model, ex, status)


def _needs_count(ex: Exchange) -> bool:
    """Did a replica take this request (200 headers, or the client left while it worked)
    without telling its usage?"""
    return not ex.usage_seen and bool(ex.replica) and (ex.status == 200 or ex.outcome == "client_abort")


async def _settle_abort(
    services: Services,
    ctx: RequestContext,
    request: web.Request,
    grant: Grant,
    model: str,
    route: str,
    body: bytes,
    ex: Exchange,
    status: int,
) -> None:
    try:
        if ex.origin and services.session is not None:
            n = await count_prompt_tokens(services.session, ex.backend, ex.origin, model, route, body)
            if n is not None:
                ex.prompt_tokens = n
                ex.token_method = "stream_chunks+tokenize" if ex.streamed else "tokenize"
    finally:
        _settle(services, ctx, request, grant, model, ex, status)


def _settle(
    services: Services,
    ctx: RequestContext,
    request: web.Request,
    grant: Grant,
    model: str,
    ex: Exchange,
    status: int,
) -> None:
    """8. The request is over, every way it can end: settle limits, write the row, count."""
    grant.release(ex.prompt_tokens + ex.completion_tokens)
    if ex.status == 0:
        ex.status = status
    _record(services, ctx, request, status or ex.status, ex.outcome, ex)
    services.metrics.observe_tokens(model, grant.principal.key_id, ex.prompt_tokens, ex.completion_tokens)
    if ex.ttft_s is not None:
        services.metrics.observe_ttft(model, ex.ttft_s)


async def _relay_with_retries(
    request: web.Request,
    services: Services,
    rt: Runtime,
    principal: Principal,
    model: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    response_headers: dict[str, str],
    hide_usage: bool,
    hashes: list[int],
    ex: Exchange,
) -> web.StreamResponse:
    pool = services.pools.get(model)
    if pool is None:  # a reload removed the model while this request read its body
        raise overloaded(f"Model '{model}' was removed by a reload.", 5)
    tried: set[str] = set()
    attempts = rt.cfg.routing.retries + 1
    metrics = services.metrics
    for attempt in range(attempts):
        choice = await pool.admission.acquire(  # 5 + 6. admission and balancer
            principal.key_id, principal.limits.priority or 0, hashes, frozenset(tried)
        )
        metrics.observe_affinity(model, choice.affinity)
        replica = choice.replica
        t0 = time.monotonic()
        try:
            resp = await services.relay.forward(  # 7. relay
                request, replica, path, body, headers, response_headers, hide_usage, ex
            )
            replica.failures = 0
            return resp
        except UpstreamFailed as e:
            tried.add(replica.name)
            services.note_failure(replica)
            others = any(r.accepting and r.name not in tried for r in services.supervisor.replicas(model))
            if e.retryable and others and attempt + 1 < attempts and not ex.first_byte_sent:
                metrics.observe_retry(model)
                log.warning(
                    "retrying on another replica",
                    extra={
                        "request_id": ex and request[CTX].request_id,
                        "replica": replica.name,
                        "error": e.error.message,
                    },
                )
                continue
            if e.response is not None:
                ex.outcome = "upstream_error"
                ex.status = e.response.status
                return e.response
            raise e.error from None
        finally:
            pool.admission.release(replica, principal.key_id, time.monotonic() - t0)
    raise AssertionError("unreachable")


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` (declared or sent)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"Request body too large: the limit is {limit} bytes (server.max_body_bytes).", code="request_too_large"
    )


def _record(
    services: Services, ctx: RequestContext, request: web.Request, status: int, outcome: str, ex: Exchange
) -> None:
    duration = time.monotonic() - ctx.start
    services.ledger.record(
        UsageRow(
            ts=time.time(),
            request_id=ctx.request_id,
            key_id=ctx.key_id,
            tier=ctx.tier,
            model=ctx.model,
            replica=ex.replica,
            route=ctx.route,
            status=status,
            stream=ctx.stream,
            outcome=outcome,
            prompt_tokens=ex.prompt_tokens,
            completion_tokens=ex.completion_tokens,
            cached_tokens=ex.cached_tokens,
            ttft_ms=round(ex.ttft_s * 1000, 2) if ex.ttft_s is not None else None,
            duration_ms=round(duration * 1000, 2),
            client_ip=ctx.client_ip,
            token_method=ex.token_method,
        )
    )


async def list_models(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    rt = services.runtime
    principal = rt.keys.authenticate(request)
    data = []
    for name, m in rt.cfg.models.items():
        if not principal.may_use(name):
            continue
        for n in [name, *m.aliases]:
            data.append({"id": n, "object": "model", "created": services.started_unix, "owned_by": "llmd"})
    return web.json_response(
        {"object": "list", "data": data}, headers=rt.limiter.headers(principal) if not rt.keys.open else None
    )


async def get_model(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    rt = services.runtime
    principal = rt.keys.authenticate(request)
    name = request.match_info["model"]
    model = rt.model_names.get(name)
    if model is None or not principal.may_use(model):
        raise model_not_found(name)
    return web.json_response({"id": name, "object": "model", "created": services.started_unix, "owned_by": "llmd"})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    ready, body = services.readiness()
    return web.json_response(body, status=200 if ready else 503)


async def admin_status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    _admin(services.runtime, request)
    return web.json_response(services.status())


async def admin_usage(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    _admin(services.runtime, request)
    month = request.query.get("month")
    if month is not None and not re.match(r"^\d{4}-\d{2}$", month):
        raise bad_request("month must be YYYY-MM", param="month")
    try:
        rows = await services.ledger.report(month=month, key=request.query.get("key"), model=request.query.get("model"))
    except ValueError as e:
        raise bad_request(str(e), param="month") from None
    except LedgerError as e:
        raise ApiError(503, f"The usage ledger cannot be read: {e}", type="server_error") from None
    return web.Response(body=msgspec.json.encode({"month": month, "rows": rows}), content_type="application/json")


def _admin(rt: Runtime, request: web.Request) -> Principal:
    p = rt.keys.authenticate(request)
    if rt.keys.open:
        # Open mode (no keys) is loopback-only by config, but a proxy on the same host (nginx)
        # forwards remote clients from loopback: /admin/* answers only a client that is
        # itself local, so `llmd status` works on the host and nobody behind nginx sees it.
        if not _is_loopback(request[CTX].client_ip):
            raise ApiError(
                403,
                "Admin routes need an admin key; this llmd has no keys, so they answer local clients only.",
                type="permission_error",
                code="admin_required",
            )
        return p
    if not p.admin:
        raise ApiError(403, "This route needs an admin key.", type="permission_error", code="admin_required")
    return p


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


async def metrics_route(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    services.refresh_metrics()
    return web.Response(
        body=services.metrics.render(),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


async def version_route(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


# --- middleware ------------------------------------------------------------------------------


@web.middleware
async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    services = request.app[SERVICES]
    rt = services.runtime
    rid = request.headers.get("X-Request-ID", "")
    ctx = RequestContext(rid if _REQUEST_ID_RE.match(rid) else f"{random.getrandbits(128):032x}")
    ctx.client_ip = _client_ip(request, rt.trusted_proxies)
    request[CTX] = ctx
    origin = request.headers.get("Origin")
    cors = origin is not None and (origin in rt.cors_origins or "*" in rt.cors_origins)
    if cors:
        ctx.cors_origin = origin
    resp: web.StreamResponse
    try:
        if request.method == "OPTIONS" and origin is not None:
            if not cors:
                raise ApiError(403, f"Origin {origin} is not allowed (server.cors_origins).", code="cors_forbidden")
            resp = web.Response(status=204)
        else:
            resp = await handler(request)
    except ApiError as e:
        resp = e.response()
    except web.HTTPException as e:
        resp = _http_exception(e, request)
    except asyncio.CancelledError:
        _access(services, request, ctx, 499, 0)
        raise
    except Exception:
        log.exception("unhandled error", extra={"request_id": ctx.request_id})
        resp = ApiError(500, "Internal error in llmd; see its log for this request id.", type="server_error").response()
    ex = ctx.exchange
    body = getattr(resp, "body", None)
    nbytes = ex.client_bytes if ex else len(body) if isinstance(body, bytes) else 0
    _access(services, request, ctx, resp.status, nbytes)
    if ctx.route == "other" and request.path not in QUIET_PATHS:
        services.metrics.observe_request("other", "", "", resp.status, time.monotonic() - ctx.start, 0.0)
    elif ctx.route != "other":
        total = time.monotonic() - ctx.start
        services.metrics.observe_request(
            ctx.route, ctx.model, ctx.key_id, resp.status, total, total - (ex.upstream_s if ex else 0.0)
        )
    return resp


async def _on_prepare(request: web.Request, resp: web.StreamResponse) -> None:
    """Headers every response carries, set just before its headers go out: so a stream
    (prepared inside the handler) gets them as a plain response does."""
    ctx = request.get(CTX)
    if ctx is None:
        return
    resp.headers["X-Request-ID"] = ctx.request_id
    if ctx.cors_origin is not None:
        resp.headers["Access-Control-Allow-Origin"] = ctx.cors_origin
        resp.headers["Vary"] = "Origin"
        resp.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After, x-ratelimit-remaining-requests"
        if request.method == "OPTIONS":
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = (
                request.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type"
            )
            resp.headers["Access-Control-Max-Age"] = "600"


def _http_exception(e: web.HTTPException, request: web.Request) -> web.Response:
    if e.status == 404:
        return not_found_route(request.path).response()
    if e.status == 405:
        return ApiError(
            405, f"Method {request.method} is not allowed on {request.path}.", code="method_not_allowed"
        ).response()
    if e.status == 413:
        return _too_large(request.app[SERVICES].runtime.cfg.server.max_body_bytes).response()
    return ApiError(e.status, e.reason or "error").response()


def _access(services: Services, request: web.Request, ctx: RequestContext, status: int, nbytes: int) -> None:
    if request.path in QUIET_PATHS and not services.runtime.cfg.server.access_log_health:
        return
    ex = ctx.exchange
    fields: dict[str, Any] = {
        "request_id": ctx.request_id,
        "method": request.method,
        "path": request.path,
        "status": status,
        "duration_ms": round((time.monotonic() - ctx.start) * 1000, 2),
        "bytes": nbytes,
        "client": ctx.client_ip,
    }
    if ctx.route != "other":
        fields.update(key=ctx.key_id, tier=ctx.tier, model=ctx.model, stream=ctx.stream)
    if ex is not None:
        total = time.monotonic() - ctx.start
        fields.update(
            replica=ex.replica,
            outcome=ex.outcome,
            prompt_tokens=ex.prompt_tokens,
            completion_tokens=ex.completion_tokens,
            ttft_ms=round(ex.ttft_s * 1000, 2) if ex.ttft_s is not None else None,
            upstream_ms=round(ex.upstream_s * 1000, 2),
            overhead_ms=round((total - ex.upstream_s) * 1000, 3),
        )
    services.access.write(fields)


def create_app(services: Services) -> web.Application:
    # Bodies are read by _read_body against the current runtime's max_body_bytes (a reload may
    # change it); aiohttp's own cap stays out of the way.
    app = web.Application(middlewares=[middleware], client_max_size=2**62)
    app[SERVICES] = services
    app.on_response_prepare.append(_on_prepare)
    app.router.add_get("/health", health)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_get("/version", version_route)
    app.router.add_get("/openapi.json", openapi.handler(services))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    for path in ROUTES:
        app.router.add_post(path, inference)
    app.router.add_get("/admin/status", admin_status)
    app.router.add_get("/admin/usage", admin_usage)
    return app
