"""The retrieval stores behind one interface: sqlite-vec in a file, and Qdrant through
qdrant-client's local mode (no Qdrant server runs in CI; the client's local mode is Qdrant's
own Python implementation of the same API). Vectors are made up here: the stores alone."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmd.chunker import chunks, tail
from llmd.qdrant import QdrantStore
from llmd.vectors import DimensionMismatch, Document, SqliteStore, Store

DIM = 8


def unit(seed: int) -> list[float]:
    rnd = random.Random(seed)
    v = [rnd.gauss(0, 1) for _ in range(DIM)]
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def doc(doc_id: str, seeds: list[int], **meta: object) -> Document:
    return Document(doc_id, dict(meta), [f"{doc_id} chunk {i}" for i in range(len(seeds))], [unit(s) for s in seeds])


@pytest.fixture(params=["sqlite", "qdrant"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = SqliteStore(str(tmp_path / "rag.sqlite3")) if request.param == "sqlite" else QdrantStore(":memory:")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_search_ranks_by_cosine_and_filters_metadata(store: Store) -> None:
    assert await store.dimension("c") is None
    assert await store.search("c", unit(1), 3, {}) == []
    await store.upsert("c", [doc("a", [1, 2], team="db"), doc("b", [3], team="web", n=2), doc("z", [4], team="db")])
    assert await store.dimension("c") == DIM
    hits = await store.search("c", unit(3), 2, {})
    assert (hits[0].doc_id, hits[0].chunk, hits[0].text) == ("b", 0, "b chunk 0")
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].metadata == {"team": "web", "n": 2}
    assert hits[0].score >= hits[1].score
    # a filter keeps only the documents whose metadata matches, best first
    hits = await store.search("c", unit(3), 10, {"team": "db"})
    assert {h.doc_id for h in hits} == {"a", "z"} and len(hits) == 3
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert await store.search("c", unit(3), 10, {"team": "db", "n": 2}) == []
    assert [h.doc_id for h in await store.search("c", unit(3), 10, {"n": 2})] == ["b"]


async def test_readding_replaces_and_deleted_never_returns(store: Store) -> None:
    await store.upsert("c", [doc("a", [1, 2, 3]), doc("b", [4])])
    await store.upsert("c", [doc("a", [5], v=2)])  # same id: replaced, now one chunk
    docs = await store.documents("c", 10, None, {})
    assert [(d.id, d.chunks, d.metadata) for d in docs] == [("a", 1, {"v": 2}), ("b", 1, {})]
    assert {(h.doc_id, h.chunk) for h in await store.search("c", unit(1), 10, {})} == {("a", 0), ("b", 0)}
    assert await store.delete("c", "a") is True
    assert await store.delete("c", "a") is False
    assert await store.delete("missing", "a") is False
    assert [h.doc_id for h in await store.search("c", unit(5), 10, {})] == ["b"]
    assert await store.count("c") == 1


async def test_documents_are_paged_in_id_order_with_a_filter(store: Store) -> None:
    await store.upsert("c", [doc(f"d{i:02}", [i], even=i % 2 == 0) for i in range(7)])
    page = await store.documents("c", 3, None, {})
    assert [d.id for d in page] == ["d00", "d01", "d02"]
    page = await store.documents("c", 3, "d02", {})
    assert [d.id for d in page] == ["d03", "d04", "d05"]
    assert [d.id for d in await store.documents("c", 10, None, {"even": True})] == ["d00", "d02", "d04", "d06"]


async def test_a_dimension_mismatch_is_an_error_and_stores_nothing(store: Store) -> None:
    await store.upsert("c", [doc("a", [1])])
    wrong = Document("b", {}, ["b"], [[1.0, 0.0, 0.0]])
    with pytest.raises(DimensionMismatch) as e:
        await store.upsert("c", [wrong])
    assert (e.value.stored, e.value.got) == (DIM, 3)
    with pytest.raises(DimensionMismatch):
        await store.search("c", [1.0, 0.0, 0.0], 3, {})
    assert [d.id for d in await store.documents("c", 10, None, {})] == ["a"]
    # collections are separate: another one takes its own dimension
    await store.upsert("other", [wrong])
    assert await store.dimension("other") == 3


async def test_sqlite_store_keeps_collections_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "rag.sqlite3")
    s = SqliteStore(path)
    await s.open()
    await s.upsert("c", [doc("a", [1]), doc("b", [2])])
    await s.close()
    s = SqliteStore(path)
    await s.open()
    try:
        assert await s.dimension("c") == DIM
        assert [h.doc_id for h in await s.search("c", unit(2), 1, {})] == ["b"]
    finally:
        await s.close()


def test_chunks_overlap_and_cut_at_word_boundaries() -> None:
    text = " ".join(f"w{i}" for i in range(400))
    got = chunks(text, 32, 8)  # 128 characters per chunk, 32 back
    assert all(len(c) <= 128 for c in got)
    assert all(not c.startswith(" ") and c.split()[0].startswith("w") for c in got)
    words = [c.split() for c in got]
    assert words[0][0] == "w0" and words[-1][-1] == "w399"
    for a, b in itertools.pairwise(words):
        assert b[0] in a  # the next chunk starts inside the previous one
    assert chunks("  \n ", 32, 8) == []
    assert chunks("short", 32, 8) == ["short"]


def test_a_large_overlap_does_not_multiply_chunks() -> None:
    """Paragraphs of 600 characters, chunks of 1024 cut at the paragraph break past the
    middle, an overlap of 800 (allowed: below chunk.tokens): each chunk still moves on by at
    least half its length, so the count stays within 4 x text / chunk size (it was ~50x more),
    and the chunks still cover the text, in order."""
    words = " ".join(f"w{i}" for i in range(20000))
    text = "\n\n".join(words[i : i + 600] for i in range(0, len(words), 600))
    got = chunks(text, 256, 200)
    assert len(got) <= 4 * len(text) // 1024 + 1
    assert all(len(c) <= 1024 for c in got)
    seen = [w for c in got for w in c.split()]
    assert seen[0] == "w0" and seen[-1] == "w19999"
    assert set(seen) == set(text.split())


def test_tail_is_the_end_of_a_text_from_a_word() -> None:
    text = " ".join(f"w{i}" for i in range(1000))
    got = tail(text, 16)  # 64 characters
    assert len(got) <= 64 and got.endswith("w999") and got.split()[0].startswith("w")
    assert text.endswith(" " + got)
    assert tail("  short  ", 16) == "short"
    assert tail("x" * 100, 16) == "x" * 64  # no word to start at: the characters
