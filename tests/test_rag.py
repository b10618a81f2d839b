"""Retrieval routes against the fake llama-server (its embeddings are a function of the text:
a query equal to a chunk's text finds that chunk with score 1), both stores, limits, reload,
the CLI, and the config checks. The real models' behaviour is tests/test_real_rag.py's."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmd.auth import hash_secret
from llmd.config import ConfigError
from llmd.configfile import parse
from tests.conftest import write_config
from tests.fakeproc import FakeProc

ROOT = Path(__file__).resolve().parent.parent  # this checkout's llmd, not an installed one
KEY = "sk-rag-fake"
TEXTS = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]


def rag_section(store: str, **extra: Any) -> dict[str, Any]:
    coll: dict[str, Any] = {"embedding_model": "m", "chat_model": "m", "store": store, **extra}
    if store == "qdrant":
        coll["qdrant_path"] = ":memory:"
    return {"collections": {"docs": coll}}


def rows(tmp_path: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(tmp_path / "usage.sqlite3")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM requests ORDER BY id")]
    finally:
        con.close()


async def post(s: aiohttp.ClientSession, url: str, body: Any, rid: str = "") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {KEY}", **({"X-Request-ID": rid} if rid else {})}
    async with s.post(url, json=body, headers=headers) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("store", ["sqlite", "qdrant"])
async def test_documents_search_and_chat_on_both_stores(fake: FakeProc, llmd_for, tmp_path: Path, store: str) -> None:
    keys = [{"id": "k", "sha256": hash_secret(KEY)}]
    async with llmd_for(fake, keys=keys, rag=rag_section(store, embed_batch=2)) as llmd, aiohttp.ClientSession() as s:
        base = llmd.url + "/v1/rag/docs"
        body = {"texts": TEXTS, "ids": ["a", "b", "c"], "metadata": [{"n": 1}, {"n": 2}, {"n": 3}]}
        status, got = await post(s, base + "/documents", body, "add1")
        assert status == 200, got
        assert [(d["id"], d["chunks"]) for d in got["data"]] == [("a", 1), ("b", 1), ("c", 1)]
        status, hits = await post(s, base + "/search", {"query": TEXTS[1], "top_k": 3})
        assert status == 200 and hits["data"][0]["id"] == "b" and hits["data"][0]["score"] == pytest.approx(1, abs=1e-4)
        assert hits["data"][0]["metadata"] == {"n": 2} and hits["data"][0]["text"] == TEXTS[1]
        status, hits = await post(s, base + "/search", {"query": TEXTS[1], "filter": {"n": 3}})
        assert [h["id"] for h in hits["data"]] == ["c"]
        # grounded chat, whole: the sources in `rag`, the chunk in the prompt the model got
        msgs = [{"role": "user", "content": TEXTS[2]}]
        status, answer = await post(s, base + "/chat", {"messages": msgs, "max_tokens": 8, "rag": {"top_k": 1}}, "c1")
        assert status == 200, answer
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
        assert [x["id"] for x in answer["rag"]["sources"]] == ["c"]
        # streamed: the sources are the last event before [DONE]
        headers = {"Authorization": f"Bearer {KEY}", "X-Request-ID": "c2"}
        streamed = {"messages": msgs, "stream": True, "max_tokens": 4}
        async with s.post(base + "/chat", json=streamed, headers=headers) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            events = [line[6:] for line in (await r.text()).splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"] == [] and last["rag"]["sources"][0]["id"] == "c"
        assert not any("rag" in json.loads(e) for e in events[:-2])
        async with s.delete(base + "/documents/c", headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200
        status, hits = await post(s, base + "/search", {"query": TEXTS[2], "top_k": 10})
        assert "c" not in [h["id"] for h in hits["data"]]
        auth = {"Authorization": f"Bearer {KEY}"}
        async with s.get(base + "/documents?limit=1", headers=auth) as r:
            page = await r.json()
        assert [d["id"] for d in page["data"]] == ["a"] and page["has_more"] is True
        async with s.get(base + "/documents", params={"after": "a", "filter": '{"n": 2}'}, headers=auth) as r:
            page = await r.json()
        assert [d["id"] for d in page["data"]] == ["b"] and page["has_more"] is False
        for bad, param in (({"limit": "0"}, "limit"), ({"filter": "{"}, "filter"), ({"filter": '{"n": []}'}, "filter")):
            async with s.get(base + "/documents", params=bad, headers=auth) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == param, bad
    got = {r["request_id"]: r for r in rows(tmp_path)}
    # 3 chunks in batches of 2: two embedding calls; each chat: its query's embedding + the chat
    assert {"add1.e1", "add1.e2", "c1.e1", "c1", "c2.e1", "c2"} <= set(got)
    assert got["add1.e1"]["route"] == "rag_documents" and got["c1"]["route"] == got["c1.e1"]["route"] == "rag_chat"
    assert all(r["key_id"] == "k" for r in got.values())
    assert answer["rag"]["usage"]["embedding_tokens"] == got["c1.e1"]["prompt_tokens"] > 0
    assert answer["usage"]["prompt_tokens"] == got["c1"]["prompt_tokens"]


async def test_a_refused_embedding_call_stores_nothing(fake: FakeProc, llmd_for, tmp_path: Path) -> None:
    """1. the key may make 2 requests a minute; 2. three chunks in batches of one: the third
    embedding call is refused (429); 3. nothing of the request is stored, every call has its row."""
    keys = [{"id": "k", "tier": "two", "sha256": hash_secret(KEY)}]
    async with (
        llmd_for(fake, keys=keys, tiers={"two": {"requests_per_minute": 2}},
                 rag=rag_section("sqlite", embed_batch=1)) as llmd,
        aiohttp.ClientSession() as s,
    ):  # fmt: skip
        status, err = await post(s, llmd.url + "/v1/rag/docs/documents", {"texts": TEXTS}, "lim")
        assert status == 429 and err["error"]["type"] == "rate_limit_exceeded", err
        async with s.get(llmd.url + "/v1/rag/docs/documents", headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert (await r.json())["data"] == []
        await llmd.services.ledger.flush()
    got = {r["request_id"]: r["status"] for r in rows(tmp_path)}
    assert got == {"lim.e1": 200, "lim.e2": 200, "lim.e3": 429}


async def test_a_store_that_cannot_open_is_a_503_before_any_model_call(
    fake: FakeProc, llmd_for, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    rag = {**rag_section("sqlite"), "path": str(tmp_path / "file" / "rag.sqlite3")}  # under a file: no folder
    async with llmd_for(fake, rag=rag) as llmd, aiohttp.ClientSession() as s:
        status, err = await post(s, llmd.url + "/v1/rag/docs/documents", {"texts": ["x"]})
        assert status == 503 and err["error"]["code"] == "store_unavailable", err
        assert "sqlite store of collection 'docs'" in err["error"]["message"]
        await llmd.services.ledger.flush()
    assert rows(tmp_path) == []


async def test_a_reload_adds_a_collection(fake: FakeProc, llmd_for, tmp_path: Path) -> None:
    async with llmd_for(fake) as llmd, aiohttp.ClientSession() as s:
        status, err = await post(s, llmd.url + "/v1/rag/docs/search", {"query": "x"})
        assert status == 404 and err["error"]["code"] == "collection_not_found"
        doc = json.loads(json.dumps(__import__("yaml").safe_load(llmd.config_path.read_text())))
        doc["rag"] = rag_section("sqlite")
        write_config(llmd.config_path, doc)
        assert await llmd.daemon.reload()
        status, got = await post(s, llmd.url + "/v1/rag/docs/documents", {"texts": ["x y"]})
        assert status == 200, got
        async with s.get(llmd.url + "/v1/rag") as r:
            listed = await r.json()
        assert listed["data"][0]["id"] == "docs" and listed["data"][0]["documents"] == 1


async def test_cli_adds_lists_searches_and_removes(fake: FakeProc, llmd_for, tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Runbook\n\nRestart the queue with `make restart`.\n")
    (tmp_path / "b.txt").write_text("Backups run at night.\n")
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("In a folder.\n")

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmd", "rag", *args, "--url", llmd.url, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    async with llmd_for(fake, rag=rag_section("sqlite")) as llmd:
        rc, out, err = await cli("add", "docs", "a.md", "b.txt", "--metadata", "team=ops")
        assert rc == 0, err
        assert "2 document(s), 2 chunk(s)" in out
        assert "embedding into docs: started (2 files)" in err and "embedding into docs: done, 2/2 files" in err
        rc, out, _ = await cli("ls")
        assert rc == 0 and out.splitlines()[1].split()[:2] == ["docs", "2"]
        rc, out, _ = await cli("ls", "docs")
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["a.md", "b.txt"]
        assert '"team": "ops"' in out and '"source": "a.md"' in out
        rc, out, _ = await cli("search", "docs", "Backups run at night.", "--top-k", "1")
        assert rc == 0 and out.split()[1] == "b.txt#0" and out.startswith("1.0000")
        rc, out, _ = await cli("rm", "docs", "b.txt")
        assert rc == 0 and out.strip() == "deleted b.txt"
        assert (await cli("add", "docs", "sub/c.md"))[0] == 0
        rc, out, _ = await cli("rm", "docs", "sub/c.md")  # an id with a slash: quoted in the path
        assert rc == 0 and out.strip() == "deleted sub/c.md"
        rc, out, _ = await cli("ls", "docs")
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["a.md"]
        rc, _, err = await cli("rm", "docs", "b.txt")
        assert rc == 1 and "404" in err
        rc, _, err = await cli("add", "docs", "bin.dat")
        assert rc == 1 and "not a UTF-8 text file" in err
        rc, _, err = await cli("search", "nope", "x")
        assert rc == 1 and "No collection 'nope'" in err


def test_config_checks_name_each_problem() -> None:
    text = """
tiers: {std: {}}
models:
  m: {backend: openai, urls: ["http://127.0.0.1:1/v1"], routes: [chat]}
rag:
  collections:
    docs: {embedding_model: m, chat_model: nope, chunk: {tokens: 8, overlap: 8}, tiers: [gold], url_env: X}
    "bad name": {embedding_model: gone, top_k: 9, max_top_k: 3}
"""
    with pytest.raises(ConfigError) as e:
        parse(text)
    errs = "\n".join(e.value.errors)
    for want in (
        "rag.collections.docs.embedding_model: model 'm' does not serve embeddings",
        "rag.collections.docs.chat_model: 'nope' is not a model or alias of models:",
        "rag.collections.docs.chunk.overlap: must be less than chunk.tokens (8)",
        "rag.collections.docs.tiers[0]: unknown tier 'gold'",
        "rag.collections.docs: url_env and qdrant_path are for store: qdrant",
        "rag.collections.bad name: a collection name is letters, digits, _ and - (max 64)",
        "rag.collections.bad name.embedding_model: 'gone' is not a model or alias of models:",
        "rag.collections.bad name.top_k: must be at most max_top_k (3)",
    ):
        assert want in errs, errs


def test_openapi_documents_the_routes_of_configured_collections() -> None:
    from openapi_spec_validator import validate

    from llmd import openapi

    base = 'models: {m: {backend: openai, urls: ["http://127.0.0.1:9/v1"]}}\n'
    assert not [p for p in openapi.build(parse(base))["paths"] if p.startswith("/v1/rag")]
    doc = openapi.build(parse(base + "rag: {collections: {docs: {embedding_model: m, chat_model: m}}}"))
    validate(doc)
    rag = {p: v for p, v in doc["paths"].items() if p.startswith("/v1/rag")}
    assert set(rag) == {"/v1/rag", "/v1/rag/{collection}/documents", "/v1/rag/{collection}/documents/{id}",
                        "/v1/rag/{collection}/search", "/v1/rag/{collection}/chat",
                        "/v1/rag/{collection}/chat/completions"}  # fmt: skip
    add = rag["/v1/rag/{collection}/documents"]["post"]
    assert add["parameters"][1]["schema"]["enum"] == ["docs"]
    assert {"400", "403", "404", "409", "429"} <= set(add["responses"])
    body = doc["components"]["schemas"]["RagDocumentsBody"]  # the Struct rag.py decodes with
    assert body["required"] == ["texts"] and body["additionalProperties"] is False
    chat = rag["/v1/rag/{collection}/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["properties"]["rag"] == {"$ref": "#/components/schemas/RagOptions"} and chat["required"] == ["messages"]
