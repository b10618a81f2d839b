"""llmd's own OpenAPI 3.1 document, served at ``GET /openapi.json``.

It describes what llmd itself does, not what an upstream may add: the routes it serves, the
few request fields it reads (``app.Envelope``; every other field passes through, hence
``additionalProperties``), its two ways of taking a key, and every error it produces, all in
OpenAI's envelope. Upstream answers (success bodies and the upstream's own errors) are relayed
untouched; their shapes follow OpenAI's and are kept loose here (the few fields clients rely
on). The document is built from the running config (model names, body limit) and encoded
once per config: a reload's new config gets a new one on its first request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.inspect as mi
from aiohttp import web

from . import __version__, admindoc, ragdoc
from .apidoc import INFERENCE_ERRORS, Schema
from .apidoc import RELAYED as _RELAYED
from .apidoc import REQUEST_ID_PARAM as _REQUEST_ID_PARAM
from .apidoc import error_response as _error_response
from .apidoc import get as _get
from .apidoc import nullable as _nullable
from .apidoc import ok as _ok
from .apidoc import ref as _ref
from .config import Config
from .envelope import Envelope
from .routes import ROUTES

if TYPE_CHECKING:
    from .runtime import Services

OPENAPI_VERSION = "3.1.0"


# --- request bodies: app.Envelope --------------------------------------------------------------


def _schema_of(t: mi.Type) -> Schema:
    """JSON Schema of one Envelope field's type: the envelope decoder's own rules."""
    if isinstance(t, mi.UnionType):
        kinds = [_schema_of(x) for x in t.types]
        return kinds[0] if len(kinds) == 1 else {"anyOf": kinds}
    if isinstance(t, mi.NoneType):
        return {"type": "null"}
    if isinstance(t, mi.BoolType):
        return {"type": "boolean"}
    if isinstance(t, mi.IntType):
        return {"type": "integer", **({"minimum": t.ge} if t.ge is not None else {})}
    if isinstance(t, mi.StrType):
        return {"type": "string"}
    if isinstance(t, mi.StructType):
        props = {f.encode_name: _schema_of(f.type) for f in t.fields}
        return {"type": "object", "properties": props, "additionalProperties": True}
    return {}  # Raw: any JSON, passed through (the route's upstream judges it)


def _envelope(models: list[str], required: str | None, model_required: bool) -> Schema:
    """``envelope.Envelope``'s fields (the same decoder on every route; a route requires its
    own field); anything else passes through to the upstream."""
    props: dict[str, Schema] = {}
    for f in mi.type_info(Envelope).fields:  # type: ignore[attr-defined]
        props[f.encode_name] = _schema_of(f.type)
    props["model"] = {"type": "string", "minLength": 1, "description": "A model name or alias from the config."}
    if models:
        props["model"]["enum"] = models
    if required in _FIELD_SHAPES:
        props[required] = _FIELD_SHAPES[required]
    req = [x for x in ("model" if model_required else None, required) if x]
    out: Schema = {"type": "object", "properties": props, "additionalProperties": True}
    if req:
        out["required"] = req
    return out


_MESSAGE: Schema = {
    "type": "object",
    "description": "An OpenAI chat message; llmd reads none of it (it only checks `messages` is an array).",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": _nullable(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "object", "additionalProperties": True}},
                ]
            }
        ),
    },
    "additionalProperties": True,
}

_PROMPT: Schema = {
    "description": "Text, a list of texts, or token ids; passed through.",
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer", "minimum": 0}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    ],
}


# What a route's required field holds, where llmd's clients agree on it (else any JSON).
_FIELD_SHAPES: dict[str, Schema] = {
    "messages": {"type": "array", "items": _MESSAGE, "description": "Required; llmd checks it is an array."},
    "prompt": _PROMPT,
    "input": {"description": "Text, texts, token ids or items; passed through.", "anyOf": [*_PROMPT["anyOf"], {}]},
}


# --- success bodies: OpenAI's shapes, loose -----------------------------------------------------

_USAGE: Schema = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}


def _schemas() -> dict[str, Schema]:
    return {
        "Error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": _nullable({"type": "string"}),
                "code": _nullable({"type": "string"}),
            },
        },
        "ErrorResponse": {"type": "object", "required": ["error"], "properties": {"error": _ref("Error")}},
        "AnthropicErrorResponse": {
            "type": "object",
            "description": "Anthropic's error envelope, on the Anthropic Messages routes.",
            "required": ["type", "error"],
            "properties": {
                "type": {"const": "error"},
                "error": {
                    "type": "object",
                    "required": ["type", "message"],
                    "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
        "Model": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
            },
        },
        "ListModelsResponse": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
        },
        "CompletionUsage": _USAGE,
        "CreateChatCompletionResponse": {
            "type": "object",
            "description": "OpenAI's chat.completion, as the upstream wrote it.",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {"type": "object"}},
                "usage": _ref("CompletionUsage"),
            },
        },
        "CreateCompletionResponse": {
            "type": "object",
            "description": "OpenAI's text_completion, as the upstream wrote it.",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "text_completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {"type": "object"}},
                "usage": _ref("CompletionUsage"),
            },
        },
        "CreateEmbeddingResponse": {
            "type": "object",
            "description": "OpenAI's embedding list, as the upstream wrote it.",
            "required": ["object", "model", "data"],
            "properties": {
                "object": {"const": "list"},
                "model": {"type": "string"},
                "data": {"type": "array", "items": {"type": "object"}},
                "usage": {"type": "object"},
            },
        },
    }


# --- the document ------------------------------------------------------------------------------


# Per route name (routes.py): summary, operationId (OpenAI's), success body.
_ROUTE_DOCS: dict[str, tuple[str, str, Schema]] = {
    "chat": ("Chat completion, relayed to a replica", "createChatCompletion", _ref("CreateChatCompletionResponse")),
    "completions": ("Text completion, relayed to a replica", "createCompletion", _ref("CreateCompletionResponse")),
    "embeddings": ("Embeddings, relayed to a replica", "createEmbedding", _ref("CreateEmbeddingResponse")),
}
# Routes whose answer may be an event stream (``stream: true``).
_STREAMING = frozenset({"chat", "completions", "messages", "responses", "completion", "infill"})


def _inference(summary: str, op_id: str, body: Schema, ok: Schema, stream: bool, style: str) -> Schema:
    responses: Schema = {"200": _ok("The upstream's answer, relayed.", ok, stream=stream)}
    for status in INFERENCE_ERRORS:
        responses[str(status)] = _error_response(status, style=style)
    responses["default"] = _RELAYED
    return {
        "post": {
            "summary": summary,
            "operationId": op_id,
            "parameters": [_REQUEST_ID_PARAM],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": responses,
        }
    }


def build(cfg: Config) -> dict[str, Any]:
    """The document for this config (model names as the ``model`` enum)."""
    models = sorted(cfg.model_names())
    open_mode = not cfg.keys
    ok_json = {"type": "object", "additionalProperties": True}
    # `model` may be left out only where a default serves it (the key's, or the server's).
    model_required = not cfg.server.default_model and not any(k.default_model for k in cfg.keys)
    auth_errors = {str(s): _error_response(s) for s in (401, 500)}
    security: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
    if open_mode:
        security.append({})  # no keys configured: every caller is 'anonymous'
    paths: dict[str, Schema] = {
        "/v1/models": _get(
            "listModels",
            "Models and aliases this key may use",
            {"200": _ok("The models.", _ref("ListModelsResponse")), **auth_errors},
        ),
        "/models": _get(
            "listModelsUnversioned",
            "The same list, without /v1 (llama-server's path)",
            {"200": _ok("The models.", _ref("ListModelsResponse")), **auth_errors},
        ),
        "/v1/models/{model}": _get(
            "retrieveModel",
            "One model, if this key may use it",
            {"200": _ok("The model.", _ref("Model")), "404": _error_response(404), **auth_errors},
            parameters=[
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            ],
        ),
        "/v1/tools": _get(
            "listTools",
            'Server tools this key may name in a chat request (`{"type": "server", "name": ...}`)',
            {
                "200": _ok(
                    "The tools, each with the JSON schema of its arguments.",
                    {
                        "type": "object",
                        "properties": {
                            "object": {"const": "list"},
                            "data": {"type": "array", "items": {"type": "object", "additionalProperties": True}},
                        },
                    },
                ),
                **auth_errors,
            },
        ),
        "/health": _get(
            "health",
            "Liveness",
            {
                "200": _ok(
                    "Alive.", {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
                )
            },
            public=True,
        ),
        "/readyz": _get(
            "readyz",
            "Readiness: every model has a READY replica",
            {
                "200": _ok("Ready; replica states by model.", ok_json),
                "503": _ok("Not ready (a model without a READY replica, or draining); same body.", ok_json),
            },
            public=True,
        ),
        "/metrics": _get(
            "metrics",
            "Prometheus text",
            {"200": _ok("Prometheus exposition.", {"type": "string"}, media="text/plain")},
            public=True,
        ),
        "/version": _get(
            "version",
            "llmd's version",
            {
                "200": _ok(
                    "Version.",
                    {"type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}},
                )
            },
            public=True,
        ),
        "/openapi.json": _get(
            "openapi",
            "This document",
            {"200": _ok("OpenAPI 3.1 document.", ok_json)},
            public=True,
        ),
        **admindoc.paths(ok_json),
    }
    for route in ROUTES:  # the route table: every inference path llmd serves
        summary, op_id, ok = _ROUTE_DOCS.get(
            route.name, (f"`{route.name}`, relayed to a replica", route.name, {"type": "object"})
        )
        body = _envelope(models, route.required, model_required)
        for i, path in enumerate(route.paths):
            doc = _inference(summary, op_id + (f"_{i}" if i else ""), body, ok, route.name in _STREAMING, route.errors)
            paths[path] = doc
    rag_paths, rag_schemas = ragdoc.build(cfg, _error_response, _ok, _REQUEST_ID_PARAM,
                                          _envelope(models, "messages", False))  # fmt: skip
    paths.update(rag_paths)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "llmd",
            "version": __version__,
            "description": (
                "An OpenAI-compatible gateway. Request fields beyond those listed pass through to the "
                "upstream untouched; upstream answers are relayed with their own status and body. Every "
                'error llmd itself produces is OpenAI\'s envelope `{"error": {"message", "type", '
                '"param", "code"}}` (Anthropic\'s `{"type": "error", "error": {"type", "message"}}` on the '
                "Anthropic Messages routes); an unknown route is 404 and a wrong method 405. "
                f"Bodies over {cfg.server.max_body_bytes} bytes are refused with 413."
            ),
        },
        "servers": [{"url": "/"}],
        "security": security,
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "`X-API-Key: <key>`"},
            },
            "parameters": {
                "X-Request-ID": {
                    "name": "X-Request-ID",
                    "in": "header",
                    "required": False,
                    "description": "Kept when it matches [A-Za-z0-9._:-]{1,128}; otherwise llmd makes a new one.",
                    "schema": {"type": "string"},
                }
            },
            "headers": {
                "X-Request-ID": {
                    "description": "The request's id (the client's, or a new one).",
                    "schema": {"type": "string"},
                },
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "required": True,
                    "schema": {"type": "string", "pattern": r"^[0-9]+$"},
                },
            },
            "schemas": {**_schemas(), **rag_schemas},
        },
    }


class _Cache:
    """The encoded document of one config object; a reload swaps the config, so a new one is built."""

    __slots__ = ("body", "cfg")

    def __init__(self) -> None:
        self.cfg: Config | None = None
        self.body = b""

    def get(self, cfg: Config) -> bytes:
        if self.cfg is not cfg:
            self.body, self.cfg = msgspec.json.encode(build(cfg)), cfg
        return self.body


def handler(services: Services) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /openapi.json`` for this app (unauthenticated: the document names no secret)."""
    cache = _Cache()

    async def openapi_route(request: web.Request) -> web.Response:
        return web.Response(body=cache.get(services.runtime.cfg), content_type="application/json")

    return openapi_route
