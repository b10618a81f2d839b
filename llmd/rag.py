"""Retrieval routes: documents, search and grounded chat on a collection of ``rag.collections``.

    GET    /v1/rag                              the collections the key may use
    POST   /v1/rag/{collection}/documents       texts (+ metadata, ids): chunked, embedded, stored
    GET    /v1/rag/{collection}/documents       paged (after, limit), metadata filter
    DELETE /v1/rag/{collection}/documents/{id}
    POST   /v1/rag/{collection}/search          query, top_k, filter: chunks with scores
    POST   /v1/rag/{collection}/chat            a chat completion request + rag: {top_k, filter}

Every model call these make is a request of its own down llmd's pipeline (pipeline.serve_round:
the key's limits, the model's fair queue, the relay, one ledger row), under the calling key and
with the route: ``rag_documents``, ``rag_search`` or ``rag_chat``. Embedding calls are
``<request id>.e1``, ``.e2``...; the grounded chat's model call is ``<request id>`` itself.
A document is stored only when all of its request's chunks were embedded: a failure stores
nothing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from typing import Annotated, Any

import msgspec
from aiohttp import web

from . import envelope
from .appkeys import CALL, SERVICES
from .auth import Principal
from .call import Call
from .chunker import chunks, tail
from .config import CollectionConfig
from .errors import ApiError, bad_request, model_not_allowed, upstream_failed
from .grounding import Sources, grounded, query_of, rag_field
from .pipeline import read_body, serve_round
from .routes import BY_NAME
from .runtime import Runtime, Services
from .stores import store_errors
from .vectors import Document, Filter, Hit

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

# Each model call's route in the ledger and the metrics: the retrieval route that made it, with
# the upstream protocol (path, meter) of the call itself.
ROUTES = {
    "rag_documents": replace(BY_NAME["embeddings"], name="rag_documents"),
    "rag_search": replace(BY_NAME["embeddings"], name="rag_search"),
    "rag_chat_embed": replace(BY_NAME["embeddings"], name="rag_chat"),  # a grounded chat's query
    "rag_chat": replace(BY_NAME["chat"], name="rag_chat"),
}

MAX_ID_CHARS = 256
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
TopK = Annotated[int, msgspec.Meta(ge=1)]


class RagDocumentsBody(msgspec.Struct, forbid_unknown_fields=True):
    texts: list[str]
    metadata: list[dict[str, Any]] | dict[str, Any] | None = None  # one per text, or one for all
    ids: list[Id] | None = None  # default: the sha256 of the text (re-adding a text replaces it)


class RagSearchBody(msgspec.Struct, forbid_unknown_fields=True):
    query: str
    top_k: TopK | None = None
    filter: Filter | None = None


class RagOptions(msgspec.Struct, forbid_unknown_fields=True):
    top_k: TopK | None = None
    filter: Filter | None = None


# --- the routes ------------------------------------------------------------------------------------------


async def list_collections(request: web.Request) -> web.Response:
    services, rt, principal = _begin(request)
    data = []
    for name, c in rt.cfg.rag.collections.items():
        if not _allowed(c, principal):
            continue
        with store_errors(name, c):
            store = await services.vectors.get(rt.cfg, c)
            count, dimension = await store.count(name), await store.dimension(name)
        data.append(
            {
                "id": name,
                "object": "rag.collection",
                "embedding_model": c.embedding_model,
                "chat_model": c.chat_model,
                "store": c.store,
                "documents": count,
                "dimension": dimension,
            }
        )
    return web.json_response({"object": "list", "data": data})


async def add_documents(request: web.Request) -> web.Response:
    services, rt, principal = _begin(request)
    name, coll = _collection(request, rt, principal)
    body = _body(await read_body(request, rt.cfg.server.max_body_bytes), RagDocumentsBody)
    docs = _documents(body, coll)
    with store_errors(name, coll):  # a store that cannot open fails before any model call
        store = await services.vectors.get(rt.cfg, coll)
    texts = [c for d in docs for c in d.chunks]
    vectors: list[list[float]] = []
    tokens = 0
    call, step = request[CALL], coll.embed_batch
    for seq, i in enumerate(range(0, len(texts), step), 1):
        got, n = await _embed(call, rt, services, principal, coll, texts[i : i + step], "rag_documents", seq)
        vectors += got
        tokens += n
    at = 0
    for d in docs:
        d.vectors = vectors[at : at + len(d.chunks)]
        at += len(d.chunks)
    with store_errors(name, coll):
        await store.upsert(name, docs)
    data = [{"id": d.id, "object": "rag.document", "chunks": len(d.chunks)} for d in docs]
    return web.json_response(
        {"object": "list", "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )


async def list_documents(request: web.Request) -> web.Response:
    services, rt, principal = _begin(request)
    name, coll = _collection(request, rt, principal)
    q = request.query
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise bad_request("'limit' must be an integer from 1 to 1000.", param="limit")
    where: Filter = {}
    if "filter" in q:
        where = _filter(_body(q["filter"].encode(), Filter, "filter"), coll, "filter")  # type: ignore[arg-type]
    with store_errors(name, coll):
        store = await services.vectors.get(rt.cfg, coll)
        docs = await store.documents(name, limit + 1, q.get("after"), where)
    data = [
        {"id": d.id, "object": "rag.document", "chunks": d.chunks, "metadata": d.metadata, "created": int(d.created)}
        for d in docs[:limit]
    ]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "has_more": len(docs) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


async def delete_document(request: web.Request) -> web.Response:
    services, rt, principal = _begin(request)
    name, coll = _collection(request, rt, principal)
    doc_id = request.match_info["id"]
    with store_errors(name, coll):
        store = await services.vectors.get(rt.cfg, coll)
        found = await store.delete(name, doc_id)
    if not found:
        raise ApiError(404, f"No document '{doc_id}' in collection '{name}'.", code="document_not_found", param="id")
    return web.json_response({"id": doc_id, "object": "rag.document", "deleted": True})


async def search(request: web.Request) -> web.Response:
    services, rt, principal = _begin(request)
    name, coll = _collection(request, rt, principal)
    body = _body(await read_body(request, rt.cfg.server.max_body_bytes), RagSearchBody)
    if not body.query.strip():
        raise bad_request("'query' must not be empty.", param="query")
    where = _filter(body.filter, coll, "filter")
    hits, tokens, _ = await _retrieve(
        request[CALL], rt, services, principal, name, coll, body.query, body.top_k, where, "rag_search"
    )
    data = [
        {
            "object": "rag.chunk",
            "id": h.doc_id,
            "chunk": h.chunk,
            "score": round(h.score, 6),
            "text": h.text,
            "metadata": h.metadata,
        }
        for h in hits
    ]
    return web.json_response(
        {"object": "list", "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )


async def chat(request: web.Request) -> web.StreamResponse:
    """A chat completion request grounded in the collection: retrieve for the last user
    message, put the chunks in front (grounding.py), relay to the chat model like
    /v1/chat/completions, the sources in the answer's ``rag`` field."""
    services, rt, principal = _begin(request)
    name, coll = _collection(request, rt, principal)
    call = request[CALL]
    raw = await read_body(request, rt.cfg.server.max_body_bytes)
    envelope.decode(raw, "messages")  # the usual 400s of a chat request, before any model call
    try:
        doc = _decode(raw)
    except (msgspec.DecodeError, RecursionError):
        raise bad_request("We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise bad_request("The request body must be a JSON object.")
    rag = doc.pop("rag", None)  # absent or null: the collection's defaults; [] or false are not options
    opts = _body(_encode({} if rag is None else rag), RagOptions, "rag")
    model = _model(rt, principal, doc.get("model") or coll.chat_model, "model")
    tools = doc.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and t.get("type") == "server" for t in tools):
        # the grounded chat is one model call, not toolloop.py's loop: relayed, the upstream refuses them
        raise bad_request("Server tools are not run on a grounded chat; use /v1/chat/completions.", param="tools")
    query = query_of(doc["messages"])
    where = _filter(opts.filter, coll, "rag")
    hits, embed_tokens, timings = await _retrieve(
        call, rt, services, principal, name, coll, query, opts.top_k, where, "rag_chat_embed"
    )
    doc["messages"] = grounded(doc["messages"], hits)
    doc["model"] = model
    sub = _sub_call(call, rt, principal, "rag_chat", model, call.request_id)
    body = _encode(doc)
    sub.env = envelope.decode(body, "messages")
    mcfg = rt.cfg.models[model]
    sub.upstream_body, sub.hide_usage = envelope.upstream_body(body, sub.env, mcfg.upstream_model or model, True)
    sub.rewrite = Sources(rag_field(name, hits, embed_tokens, timings))
    resp = await serve_round(sub, rt, services)
    call.status = resp.status
    return resp


# --- the steps ---------------------------------------------------------------------------------------------


def _begin(request: web.Request) -> tuple[Services, Runtime, Principal]:
    services = request.app[SERVICES]
    rt = services.runtime  # the config this request started under, for all its steps
    return services, rt, rt.keys.authenticate(request)


def _allowed(c: CollectionConfig, p: Principal) -> bool:
    return (not c.tiers and not c.keys) or p.tier in c.tiers or p.key_id in c.keys


def _collection(request: web.Request, rt: Runtime, p: Principal) -> tuple[str, CollectionConfig]:
    name = request.match_info["collection"]
    coll = rt.cfg.rag.collections.get(name)
    if coll is None:
        raise ApiError(
            404, f"No collection '{name}' (GET /v1/rag lists them).", code="collection_not_found", param="collection"
        )
    if not _allowed(coll, p):
        raise ApiError(
            403,
            f"Key '{p.key_id}' may not use collection '{name}'.",
            type="permission_error",
            code="collection_not_allowed",
            param="collection",
        )
    _model(rt, p, coll.embedding_model, "collection")
    return name, coll


def _model(rt: Runtime, p: Principal, name: str | None, param: str) -> str:
    if not name:
        raise bad_request("This collection has no chat_model; name a 'model'.", param="model")
    model = rt.model_names.get(name)
    if model is None:
        raise bad_request(f"Model '{name}' is not served here.", param=param)
    if not p.may_use(model):
        raise model_not_allowed(p.key_id, name)
    return model


def _body(raw: bytes, kind: Any, param: str | None = None) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:
        where = str(e).split("at `$", 1)[1].rstrip("`").lstrip(".") if "at `$" in str(e) else ""
        raise bad_request(f"Invalid request: {e}.", param=param or where.split("[")[0] or None) from None
    except (msgspec.DecodeError, RecursionError):
        raise bad_request(f"'{param or 'body'}' is not valid JSON.", param=param, code="invalid_json") from None


def _filter(where: Filter | None, coll: CollectionConfig, param: str) -> Filter:
    """A metadata filter the stores can take, checked before any model call: an integer
    past 64 bits cannot be compared by SQLite or Qdrant, nor can a Qdrant filter path quote a
    key holding `"` (either would fail the store: a 503 after the embedding call)."""
    for k, v in (where or {}).items():
        if coll.store == "qdrant" and '"' in k:
            raise bad_request(f"filter key '{k}': a qdrant collection cannot filter on keys holding '\"'.", param=param)
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
            raise bad_request(f"filter value of '{k}' is outside the 64-bit integer range.", param=param)
    return where or {}


def _documents(body: RagDocumentsBody, coll: CollectionConfig) -> list[Document]:
    """The request's documents, chunked; every problem a 400 before anything is embedded."""
    n = len(body.texts)
    if n == 0:
        raise bad_request("'texts' must hold at least one text.", param="texts")
    metas = body.metadata if isinstance(body.metadata, list) else [body.metadata or {}] * n
    if len(metas) != n:
        raise bad_request(f"'metadata' holds {len(metas)} objects for {n} texts.", param="metadata")
    ids = body.ids or [hashlib.sha256(t.encode()).hexdigest()[:32] for t in body.texts]
    if len(ids) != n:
        raise bad_request(f"'ids' holds {len(ids)} ids for {n} texts.", param="ids")
    if len(set(ids)) != n:
        if body.ids is None:  # the default ids are the texts' hashes: say so, not "ids"
            raise bad_request("Two texts are the same (their default ids are equal): pass 'ids'.", param="texts")
        raise bad_request("'ids' must be unique within a request.", param="ids")
    docs = []
    for i, (text, meta, doc_id) in enumerate(zip(body.texts, metas, ids, strict=True)):
        size = len(text.encode())
        if size > coll.max_document_bytes:
            raise bad_request(
                f"texts[{i}] is {size} bytes; this collection takes at most {coll.max_document_bytes}.",
                param="texts",
                code="document_too_large",
            )
        pieces = chunks(text, coll.chunk.tokens, coll.chunk.overlap)
        if not pieces:
            raise bad_request(f"texts[{i}] is empty.", param="texts")
        docs.append(Document(doc_id, meta, pieces, []))
    return docs


async def _retrieve(
    call: Call,
    rt: Runtime,
    services: Services,
    p: Principal,
    name: str,
    coll: CollectionConfig,
    query: str,
    top_k: int | None,
    where: Filter,
    route: str,
) -> tuple[list[Hit], int, dict[str, float]]:
    k = top_k or coll.top_k
    if k > coll.max_top_k:
        raise bad_request(f"'top_k' is at most {coll.max_top_k} on this collection.", param="top_k")
    with store_errors(name, coll):
        store = await services.vectors.get(rt.cfg, coll)
    # The query embedded is at most one chunk, its end (a message ends with its ask): a longer
    # one (a pasted log) exceeds what the embeddings model takes in one batch (llama-server:
    # "input is too large to process", a 500) and failed the whole search or chat.
    query = tail(query, coll.chunk.tokens)
    t0 = time.monotonic()
    vectors, tokens = await _embed(call, rt, services, p, coll, [query], route, 1)
    t1 = time.monotonic()
    with store_errors(name, coll):
        hits = await store.search(name, vectors[0], k, where)
    t2 = time.monotonic()
    return hits, tokens, {"embed": round((t1 - t0) * 1000, 2), "search": round((t2 - t1) * 1000, 2)}


def _sub_call(call: Call, rt: Runtime, p: Principal, route: str, model: str, request_id: str) -> Call:
    sub = Call(request=call.request, request_id=request_id, client_ip=call.client_ip)
    sub.route, sub.principal, sub.model = ROUTES[route], p, model
    headers = {"Content-Type": "application/json", "X-Request-ID": request_id, "Accept-Encoding": "identity"}
    mcfg = rt.cfg.models[model]
    if mcfg.api_key_env:
        headers["Authorization"] = f"Bearer {rt.upstream_keys.get(mcfg.api_key_env, '')}"
    sub.upstream_headers = headers
    return sub


async def _embed(
    call: Call,
    rt: Runtime,
    services: Services,
    p: Principal,
    coll: CollectionConfig,
    texts: list[str],
    route: str,
    seq: int,
) -> tuple[list[list[float]], int]:
    """One embedding call through the pipeline (limits, fair queue, relay, its ledger row):
    the vectors of ``texts`` in order, and the prompt tokens the model reported."""
    model = rt.model_names[coll.embedding_model]
    sub = _sub_call(call, rt, p, route, model, f"{call.request_id}.e{seq}")
    body = _encode({"model": rt.cfg.models[model].upstream_model or model, "input": texts})
    sub.env = envelope.decode(body, "input")
    sub.upstream_body = body
    resp = await serve_round(sub, rt, services)
    data = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b""
    if resp.status != 200:
        raise upstream_failed(resp.status, f"embedding model '{model}': {data[:500].decode(errors='replace')}")
    try:
        items = sorted(_decode(data)["data"], key=lambda d: d["index"])
        vectors = [[float(x) for x in d["embedding"]] for d in items]
    except (msgspec.DecodeError, KeyError, TypeError, ValueError):
        raise upstream_failed(502, f"embedding model '{model}' did not answer with embeddings") from None
    if len(vectors) != len(texts) or any(v and isinstance(v[0], list) for v in vectors):
        raise upstream_failed(502, f"embedding model '{model}' answered {len(vectors)} vectors for {len(texts)} texts")
    return vectors, sub.exchange.prompt_tokens
