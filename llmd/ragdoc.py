"""The retrieval routes (rag.py) in llmd's OpenAPI document (openapi.py), when the config has
collections. Request bodies are the JSON schemas of the Structs rag.py decodes them with, so
the document cannot drift from what the routes accept. openapi.py hands in its helpers (error
responses, success responses) to keep one way of writing them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from .config import Config
from .rag import RagDocumentsBody, RagOptions, RagSearchBody

Schema = dict[str, Any]

ERRORS = (400, 401, 403, 404, 409, 413, 429, 500, 502, 503, 504)
_TEXT = {
    403: "The key may not use this collection (`collection_not_allowed`) or its models (`model_not_allowed`).",
    404: "No such collection (`collection_not_found`), or document on DELETE (`document_not_found`).",
}


def _obj(props: Schema, required: list[str] | None = None) -> Schema:
    out: Schema = {"type": "object", "properties": props, "additionalProperties": True}
    if required:
        out["required"] = required
    return out


def build(
    cfg: Config, error: Callable[..., Schema], ok: Callable[..., Schema], request_id: Schema, chat_body: Schema
) -> tuple[dict[str, Schema], dict[str, Schema]]:
    """(paths, component schemas) of the retrieval routes; none when no collection is configured."""
    names = list(cfg.rag.collections)
    if not names:
        return {}, {}
    _, components = msgspec.json.schema_components(
        [RagDocumentsBody, RagSearchBody, RagOptions], ref_template="#/components/schemas/{name}"
    )
    coll: Schema = {"name": "collection", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}

    def op(
        method: str,
        op_id: str,
        summary: str,
        result: Schema,
        body: Schema | None = None,
        params: list[Schema] | None = None,
        stream: bool = False,
    ) -> Schema:
        responses: Schema = {"200": ok(summary, result, stream=stream)}
        for status in ERRORS:
            responses[str(status)] = error(status, _TEXT.get(status))
        out: Schema = {
            "summary": summary,
            "operationId": op_id,
            "parameters": [request_id, coll, *(params or [])],
            "responses": responses,
        }
        if body is not None:
            out["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        return {method: out}

    ref = {name: {"$ref": f"#/components/schemas/{name}"} for name in components}
    usage = _obj({"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}})
    listed = _obj({"object": {"const": "list"}, "data": {"type": "array", "items": _obj({})}}, ["object", "data"])
    chunk = _obj(
        {
            "id": {"type": "string"},
            "chunk": {"type": "integer"},
            "score": {"type": "number"},
            "text": {"type": "string"},
            "metadata": {"type": "object"},
        }
    )
    chunks = _obj(
        {"object": {"const": "list"}, "data": {"type": "array", "items": chunk}, "usage": usage}, ["object", "data"]
    )
    chat = {**chat_body, "properties": {**chat_body["properties"], "rag": ref["RagOptions"]}}
    sources = _obj({"collection": {"type": "string"}, "sources": {"type": "array", "items": _obj({})}})
    grounded = _obj({"choices": {"type": "array"}, "usage": usage, "rag": sources})
    query = [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
        {"name": "after", "in": "query", "schema": {"type": "string"}},
        {
            "name": "filter",
            "in": "query",
            "description": "A JSON object: metadata key -> value.",
            "schema": {"type": "string"},
        },
    ]
    doc_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
    base = "/v1/rag/{collection}"
    paths: dict[str, Schema] = {
        base + "/documents": {
            **op(
                "post",
                "ragAddDocuments",
                "Add texts: chunked, embedded, stored (re-adding an id replaces it)",
                listed,
                ref["RagDocumentsBody"],
            ),
            **op("get", "ragListDocuments", "The collection's documents, in id order", listed, params=query),
        },
        base + "/documents/{id}": op("delete", "ragDeleteDocument", "Delete a document", _obj({}), params=[doc_id]),
        base + "/search": op("post", "ragSearch", "The chunks closest to a query", chunks, ref["RagSearchBody"]),
        base + "/chat": op(
            "post", "ragChat", "A chat completion grounded in the collection", grounded, chat, stream=True
        ),
        base + "/chat/completions": op(
            "post", "ragChatCompletions", "The same, for an OpenAI SDK's base_url", grounded, chat, stream=True
        ),
    }
    collections: Schema = {
        "get": {
            "summary": "The collections this key may use",
            "operationId": "ragListCollections",
            "parameters": [request_id],
            "responses": {"200": ok("Collections.", listed), "401": error(401)},
        }
    }
    return {"/v1/rag": collections, **paths}, components
