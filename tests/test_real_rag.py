"""Retrieval on the real models: Gemma 3 270M as the embeddings model (llama-server
``--embeddings --pooling mean``) and as the chat model, each its own llama-server, behind
`llmd serve` with the default collection's store (sqlite-vec beside the ledger).

One llmd for the module; the tests run in order on the same collection (ingest, search, chat,
delete, restart), each checking the ledger rows of what it did.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from llmd.vectors import Document, SqliteStore
from tests.conftest import base_config
from tests.fakeproc import free_port
from tests.realllmd import LLAMA, MODEL, RealLlmd, call, real_llmd

pytestmark = pytest.mark.real

ALICE, BOB = "sk-alice-rag", "sk-bob-rag"
CORPUS = {
    "backup": ("The orders database is backed up every night at 02:30 UTC to the vault bucket. "
               "Restoring a backup takes about forty minutes.", {"team": "db"}),
    "oncall": ("The on-call rotation changes every Monday at 09:00. Page the on-call engineer "
               "through the pager app, never by e-mail.", {"team": "ops"}),
    "deploy": ("Deploys to production happen through the release pipeline; a deploy needs two "
               "approvals and never runs on Fridays.", {"team": "web"}),
    "coffee": ("The coffee machine on the third floor is descaled on the first day of each month. "
               "Use the blue cups for espresso.", {"team": "office"}),
}


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def config(tmp: Path, port: int) -> dict[str, Any]:
    return base_config(
        tmp,
        {"gemma": {"backend": "llama-server", "model": str(MODEL), "cpus": [[0]],
                   "args": ["-c", "4096", "-np", "2", "-t", "1", "--jinja"]},
         "gemma-embed": {"backend": "llama-server", "model": str(MODEL), "cpus": [[1]],
                         "args": ["--embeddings", "--pooling", "mean", "-c", "2048", "-np", "2", "-t", "1"]}},
        server={"port": port, "drain_seconds": 5},
        tiers={"std": {"requests_per_minute": 1000}, "guest": {"requests_per_minute": 1000}},
        keys=[{"id": "alice", "tier": "std", "sha256": sha(ALICE), "admin": True},
              {"id": "bob", "tier": "guest", "sha256": sha(BOB)}],
        launchers={"llama-server": {"command": str(LLAMA), "start_timeout_s": 120, "health_interval_s": 0.5}},
        routing={"timeouts": {"connect_s": 2, "first_byte_s": 120, "total_s": 300}},
        rag={"collections": {
            "docs": {"embedding_model": "gemma-embed", "chat_model": "gemma", "tiers": ["std"],
                     "chunk": {"tokens": 64, "overlap": 8}, "top_k": 2, "max_document_bytes": 4000},
            "seeded": {"embedding_model": "gemma-embed", "chat_model": "gemma"},
        }},
    )  # fmt: skip


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-rag")


@pytest.fixture(scope="module")
def llmd(tmp: Path) -> Iterator[RealLlmd]:
    with real_llmd(tmp, config(tmp, free_port())) as srv:
        yield srv


def rag(llmd: RealLlmd, path: str, body: dict[str, Any] | None, key: str = ALICE, rid: str = "") -> tuple[int, Any]:
    url = f"{llmd.url}/v1/rag/{path}".rstrip("/")
    status, _, raw = call(url, body, key, **({"X-Request-ID": rid} if rid else {}))
    return status, json.loads(raw)


def delete(llmd: RealLlmd, path: str, key: str = ALICE) -> tuple[int, Any]:
    req = urllib.request.Request(f"{llmd.url}/v1/rag/{path}", method="DELETE",
                                 headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def rows_of(llmd: RealLlmd, rid: str) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in llmd.rows() if r["request_id"].split(".")[0] == rid}


def test_ingest_then_search_finds_the_right_document_first(llmd: RealLlmd) -> None:
    texts = [t for t, _ in CORPUS.values()]
    metas = [m for _, m in CORPUS.values()]
    n = llmd.settled_count(ALICE)
    status, got = rag(llmd, "docs/documents", {"texts": texts, "metadata": metas, "ids": list(CORPUS)},
                      rid="ingest")  # fmt: skip
    assert status == 200, got
    assert [d["id"] for d in got["data"]] == list(CORPUS)
    assert all(d["chunks"] >= 1 for d in got["data"])
    # the embedding calls' rows: under the calling key, with the route, their tokens
    llmd.settled_count(ALICE)
    rows = [r for r in llmd.rows()[n:] if r["request_id"].startswith("ingest")]
    assert rows and all(r["key_id"] == "alice" and r["route"] == "rag_documents" and r["model"] == "gemma-embed"
                        and r["status"] == 200 for r in rows)  # fmt: skip
    assert sum(r["prompt_tokens"] for r in rows) == got["usage"]["prompt_tokens"] > 0
    # Gemma 3 270M is a chat model, mean-pooled: a weak embedder, whose ranking of these
    # queries (measured, deterministic) puts the right document first, some by a small margin.
    for query, want in (("When is the orders database backed up?", "backup"),
                        ("on-call engineer pager", "oncall"),
                        ("How many approvals does a deploy need?", "deploy"),
                        ("When is the coffee machine descaled?", "coffee")):  # fmt: skip
        status, hits = rag(llmd, "docs/search", {"query": query, "top_k": 4})
        assert status == 200, hits
        assert hits["data"][0]["id"] == want, (query, [(h["id"], h["score"]) for h in hits["data"]])
    status, hits = rag(llmd, "docs/search", {"query": "backup of the orders database", "top_k": 4,
                                             "filter": {"team": "office"}})  # fmt: skip
    assert status == 200 and [h["id"] for h in hits["data"]] == ["coffee"]


def test_grounded_chat_cites_the_document_and_is_accounted(llmd: RealLlmd) -> None:
    """Gemma 3 270M is a base model (README): asked outright it only echoes. So the answer is
    started for it (an assistant message llama-server continues) and it must finish the
    sentence from source [1], which it cannot without the retrieved document: the same
    messages sent to /v1/chat/completions, without retrieval, do not know the time."""
    messages = [
        {"role": "user", "content": "At what time is the orders database backed up?"},
        {"role": "assistant", "content": "According to source [1], the orders database is backed up"},
    ]
    client = openai.OpenAI(base_url=f"{llmd.url}/v1/rag/docs", api_key=ALICE, max_retries=0, timeout=300)
    raw = client.chat.completions.with_raw_response.create(
        model="gemma", messages=messages, max_tokens=24, temperature=0,  # type: ignore[arg-type]
        extra_body={"rag": {"top_k": 2}}, extra_headers={"X-Request-ID": "chat1"},
    )  # fmt: skip
    answer = json.loads(raw.http_response.text)
    text = answer["choices"][0]["message"]["content"]
    print("grounded answer:", json.dumps(text))
    sources = answer["rag"]["sources"]
    assert sources[0]["id"] == "backup" and sources[0]["n"] == 1 and sources[0]["metadata"] == {"team": "db"}
    assert "02:30" in text
    status, _, plain = call(llmd.url + "/v1/chat/completions",
                            {"model": "gemma", "messages": messages, "max_tokens": 24, "temperature": 0}, ALICE)
    assert status == 200 and "02:30" not in json.loads(plain)["choices"][0]["message"]["content"]
    llmd.settled_count(ALICE)
    rows = rows_of(llmd, "chat1")
    assert set(rows) == {"chat1.e1", "chat1"}
    embed, chat = rows["chat1.e1"], rows["chat1"]
    assert (embed["model"], embed["route"], embed["key_id"]) == ("gemma-embed", "rag_chat", "alice")
    assert embed["prompt_tokens"] == answer["rag"]["usage"]["embedding_tokens"] > 0
    assert (chat["model"], chat["route"], chat["key_id"]) == ("gemma", "rag_chat", "alice")
    assert chat["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert chat["completion_tokens"] == answer["usage"]["completion_tokens"] > 0


def test_grounded_chat_streams_its_sources_last(llmd: RealLlmd) -> None:
    client = openai.OpenAI(base_url=f"{llmd.url}/v1/rag/docs", api_key=ALICE, max_retries=0, timeout=300)
    chunks = list(client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "When is the coffee machine descaled?"}],
        max_tokens=32, temperature=0, stream=True, extra_headers={"X-Request-ID": "chat2"},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    last = chunks[-1].model_dump()
    assert last["choices"] == [] and last["rag"]["sources"][0]["id"] == "coffee"
    assert all("rag" not in c.model_dump() for c in chunks[:-1])
    llmd.settled_count(ALICE)
    rows = rows_of(llmd, "chat2")
    assert set(rows) == {"chat2.e1", "chat2"} and rows["chat2"]["stream"] == 1
    assert rows["chat2"]["completion_tokens"] > 0


def test_a_key_not_allowed_gets_403_and_bad_input_stores_nothing(llmd: RealLlmd, tmp: Path) -> None:
    n = llmd.settled_count(ALICE)
    for path, body in (("docs/search", {"query": "backup"}), ("docs/documents", {"texts": ["x"]}),
                       ("docs/chat", {"messages": [{"role": "user", "content": "hi"}]})):  # fmt: skip
        status, err = rag(llmd, path, body, key=BOB)
        assert status == 403 and err["error"]["code"] == "collection_not_allowed", err
    status, listed = rag(llmd, "", None, key=BOB)
    assert [c["id"] for c in listed["data"]] == ["seeded"]
    cases = [
        ({"texts": []}, 400, "texts"),
        ({"texts": ["ok", "  "]}, 400, "texts"),
        ({"texts": ["x" * 4001]}, 400, "texts"),
        ({"texts": ["a", "b"], "ids": ["same", "same"]}, 400, "ids"),
        ({"texts": ["a"], "metadata": [{}, {}]}, 400, "metadata"),
        ({"text": ["a"]}, 400, None),
    ]
    for body, code, param in cases:
        status, err = rag(llmd, "docs/documents", body)
        assert status == code and err["error"]["param"] == param, (body, err)
    status, err = rag(llmd, "nope/documents", {"texts": ["a"]})
    assert status == 404 and err["error"]["code"] == "collection_not_found"
    status, err = rag(llmd, "docs/search", {"query": "a", "top_k": 0})
    assert status == 400 and err["error"]["param"] == "top_k"
    assert llmd.settled_count(ALICE) == n  # nothing reached a model
    status, listed = rag(llmd, "docs/documents", None)
    assert sorted(d["id"] for d in listed["data"]) == sorted(CORPUS)


def test_a_collection_of_another_dimension_is_a_clear_error(llmd: RealLlmd, tmp: Path) -> None:
    """1. the collection `seeded` was made with 3-dimensional vectors (another model's);
    2. adding to it with gemma-embed (640 dimensions) is a 409 and stores nothing."""
    import asyncio

    async def seed() -> None:
        s = SqliteStore(str(tmp / "rag.sqlite3"))
        await s.open()
        await s.upsert("seeded", [Document("old", {}, ["old text"], [[1.0, 0.0, 0.0]])])
        await s.close()

    asyncio.run(seed())
    status, err = rag(llmd, "seeded/documents", {"texts": ["new text"], "ids": ["new"]})
    assert status == 409 and err["error"]["code"] == "dimension_mismatch", err
    assert "3-dimensional" in err["error"]["message"]
    status, err = rag(llmd, "seeded/search", {"query": "old"})
    assert status == 409, err
    status, listed = rag(llmd, "seeded/documents", None)
    assert [d["id"] for d in listed["data"]] == ["old"]


def test_a_deleted_document_is_never_returned_and_a_restart_keeps_the_rest(llmd: RealLlmd, tmp: Path) -> None:
    status, gone = delete(llmd, "docs/documents/backup")
    assert status == 200 and gone["deleted"] is True
    assert delete(llmd, "docs/documents/backup")[0] == 404
    status, hits = rag(llmd, "docs/search", {"query": "When is the orders database backed up?", "top_k": 10})
    assert "backup" not in [h["id"] for h in hits["data"]] and hits["data"]
    status, listed = rag(llmd, "docs/documents", None)
    assert sorted(d["id"] for d in listed["data"]) == ["coffee", "deploy", "oncall"]
    # a second llmd on the same files (the first is stopped by the module fixture later; the
    # sqlite-vec file is WAL, so both may read it) keeps the collection
    llmd.proc.terminate()
    llmd.proc.wait(30)
    with real_llmd(tmp, config(tmp, free_port())) as again:
        status, listed = rag(again, "docs/documents", None)
        assert sorted(d["id"] for d in listed["data"]) == ["coffee", "deploy", "oncall"]
        status, hits = rag(again, "docs/search", {"query": "How many approvals does a deploy need?"})
        assert hits["data"][0]["id"] == "deploy"
        assert "backup" not in [h["id"] for h in hits["data"]]
