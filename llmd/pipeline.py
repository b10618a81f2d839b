"""The request pipeline: one inference call, step by step (DESIGN.md "One request").

    auth -> decode -> limits -> pool.serve -> settle

Each step is one call on the ``Call``: it adds what it learned or raises an ``ApiError``
that knows its HTTP form and its outcome. No step reaches back into an earlier one;
``settle`` runs once, whatever happened: limits settled, the usage row, metrics, the access
log line. The route table (routes.py) says what differs between routes; nothing here does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from . import envelope
from .appkeys import CALL, SERVICES
from .cache import Entry
from .call import Call
from .errors import (
    ApiError,
    RateLimited,
    bad_request,
    model_not_allowed,
    model_not_found,
    overloaded,
    route_not_served,
    too_large,
)
from .launchers import served_routes
from .legacy import LEGACY_FUNCTIONS
from .outcome import Outcome
from .pool import Pool
from .relay import count_prompt_tokens
from .routes import BY_PATH
from .runtime import Runtime, Services
from .toolloop import Plan, ToolLoop, plan
from .usage import UsageRow


async def inference(request: web.Request) -> web.StreamResponse:
    call = request[CALL]
    services = request.app[SERVICES]
    rt = services.runtime  # the config this request started under, for all its steps
    call.route = BY_PATH[request.path]
    with settled(call, services):  # 8, however it ends
        authenticate(call, rt)  # 2
        await decode(call, rt)  # 3
        tool_plan = plan(call, rt.toolbox)  # server tools: llmd runs the model's calls of them
        hit = services.cache.consult(call, rt.cfg) if tool_plan is None else None
        if hit is None and call.cache_key:  # the same request in flight: its answer will do
            routing = rt.cfg.routing
            hit = await services.cache.follow(call, routing.queue_timeout_s + routing.timeouts.total_s)
        try:
            return await serve(call, rt, services, hit, tool_plan)
        finally:
            services.cache.land(call)


async def serve(
    call: Call, rt: Runtime, services: Services, hit: Entry | None, tool_plan: Plan | None
) -> web.StreamResponse:
    """Steps 4-7: limits, then the cache's answer, the tool loop's rounds or the pool's replica."""
    await admit(call, rt, services, hit)  # 4
    if hit is not None:  # the completion cache answers: no slot, no replica
        resp = await services.cache.answer(call, hit)
        call.status = resp.status
        return resp
    if call.cache:
        call.response_headers["x-llmd-cache"] = call.cache
    pool = pool_of(call, rt)
    if tool_plan is not None:
        loop = ToolLoop(
            call,
            tool_plan,
            rt.cfg.tool_loop.max_rounds,
            lambda tool, args: rt.toolbox.run(tool, args, services.session),
        )
        resp = await loop.run(lambda: pool.serve(call, services.relay), lambda sub: serve_round(sub, rt, services))
    else:
        resp = await pool.serve(call, services.relay)  # 5, 6, 7
    call.status = resp.status
    services.cache.keep(call, resp)
    return resp


@contextlib.contextmanager
def settled(call: Call, services: Services) -> Iterator[None]:
    """Whatever ends the block, the call learns its status and outcome and is settled once."""
    try:
        yield
    except ApiError as e:
        call.status = e.status
        if call.exchange.outcome is Outcome.OK:
            call.exchange.outcome = e.outcome
        raise
    except asyncio.CancelledError:
        call.exchange.outcome = Outcome.CLIENT_ABORT
        call.status = 499
        raise
    except Exception:
        call.status = 500
        call.exchange.outcome = Outcome.UPSTREAM_ERROR
        raise
    finally:
        settle(call, services)


def pool_of(call: Call, rt: Runtime) -> Pool:
    pool = rt.pools.get(call.model)
    if pool is None:  # a reload removed the model while this request read its body
        raise overloaded(f"Model '{call.model}' was removed by a reload.", 5)
    return pool


def authenticate(call: Call, rt: Runtime) -> None:
    call.principal = rt.keys.authenticate(call.request)


async def decode(call: Call, rt: Runtime) -> None:
    """The body, its envelope, the model it names (or the default: the key's, then the
    server's), allowed for this key and served on this route, and what goes upstream."""
    route, principal, request = call.route, call.principal, call.request
    assert route is not None and principal is not None
    body = await read_body(request, rt.cfg.server.max_body_bytes)
    env = call.env = envelope.decode(body, route.required, route.envelope)
    name = env.model or principal.default_model or rt.cfg.server.default_model
    if not name:
        raise bad_request(
            "Missing required parameter: 'model' (this llmd has no server.default_model for requests without one).",
            param="model",
        )
    model = rt.model_names.get(name)
    if model is None or not principal.may_use(model):
        if model is not None and not rt.keys.open:
            raise model_not_allowed(principal.key_id, name)
        raise model_not_found(name)
    call.model = model
    mcfg = rt.cfg.models[model]
    if route.name not in served_routes(mcfg):
        raise route_not_served(name, mcfg.backend, request.path)
    legacy = route.legacy_functions and bool(env.functions)
    call.upstream_body, call.hide_usage = envelope.upstream_body(
        body, env, mcfg.upstream_model or model, route.usage_option, legacy
    )
    if legacy:
        call.rewrite = LEGACY_FUNCTIONS
    # identity: llmd reads usage from the answer and relays it as it is; a compressed answer
    # would reach the client without its Content-Encoding.
    headers = {"Content-Type": "application/json", "X-Request-ID": call.request_id, "Accept-Encoding": "identity"}
    for h in route.forward_headers:
        v = request.headers.get(h)
        if v is not None:
            headers[h] = v
    if mcfg.api_key_env:
        headers["Authorization"] = f"Bearer {rt.upstream_keys.get(mcfg.api_key_env, '')}"
    call.upstream_headers = headers


async def admit(call: Call, rt: Runtime, services: Services, hit: Entry | None = None) -> None:
    """Per-key windows, concurrency and quota: a Grant, or a 429 with the limit headers. A
    cache hit's tokens are known, and count as the tier says (cache_hit_requests/_tokens)."""
    p, env = call.principal, call.env
    assert p is not None and env is not None
    limiter = rt.limiter
    call.reached_limits = True  # from here on the request has a usage row, admitted or not
    try:
        if hit is None:
            reserve = limiter.reserve_for(p, env.prompt_estimate(), env.completion_cap(), env.n or env.n_cmpl or 1)
            call.grant = await limiter.acquire(p, reserve)
        else:
            lim = p.limits
            call.grant = await limiter.acquire(
                p, hit.tokens, requests=bool(lim.cache_hit_requests), tokens=bool(lim.cache_hit_tokens)
            )
    except ApiError as e:
        if e.status == 429:  # not a 503 limits_unavailable: the store failed, not the key
            services.metrics.observe_rate_limited(
                p.key_id, e.reason if isinstance(e, RateLimited) else "monthly_tokens"
            )
        e.headers.update(limiter.headers(p))
        raise
    call.response_headers = limiter.headers(p)


async def serve_round(call: Call, rt: Runtime, services: Services) -> web.StreamResponse:
    """A tool loop's next model call (toolloop.py), as a request of its own: limits, a slot on
    a replica, the relay, and its own settle (ledger row, limits, metrics)."""
    with settled(call, services):
        await admit(call, rt, services)
        resp = await pool_of(call, rt).serve(call, services.relay)
        call.status = resp.status
        return resp


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` (declared or sent)."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    parts: list[bytes] = []
    size = 0
    try:
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            parts.append(chunk)
    except RequestPayloadError as e:
        # aiohttp could not decode what was sent: a Content-Encoding the bytes do not match,
        # a broken chunked framing. The client's 400, not llmd's 500.
        raise bad_request(f"The request body could not be read: {e}.", code="invalid_body") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


# --- 8. settle ---------------------------------------------------------------------------------


def settle(call: Call, services: Services) -> None:
    """The request is over, every way it can end. When a replica worked on it without telling
    its usage (a stream cut short by the client, a timeout or a dying replica; an upstream that
    ignores include_usage), bill what was relayed (one token per streamed token chunk; a whole
    answer's text by size) plus the prompt, which the replica is asked to tokenize off the
    request path: the row, the limits and the metrics settle when it answers."""
    ex = call.exchange
    if call.grant is not None and call.env is not None and _needs_count(call):
        if ex.streamed or ex.outcome is Outcome.CLIENT_ABORT:
            ex.completion_tokens = ex.chunks
        if ex.prompt_seen:  # the upstream told the prompt before the stream broke off
            ex.token_method = "stream_chunks+upstream" if ex.streamed else "upstream"
            _finish(call, services)
            return
        ex.prompt_tokens = call.env.prompt_estimate()
        ex.token_method = "stream_chunks+estimate" if ex.streamed else "estimate"
        services.spawn(_count_prompt_then_finish(call, services))
    else:
        _finish(call, services)


def _needs_count(call: Call) -> bool:
    ex = call.exchange
    return not ex.usage_seen and bool(ex.replica) and (ex.status == 200 or ex.outcome is Outcome.CLIENT_ABORT)


async def _count_prompt_then_finish(call: Call, services: Services) -> None:
    ex = call.exchange
    try:
        if ex.origin and call.route is not None:
            n = await count_prompt_tokens(
                services.session, ex.backend, ex.origin, call.model, call.route.name, call.upstream_body
            )
            if n is not None:
                ex.prompt_tokens = n
                ex.token_method = "stream_chunks+tokenize" if ex.streamed else "tokenize"
    finally:
        _finish(call, services)


def _finish(call: Call, services: Services) -> None:
    ex = call.exchange
    route = call.route.name if call.route is not None else "other"
    tokens = ex.prompt_tokens + ex.completion_tokens
    hit = call.cache == "hit" and not ex.replica
    exempt = 0
    if call.grant is not None:
        call.grant.release(tokens)  # a hit's tokens settle as 0 unless its tier counts them
        if hit and not call.grant.tokens:
            exempt = tokens
        if not hit:  # llmd_tokens: what the models worked on; hits are llmd_cache_lookups
            services.metrics.observe_tokens(call.model, call.key_id, ex.prompt_tokens, ex.completion_tokens)
        if ex.ttft_s is not None:
            services.metrics.observe_ttft(call.model, ex.ttft_s)
    now = time.monotonic()
    total = now - call.start
    if call.reached_limits:
        services.ledger.record(
            UsageRow(
                ts=time.time(),
                request_id=call.request_id,
                key_id=call.key_id,
                tier=call.tier,
                model=call.model,
                replica=ex.replica,
                route=route,
                status=call.status or ex.status,
                stream=call.stream,
                outcome=str(ex.outcome),
                prompt_tokens=ex.prompt_tokens,
                completion_tokens=ex.completion_tokens,
                cached_tokens=ex.cached_tokens,
                ttft_ms=round(ex.ttft_s * 1000, 2) if ex.ttft_s is not None else None,
                duration_ms=round(total * 1000, 2),
                client_ip=call.client_ip,
                token_method=ex.token_method,
                cache=call.cache,
                upstream_tokens=0 if hit else None,
                quota_exempt_tokens=exempt,
            )
        )
    services.metrics.observe_request(route, call.model, call.key_id, call.status, total, total - ex.upstream_s)
    services.access.write(call.access_fields(call.status, ex.client_bytes))
