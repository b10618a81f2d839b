"""Retrieval benchmark: the embedded store alone, then grounded chat end to end.

1. Store: N chunks of made-up unit vectors (dimension 640, Gemma 3 270M's) are added to a fresh
   sqlite-vec store (llmd/vectors.py) in batches, as `POST .../documents` would after embedding
   (4 chunks a document); then Q random queries are searched (top 10), unfiltered and with a
   metadata filter matching 1 document in 10, and the same queries are answered by brute-force
   numpy (one matrix product) on the same vectors in the same run. Recall@10 of the store
   against numpy checks that both measured the same answer (both are exact searches).
2. End to end (``--e2e``): llmd with the real Gemma 3 270M as embeddings and chat model, a small
   corpus added, then grounded chat requests; each one's time split into embed and search (from
   the answer's ``rag.timings_ms``) and the rest (the chat model, prompt and 16 tokens).

    .venv/bin/python bench/rag_bench.py [--sizes 10000,100000] [--queries 50] [--e2e 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's llmd

from harness import MODEL_PATH, llama_launcher, md_table, pct, start_llmd, stop_llmd

from llmd.vectors import Document, SqliteStore

DIM = 640
CHUNKS_PER_DOC = 4
BATCH_DOCS = 250  # 1000 chunks per upsert (one transaction)
TOP_K = 10


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    m = rng.standard_normal((n, DIM), dtype=np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return m


async def store_run(n: int, queries: int, tmp: Path) -> list[str]:
    rng = np.random.default_rng(n)
    matrix = unit_rows(rng, n)
    store = SqliteStore(str(tmp / f"rag-{n}.sqlite3"))
    await store.open()
    ingest_s = 0.0
    docs_total = n // CHUNKS_PER_DOC
    for start in range(0, docs_total, BATCH_DOCS):
        docs = []
        for d in range(start, min(docs_total, start + BATCH_DOCS)):
            rows = matrix[d * CHUNKS_PER_DOC : (d + 1) * CHUNKS_PER_DOC]
            docs.append(Document(f"doc{d:07}", {"shard": d % 10}, [f"chunk text {d}"] * CHUNKS_PER_DOC,
                                 rows.tolist()))  # fmt: skip
        t0 = time.perf_counter()
        await store.upsert("bench", docs)
        ingest_s += time.perf_counter() - t0
    qs = unit_rows(rng, queries)
    store_ms: list[float] = []
    filtered_ms: list[float] = []
    numpy_ms: list[float] = []
    recall = 0.0
    for q in qs:
        ql = q.tolist()
        t0 = time.perf_counter()
        hits = await store.search("bench", ql, TOP_K, {})
        store_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        await store.search("bench", ql, TOP_K, {"shard": 3})
        filtered_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        scores = matrix @ q
        top = np.argpartition(-scores, TOP_K)[:TOP_K]
        top = top[np.argsort(-scores[top])]
        numpy_ms.append((time.perf_counter() - t0) * 1000)
        want = {(f"doc{i // CHUNKS_PER_DOC:07}", int(i % CHUNKS_PER_DOC)) for i in top}
        recall += len(want & {(h.doc_id, h.chunk) for h in hits}) / TOP_K
    await store.close()
    size_mb = sum(p.stat().st_size for p in tmp.glob(f"rag-{n}.sqlite3*")) / 1e6
    return [
        f"{n:,}", f"{docs_total / ingest_s:,.0f}", f"{n / ingest_s:,.0f}", f"{size_mb:,.0f}",
        f"{pct(store_ms, 0.5):.1f}", f"{pct(store_ms, 0.99):.1f}",
        f"{pct(filtered_ms, 0.5):.1f}", f"{pct(filtered_ms, 0.99):.1f}",
        f"{pct(numpy_ms, 0.5):.1f}", f"{pct(numpy_ms, 0.99):.1f}", f"{recall / queries:.3f}",
    ]  # fmt: skip


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def e2e_run(requests: int, tmp: Path) -> list[str]:
    model = str(MODEL_PATH)
    doc = {
        "models": {
            "chat": {"backend": "llama-server", "model": model, "args": ["-c", "4096", "-np", "1", "-t", "1"]},
            "embed": {"backend": "llama-server", "model": model,
                      "args": ["--embeddings", "--pooling", "mean", "-c", "2048", "-np", "1", "-t", "1"]},
        },
        "launchers": llama_launcher(),
        "routing": {"timeouts": {"first_byte_s": 300, "total_s": 600}},
        "rag": {"collections": {"docs": {"embedding_model": "embed", "chat_model": "chat", "top_k": 3}}},
    }  # fmt: skip
    srv = start_llmd(doc, tmp / "e2e")
    try:
        base = srv.url + "/v1/rag/docs"
        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        sections = [s for s in readme.split("\n## ") if s.strip()][:12]
        t0 = time.perf_counter()
        added = post(base + "/documents", {"texts": sections})
        ingest_s = time.perf_counter() - t0
        chunks = sum(d["chunks"] for d in added["data"])  # type: ignore[index, union-attr]
        questions = ["How do I add a key?", "What does SIGHUP do?", "Which routes does llmd serve?",
                     "How is usage counted?", "How do I run the tests?"]  # fmt: skip
        embed, search, chat, total = [], [], [], []
        for i in range(requests):
            body = {"messages": [{"role": "user", "content": questions[i % len(questions)]}],
                    "max_tokens": 16, "temperature": 0}  # fmt: skip
            t0 = time.perf_counter()
            answer = post(base + "/chat", body)
            ms = (time.perf_counter() - t0) * 1000
            timings = answer["rag"]["timings_ms"]  # type: ignore[index]
            embed.append(timings["embed"])
            search.append(timings["search"])
            chat.append(ms - timings["embed"] - timings["search"])
            total.append(ms)
    finally:
        stop_llmd(srv)
    print(f"\ningested {len(sections)} README sections ({chunks} chunks) in {ingest_s:.1f} s "
          f"({chunks / ingest_s:.1f} chunks/s through the real embeddings model)")  # fmt: skip
    return [f"{pct(v, 0.5):.1f} / {pct(v, 0.99):.1f}" for v in (embed, search, chat, total)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="chunk counts (comma-separated)")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--e2e", type=int, default=0, help="grounded chat requests end to end (0: skip)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rag-bench-") as d:
        tmp = Path(d)
        rows = [asyncio.run(store_run(int(n), args.queries, tmp)) for n in args.sizes.split(",")]
        print(f"\nStore: sqlite-vec, dimension {DIM}, top {TOP_K}, {args.queries} queries; times in ms\n")
        header = ["chunks", "docs/s", "chunks/s", "file MB", "search p50", "p99", "filtered p50", "p99",
                  "numpy p50", "p99", "recall@10"]  # fmt: skip
        print("\n".join(md_table(header, rows, "r" * len(header))))
        if args.e2e:
            row = e2e_run(args.e2e, tmp)
            print(f"\nGrounded chat, {args.e2e} requests (p50 / p99 ms; chat = the rest, 16 tokens)\n")
            print("\n".join(md_table(["embed", "search", "chat", "total"], [row], "rrrr")))


if __name__ == "__main__":
    main()
