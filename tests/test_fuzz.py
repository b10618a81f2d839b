"""llmd's OpenAPI document, and schema fuzzing against it (tests/fuzzing.py).

The fuzz run sends a few hundred schemathesis-generated requests (valid and hostile) to llmd
over a fake upstream, then checks: no 5xx of llmd's own, every 4xx of llmd's in its envelope,
every response documented (status, content type, headers, llmd's own bodies), one ledger row
per request that reached the limits, and nothing left held (limiter, monthly reservations,
replica slots, admission queue). bench/fuzz_bench.py does the same with 10,000+.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import msgspec
import schemathesis
from openapi_spec_validator import validate

from llmd import __version__, openapi
from llmd.auth import hash_secret
from llmd.configfile import parse
from llmd.envelope import Envelope
from llmd.routes import ROUTES
from tests import fuzzing
from tests.fakeproc import FakeProc

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
SERVED = {
    "/v1/models", "/models", "/v1/models/{model}", "/v1/tools", *INFERENCE_PATHS, "/health", "/readyz", "/metrics",
    "/version", "/openapi.json", "/admin/status", "/admin/usage", "/admin/models/{model}/load",
    "/admin/models/{model}/unload", "/admin/usage/daily", "/admin/keys", "/admin/keys/new",
    *(p for r in ROUTES for p in r.paths),
}  # fmt: skip


async def test_openapi_json_is_served_without_a_key_and_is_a_valid_document(fake: FakeProc, llmd_for) -> None:
    """1. llmd with keys: GET /openapi.json answers 200 with no key, the same bytes twice.
    2. It validates as OpenAPI 3.1 and schemathesis loads every operation.
    3. It names llmd's routes, version, models (enum of names and aliases) and both key schemes."""
    keys = [{"id": "k", "sha256": hash_secret("sk-test")}]
    async with llmd_for(fake, keys=keys) as llmd, aiohttp.ClientSession() as s:
        async with s.get(llmd.url + "/openapi.json") as r:
            assert r.status == 200 and r.content_type == "application/json"
            first = await r.read()
        async with s.get(llmd.url + "/openapi.json") as r:
            assert await r.read() == first  # encoded once, then cached
    doc = msgspec.json.decode(first)
    validate(doc)
    assert all(op.ok() for op in schemathesis.openapi.from_dict(doc).get_all_operations())
    assert set(doc["paths"]) == SERVED
    assert doc["info"]["version"] == __version__
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"
    assert {} not in doc["security"]  # keys configured: a key is required
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["properties"]["model"]["enum"] == ["gpt-4o-mini", "m"]


def test_every_inference_route_documents_every_error_llmd_produces() -> None:
    """Each path of the route table lists 400, 401, 403, 404, 413, 429, 502, 503, 504 (and
    500, a bug) in the route's error envelope (OpenAI's, or Anthropic's on its routes); 429 and
    503 require Retry-After. The body lists every field of envelope.Envelope, requires the
    route's own field (and model, unless a default_model serves requests without one), and
    lets the rest through (additionalProperties)."""
    cfg = parse('models: {m: {backend: openai, urls: ["http://127.0.0.1:9/v1"]}}')
    doc = openapi.build(cfg)
    assert {} in doc["security"]  # no keys: open mode, no key needed
    envelope_fields = {f.name for f in msgspec.structs.fields(Envelope)}
    assert {p for r in ROUTES for p in r.paths} >= set(INFERENCE_PATHS)
    for route in ROUTES:
        envelope = "AnthropicErrorResponse" if route.errors == "anthropic" else "ErrorResponse"
        for path in route.paths:
            op = doc["paths"][path]["post"]
            for status in ("400", "401", "403", "404", "413", "429", "500", "502", "503", "504"):
                resp = op["responses"][status]
                assert resp["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{envelope}"}
                assert ("Retry-After" in resp["headers"]) == (status in ("429", "503")), (path, status)
            body = op["requestBody"]["content"]["application/json"]["schema"]
            assert body["required"] == ["model", *([route.required] if route.required else [])]
            assert body["additionalProperties"] is True and set(body["properties"]) == envelope_fields
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["message", "type", "param", "code"]
    assert doc["components"]["headers"]["Retry-After"]["required"] is True
    with_default = parse('server: {default_model: m}\nmodels: {m: {backend: openai, urls: ["http://127.0.0.1:9/v1"]}}')
    chat = openapi.build(with_default)["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    assert chat["application/json"]["schema"]["required"] == ["messages"]


def test_fuzzing_finds_no_5xx_no_bare_4xx_no_lost_row_and_no_leak(tmp_path: Path) -> None:
    """1. 500 generated requests (positive and negative, every route, five identities: two
    tiers, admin, revoked, none, made-up) against llmd over the fake, then a few well-formed
    ones (streamed and not) so that 200s are always checked too.
    2. Per response: no llmd 5xx, llmd's 4xx in its envelope, 429 with Retry-After, an
    x-request-id, and schemathesis's conformance checks pass (status, content type,
    headers, llmd's own bodies).
    3. After: the ledger has exactly one row per request that reached the limits (same
    request ids), and the limiter, monthly reservations, replica slots and queues are all
    back to zero."""
    logging.getLogger("llmd.access").setLevel(logging.WARNING)  # 500 access lines are noise here
    try:
        with fuzzing.Stack(tmp_path) as stack:
            found = fuzzing.fuzz(stack, 500)
            fuzzing.send_known(stack, found)
            state = stack.settle()
            errors = [r.getMessage() for r in stack.errors]
    finally:
        logging.getLogger("llmd.access").setLevel(logging.NOTSET)
    by_status = found.by_status()
    assert len(found.sent) == 500 + len(fuzzing.KNOWN)
    assert [s.status for s in found.sent[-len(fuzzing.KNOWN) :]] == [200] * (len(fuzzing.KNOWN) - 1) + [401]
    assert found.problems == [], "\n\n".join(found.problems[:5])
    assert not found.conformance, found.conformance_examples
    assert errors == []
    # The run exercised what it is meant to: successes, limits and each early refusal. (The
    # generated requests are derandomized but follow the document: a route or field added to
    # it shifts how many reach the 12 rpm tier's window, hence a floor, not an exact count.)
    assert by_status[200] > 20 and by_status[429] >= 3, by_status
    assert all(by_status[s] for s in (400, 401, 403, 404)), by_status
    rows = fuzzing.ledger_rows(fuzzing.ledger_path(stack))
    expected = found.expected_rows()
    assert list(fuzzing.ledger_mismatch(expected, rows)) == []
    assert sum(rows.values()) == sum(expected.values()) > 25
    assert fuzzing.unexplained_aborts(fuzzing.ledger_path(stack), found) == []
    assert fuzzing.leaks(state) == []


def test_fuzzing_the_retrieval_routes(tmp_path: Path) -> None:
    """The same fuzzing with a rag collection configured, on the /v1/rag routes only (the
    main run's config has none, so its document has none): 300 generated requests, no llmd
    5xx, llmd's 4xx in its envelope, conformance, no leak; every ledger row is a model call of
    a request that was answered (``<id>`` or ``<id>.eN``), and every answered search, chat and
    add has its rows."""
    logging.getLogger("llmd.access").setLevel(logging.WARNING)
    try:
        with fuzzing.Stack(tmp_path, rag=True) as stack:
            found = fuzzing.fuzz(stack, 300, only="/v1/rag")
            state = stack.settle()
            errors = [r.getMessage() for r in stack.errors]
    finally:
        logging.getLogger("llmd.access").setLevel(logging.NOTSET)
    by_status = found.by_status()
    assert found.problems == [], "\n\n".join(found.problems[:5])
    assert not found.conformance, found.conformance_examples
    assert errors == [] and fuzzing.leaks(state) == []
    assert by_status[200] > 20 and all(by_status[s] for s in (400, 401, 404)), by_status
    assert {s.path for s in found.sent} >= {"/v1/rag/{collection}/documents", "/v1/rag/{collection}/search"}
    rows = fuzzing.ledger_rows(fuzzing.ledger_path(stack))
    sent = {s.request_id: s for s in found.sent}
    owners = {rid.split(".e")[0] for rid in rows}
    assert owners <= set(sent), owners - set(sent)
    model_calls = ("/search", "/chat", "/chat/completions")
    answered = {s.request_id for s in found.sent if s.status == 200 and s.path.endswith(model_calls)}
    assert answered and answered <= owners, answered - owners


async def test_a_body_llmd_must_re_encode_but_cannot_is_a_400_before_the_limits(fake: FakeProc, llmd_for) -> None:
    """Found by fuzzing: the envelope decoder skips fields it does not read, so a number out of
    range there (``1e999``) passed it; when llmd then re-encoded the body (an alias, or usage
    to hide on a stream) the full decode failed and the client got a 500.
    1. Alias 'gpt-4o-mini' and a stream with stream_options: both re-encode; both are 400
       ``invalid_json`` in llmd's envelope. 2. No ledger row, the upstream never saw them."""
    bodies = [
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"x":1e999}',
        b'{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":false},"x":-1e999}',
    ]
    async with llmd_for(fake) as llmd, aiohttp.ClientSession() as s:
        for body in bodies:
            async with s.post(llmd.url + "/v1/chat/completions", data=body) as r:
                doc = await r.json()
                assert r.status == 400, doc
                assert doc["error"]["code"] == "invalid_json" and set(doc["error"]) == fuzzing.ENVELOPE_KEYS
        await llmd.services.ledger.flush()
        assert llmd.services.ledger.rows_written == 0


async def _raw(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request written byte for byte (clients refuse to send headers that are not UTF-8)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


async def test_bytes_that_are_not_utf8_in_headers_or_a_body_that_cannot_be_decoded_are_4xx(
    fake: FakeProc, llmd_for
) -> None:
    """Found by probing beyond the schema: each of these was a 500.
    1. A key that is not UTF-8 (Bearer or X-API-Key): 401, like any unknown key.
    2. An Origin that is not UTF-8, refused by CORS: 403, its bytes quoted escaped.
    3. ``Content-Encoding: gzip`` on a body that is not gzip: 400 ``invalid_body``.
    Every answer is llmd's envelope; nothing reaches the ledger."""
    keys = [{"id": "k", "sha256": hash_secret("sk-test")}]
    chat = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    async with llmd_for(fake, keys=keys, server={"cors_origins": ["https://ok.example"]}) as llmd:
        port = llmd.daemon.port
        cases = [
            (post + b"Authorization: Bearer \xff\xfe\r\n", chat, 401, "invalid_api_key"),
            (post + b"X-API-Key: \xc3\x28\r\n", chat, 401, "invalid_api_key"),
            (b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: \xff\r\n", b"", 403, "cors_forbidden"),
            (post + b"Authorization: Bearer sk-test\r\nContent-Encoding: gzip\r\n", chat, 400, "invalid_body"),
        ]
        for head, body, status, code in cases:
            got, data = await _raw(port, head, body)
            err = fuzzing.error_envelope(data)
            assert got == status and err is not None and err["code"] == code, (head, got, data)
        await llmd.services.ledger.flush()
        assert llmd.services.ledger.rows_written == 0
