"""The aiohttp application: one middleware, the route table's inference routes on the
pipeline, llmd's own routes on small handlers.

A request, module by module (ARCHITECTURE.md walks it in full):
  middleware.py  a Call (request id, client address, CORS); errors rendered as envelopes
  pipeline.py    auth -> decode (envelope.py) -> limits (limits.py) -> pool.serve -> settle
  pool.py        admission.py + balancer.py pick a replica; relay.py forwards; retries
  meter.py       reads usage from the answer, as routes.py declares per route
"""

from __future__ import annotations

from aiohttp import web

from . import admin, handlers, openapi, rag
from .appkeys import SERVICES
from .middleware import middleware, on_prepare
from .pipeline import inference
from .routes import ROUTES
from .runtime import Services


def create_app(services: Services) -> web.Application:
    # Bodies are read by pipeline.read_body against the current runtime's max_body_bytes (a
    # reload may change it); aiohttp's own cap stays out of the way.
    app = web.Application(middlewares=[middleware], client_max_size=2**62)
    app[SERVICES] = services
    app.cleanup_ctx.append(services.lifetime)  # session, supervisor, ledger: opened and closed with the app
    app.on_response_prepare.append(on_prepare)
    app.on_response_prepare.append(admin.on_prepare)  # CSP and friends on /admin/*
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics_route)
    app.router.add_get("/version", handlers.version_route)
    app.router.add_get("/openapi.json", openapi.handler(services))
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/models", handlers.list_models)
    app.router.add_get("/v1/models/{model:.+}", handlers.get_model)
    app.router.add_get("/v1/tools", handlers.list_tools)
    for route in ROUTES:
        for path in route.paths:
            app.router.add_post(path, inference)
    app.router.add_get("/v1/rag", rag.list_collections)
    app.router.add_post("/v1/rag/{collection}/documents", rag.add_documents)
    app.router.add_get("/v1/rag/{collection}/documents", rag.list_documents)
    app.router.add_delete("/v1/rag/{collection}/documents/{id:.+}", rag.delete_document)  # ids may hold /
    app.router.add_post("/v1/rag/{collection}/search", rag.search)
    app.router.add_post("/v1/rag/{collection}/chat", rag.chat)
    # an OpenAI SDK whose base_url is .../v1/rag/COLLECTION posts here
    app.router.add_post("/v1/rag/{collection}/chat/completions", rag.chat)
    app.router.add_get("/admin/status", handlers.admin_status)
    app.router.add_get("/admin/usage", handlers.admin_usage)
    admin.add_routes(app)
    app.router.add_post("/admin/models/{model}/load", handlers.admin_load)
    app.router.add_post("/admin/models/{model}/unload", handlers.admin_unload)
    return app
