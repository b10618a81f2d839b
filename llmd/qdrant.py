"""QdrantStore: a collection in Qdrant (``store: qdrant``), for hosts that outgrow one file.

The same ``vectors.Store`` as the embedded store. ``qdrant-client`` talks to a Qdrant server
(``url_env``), or runs Qdrant's local mode in a folder (``qdrant_path``; ``":memory:"`` in
tests, where no Qdrant server runs). A chunk is one point: its id derived from (document id,
chunk number), so re-adding a document overwrites its points and then drops the ones past its
new length; its payload holds the document id, the chunk number and text, the document's
metadata and when it was added. Calls block: they run on one thread of their own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qdrant_client import QdrantClient
from qdrant_client import models as qm

from .vectors import DimensionMismatch, DocInfo, Document, Filter, Hit, dimension_of

_NS = uuid.UUID("6f1c3a52-4d0e-4c8e-9a55-2f7d1e0b9c11")


def point_id(doc_id: str, idx: int) -> str:
    return str(uuid.uuid5(_NS, f"{doc_id}\x00{idx}"))


class QdrantStore:
    def __init__(self, where: str) -> None:
        self.where = where  # an http(s) URL, ":memory:", or a folder
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmd-qdrant")
        self._client: QdrantClient | None = None

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @property
    def client(self) -> QdrantClient:
        assert self._client is not None, "open() first"
        return self._client

    async def open(self) -> None:
        await self.run(self._open)

    def _open(self) -> None:
        if self.where.startswith(("http://", "https://")):
            self._client = QdrantClient(url=self.where)
        elif self.where == ":memory:":
            self._client = QdrantClient(location=":memory:")
        else:
            self._client = QdrantClient(path=self.where)

    async def close(self) -> None:
        if self._client is not None:
            await self.run(self._client.close)
            self._client = None
        self._pool.shutdown(wait=False)

    def _dimension(self, collection: str) -> int | None:
        if not self.client.collection_exists(collection):
            return None
        params = self.client.get_collection(collection).config.params.vectors
        assert isinstance(params, qm.VectorParams)
        return int(params.size)

    async def dimension(self, collection: str) -> int | None:
        got = await self.run(self._dimension, collection)
        return int(got) if got is not None else None

    async def upsert(self, collection: str, docs: list[Document]) -> None:
        if docs:
            await self.run(self._upsert, collection, docs)

    def _upsert(self, collection: str, docs: list[Document]) -> None:
        dim = dimension_of(collection, docs)
        stored = self._dimension(collection)
        if stored is None:
            params = qm.VectorParams(size=dim, distance=qm.Distance.COSINE)
            self.client.create_collection(collection, vectors_config=params)
        elif stored != dim:
            raise DimensionMismatch(collection, stored, dim)
        now = time.time()
        points = [
            qm.PointStruct(
                id=point_id(d.id, i),
                vector=vec,
                payload={
                    "doc_id": d.id, "idx": i, "text": text, "metadata": d.metadata, "chunks": len(d.chunks),
                    "created": now,
                },
            )
            for d in docs
            for i, (text, vec) in enumerate(zip(d.chunks, d.vectors, strict=True))
        ]
        self.client.upsert(collection, points=points, wait=True)
        for d in docs:  # a shorter new version: its old tail goes
            self._drop(collection, d.id, len(d.chunks))

    def _drop(self, collection: str, doc_id: str, from_idx: int) -> None:
        cond = [_eq("doc_id", doc_id), qm.FieldCondition(key="idx", range=qm.Range(gte=from_idx))]
        self.client.delete(collection, points_selector=qm.FilterSelector(filter=qm.Filter(must=cond)), wait=True)

    async def delete(self, collection: str, doc_id: str) -> bool:
        return bool(await self.run(self._delete, collection, doc_id))

    def _delete(self, collection: str, doc_id: str) -> bool:
        if not self.client.collection_exists(collection):
            return False
        found = self.client.count(collection, count_filter=qm.Filter(must=[_eq("doc_id", doc_id)]), exact=True).count
        if found:
            self._drop(collection, doc_id, 0)
        return found > 0

    async def documents(self, collection: str, limit: int, after: str | None, where: Filter) -> list[DocInfo]:
        return list(await self.run(self._documents, collection, limit, after, where))

    def _documents(self, collection: str, limit: int, after: str | None, where: Filter) -> list[DocInfo]:
        """Documents are their chunk 0 points, in id order (sorted here: Qdrant orders points
        by their own ids)."""
        if not self.client.collection_exists(collection):
            return []
        flt = _filter(where, [_eq("idx", 0)])
        docs: list[DocInfo] = []
        offset: Any = None
        while True:
            points, offset = self.client.scroll(collection, scroll_filter=flt, limit=1000, offset=offset)
            for p in points:
                pl = p.payload or {}
                if after is None or pl["doc_id"] > after:
                    docs.append(DocInfo(pl["doc_id"], pl["chunks"], pl["metadata"], pl["created"]))
            if offset is None:
                break
        docs.sort(key=lambda d: d.id)
        return docs[:limit]

    async def count(self, collection: str) -> int:
        return int(await self.run(self._count, collection))

    def _count(self, collection: str) -> int:
        if not self.client.collection_exists(collection):
            return 0
        return self.client.count(collection, count_filter=qm.Filter(must=[_eq("idx", 0)]), exact=True).count

    async def search(self, collection: str, vector: list[float], top_k: int, where: Filter) -> list[Hit]:
        return list(await self.run(self._search, collection, vector, top_k, where))

    def _search(self, collection: str, vector: list[float], top_k: int, where: Filter) -> list[Hit]:
        stored = self._dimension(collection)
        if stored is None:
            return []
        if stored != len(vector):
            raise DimensionMismatch(collection, stored, len(vector))
        got = self.client.query_points(
            collection, query=vector, limit=top_k, query_filter=_filter(where, []) if where else None, with_payload=True
        ).points
        out = []
        for p in got:
            pl = p.payload or {}
            out.append(Hit(pl["doc_id"], pl["idx"], pl["text"], float(p.score), pl["metadata"]))
        return out


def _eq(key: str, value: Any) -> qm.FieldCondition:
    if isinstance(value, float) and not isinstance(value, bool):
        return qm.FieldCondition(key=key, range=qm.Range(gte=value, lte=value))  # MatchValue takes no floats
    return qm.FieldCondition(key=key, match=qm.MatchValue(value=value))


def _filter(where: Filter, must: list[Any]) -> qm.Filter:
    # quoted: a key is one top-level metadata key, its dots not a path (rag.py refuses keys
    # holding `"`, which a Qdrant path cannot quote)
    return qm.Filter(must=[*must, *(_eq(f'metadata."{k}"', v) for k, v in where.items())])
