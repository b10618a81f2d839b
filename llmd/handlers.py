"""llmd's own routes: models, health, readiness, metrics, version, admin. Small handlers;
the inference routes are the pipeline's (pipeline.py)."""

from __future__ import annotations

import asyncio
import re

import msgspec
from aiohttp import web

from . import __version__
from .admin import require_admin
from .appkeys import SERVICES
from .config import ModelConfig
from .errors import bad_request, conflict, ledger_unavailable, model_not_found, no_room
from .loader import NoRoom
from .runtime import Services
from .usage import LedgerError


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


async def list_tools(request: web.Request) -> web.Response:
    """The server tools the calling key may name in a chat request, with their schemas."""
    services = request.app[SERVICES]
    rt = services.runtime
    principal = rt.keys.authenticate(request)
    defaults = set(principal.limits.default_tools or ())
    data = [
        {"object": "tool", **t.public(), "default": t.name in defaults} for t in rt.toolbox.for_principal(principal)
    ]
    return web.json_response({"object": "list", "data": data})


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
    require_admin(services.runtime, request)
    return web.json_response(services.status())


async def admin_usage(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    require_admin(services.runtime, request)
    month = request.query.get("month")
    if month is not None and not re.fullmatch(r"[0-9]{4}-[0-9]{2}", month):
        raise bad_request("month must be YYYY-MM", param="month")
    try:
        rows = await services.ledger.report(month=month, key=request.query.get("key"), model=request.query.get("model"))
    except ValueError as e:
        raise bad_request(str(e), param="month") from None
    except LedgerError as e:
        raise ledger_unavailable(str(e)) from None
    return web.Response(body=msgspec.json.encode({"month": month, "rows": rows}), content_type="application/json")


def _on_demand_model(services: Services, request: web.Request) -> tuple[str, ModelConfig]:
    rt = services.runtime
    require_admin(rt, request)
    asked = request.match_info["model"]
    name = rt.model_names.get(asked)
    if name is None:
        raise model_not_found(asked)
    model = rt.cfg.models[name]
    if not model.on_demand:
        raise conflict(f"Model '{name}' is load: always: it runs from start to stop.", "not_on_demand")
    return name, model


async def admin_load(request: web.Request) -> web.Response:
    """Start a cold on-demand model (``llmd load``); waits until it serves unless ?wait=0."""
    services = request.app[SERVICES]
    name, model = _on_demand_model(services, request)
    loader = services.loader
    try:
        loader.load(name)
    except NoRoom as e:
        raise no_room(str(e)) from None
    if request.query.get("wait", "1") not in ("0", "false"):
        loop = asyncio.get_running_loop()
        end = loop.time() + loader.start_budget(model)
        # Polled: replica state changes reach the loader through no event it could wait on.
        # "unready" is a failed start (the replica backs off): answer now, not after the budget.
        while loader.state(name) in ("cold", "starting") and loop.time() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return web.json_response({"model": name, "state": loader.state(name)})


async def admin_unload(request: web.Request) -> web.Response:
    """Stop every replica of an on-demand model once its requests are done (``llmd unload``)."""
    services = request.app[SERVICES]
    name, model = _on_demand_model(services, request)
    if model.pin or model.min_replicas:
        raise conflict(f"Model '{name}' is kept loaded by its config (pin or min_replicas).", "pinned")
    tasks = services.loader.unload(name)
    if tasks:
        await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
    return web.json_response({"model": name, "state": services.loader.state(name)})


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
