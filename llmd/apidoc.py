"""The OpenAPI document's pieces: references, llmd's errors with their HTTP form, success
responses, GET/POST operations. ``openapi.py`` assembles the document from them, with the
path groups of ``admindoc.py`` and ``ragdoc.py``."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


# --- errors: (status, when llmd answers it, whether Retry-After is sent) ---------------------

ERRORS: dict[int, tuple[str, bool]] = {
    400: ("Invalid JSON, or a field llmd reads has the wrong type or value (`param` names it).", False),
    401: ("No API key, or an unknown or revoked one (`code: invalid_api_key`).", False),
    403: ("The key may not use this model (`model_not_allowed`) or this admin route (`admin_required`).", False),
    404: ("`model_not_found` (unknown model, or not visible to this key) or an unknown route.", False),
    409: (
        "The collection's vectors have another dimension than its model's (`dimension_mismatch`), or the "
        "model's config does not allow it: `not_on_demand` (load: always) or `pinned`.",
        False,
    ),
    413: ("The body is larger than `server.max_body_bytes` (`request_too_large`).", False),
    429: (
        "A per-key limit: `rate_limit_exceeded` (requests or tokens per minute/hour, concurrency) or "
        "`insufficient_quota` (monthly tokens). `Retry-After` says when to retry.",
        True,
    ),
    500: ("A bug in llmd (`Internal error in llmd`; its log has the request id).", False),
    502: ("No replica could be reached (`upstream_unreachable`); an upstream's own 502 is relayed as it is.", False),
    503: (
        "The model's queue is full or the wait for a slot expired (`server_overloaded`), or an on-demand "
        "model cannot start within `server.memory_budget` (`insufficient_memory`); an upstream's "
        "own 503 is relayed as it is once no other replica is left.",
        True,
    ),
    504: ("The upstream did not answer in time (`upstream_timeout`).", False),
}

INFERENCE_ERRORS = (400, 401, 403, 404, 413, 429, 500, 502, 503, 504)


def error_response(status: int, description: str | None = None, style: str = "openai") -> Schema:
    text, retry_after = ERRORS[status]
    schema = ref("AnthropicErrorResponse" if style == "anthropic" else "ErrorResponse")
    out: Schema = {
        "description": description or text,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
        "content": {"application/json": {"schema": schema}},
    }
    if retry_after:
        out["headers"]["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    return out


def ok(description: str, schema: Schema, media: str = "application/json", stream: bool = False) -> Schema:
    content: Schema = {media: {"schema": schema}}
    if stream:
        # The schema of one event (as OpenAPI 3.2's itemSchema means it): `data` is a chunk's
        # JSON, or `[DONE]`; the events are relayed as the upstream writes them.
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "description": "One server-sent event.",
                "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
            }
        }
    return {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
        "content": content,
    }


RELAYED = {
    "description": "An upstream's own answer (any other status), relayed with its status and body.",
    "content": {"application/json": {"schema": {}}, "text/plain": {"schema": {"type": "string"}}},
}

REQUEST_ID_PARAM: Schema = {"$ref": "#/components/parameters/X-Request-ID"}


def get(op_id: str, summary: str, responses: Schema, *, public: bool = False, **extra: Any) -> Schema:
    op: Schema = {
        "summary": summary,
        "operationId": op_id,
        "parameters": [REQUEST_ID_PARAM, *extra.pop("parameters", [])],
        "responses": responses,
        **extra,
    }
    if public:
        op["security"] = []
    return {"get": op}


def post(op_id: str, summary: str, responses: Schema, **extra: Any) -> Schema:
    return {"post": get(op_id, summary, responses, **extra)["get"]}
