"""Vectors: where a collection's chunks and their embeddings are kept, and searched.

``Store`` is the interface rag.py uses; ``SqliteStore`` is the embedded default: sqlite-vec
(a SQLite extension from PyPI) in its own file beside the usage ledger, WAL, nothing to run.
qdrant.py is the other store, behind the same interface; stores.py opens them per config.

A collection's vector dimension is stored at its first write; a later write or search with
another dimension (the collection's embeddings model was changed) is a ``DimensionMismatch``,
never silently mixed. Scores are cosine similarities (1 is the same direction).

SQLite calls block: they run on one thread of their own (``run``), in order, off the loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Scalar = str | int | float | bool
Filter = dict[str, Scalar]  # metadata key -> the value it must equal


@dataclass(slots=True)
class Document:
    id: str
    metadata: dict[str, Any]
    chunks: list[str]
    vectors: list[list[float]]


@dataclass(slots=True)
class Hit:
    doc_id: str
    chunk: int
    text: str
    score: float
    metadata: dict[str, Any]


@dataclass(slots=True)
class DocInfo:
    id: str
    chunks: int
    metadata: dict[str, Any]
    created: float


class DimensionMismatch(Exception):
    def __init__(self, collection: str, stored: int, got: int) -> None:
        super().__init__(f"collection {collection!r} holds {stored}-dimensional vectors, got {got}")
        self.collection, self.stored, self.got = collection, stored, got


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def dimension(self, collection: str) -> int | None: ...
    async def upsert(self, collection: str, docs: list[Document]) -> None: ...
    async def delete(self, collection: str, doc_id: str) -> bool: ...
    async def documents(self, collection: str, limit: int, after: str | None, where: Filter) -> list[DocInfo]: ...
    async def count(self, collection: str) -> int: ...
    async def search(self, collection: str, vector: list[float], top_k: int, where: Filter) -> list[Hit]: ...


def dimension_of(collection: str, docs: list[Document]) -> int:
    """The one dimension of every vector of ``docs`` (an embeddings model answers one)."""
    dims = {len(v) for d in docs for v in d.vectors}
    if len(dims) != 1:
        raise DimensionMismatch(collection, min(dims, default=0), max(dims, default=0))
    return dims.pop()


def connect(path: str) -> Any:
    """A SQLite connection with sqlite-vec loaded: the standard library's sqlite3 when this
    Python may load extensions (Debian's may), else pysqlite3 (its own SQLite, which may)."""
    import sqlite3

    import sqlite_vec

    if not hasattr(sqlite3.Connection, "enable_load_extension"):
        from pysqlite3 import dbapi2 as sqlite3  # type: ignore[no-redef]
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    conn.enable_load_extension(False)
    return conn


_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
  id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, dimension INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
  collection INTEGER NOT NULL, id TEXT NOT NULL, metadata TEXT NOT NULL, chunks INTEGER NOT NULL,
  created REAL NOT NULL, PRIMARY KEY (collection, id));
CREATE TABLE IF NOT EXISTS chunks (
  rowid INTEGER PRIMARY KEY, collection INTEGER NOT NULL, doc_id TEXT NOT NULL, idx INTEGER NOT NULL,
  text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_of_doc ON chunks (collection, doc_id);
"""


class SqliteStore:
    """Every sqlite collection of one config in one file; one vec0 table per collection."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmd-vectors")
        self._conn: Any = None
        self._ids: dict[str, tuple[int, int]] = {}  # name -> (id, dimension), once known

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        await self.run(self._open)

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self.run(self._conn.close)
            self._conn = None
        self._pool.shutdown(wait=False)

    def _collection(self, name: str) -> tuple[int, int] | None:
        got = self._ids.get(name)
        if got is None:
            row = self._conn.execute("SELECT id, dimension FROM collections WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            got = self._ids[name] = (row[0], row[1])
        return got

    async def dimension(self, collection: str) -> int | None:
        got = await self.run(self._collection, collection)
        return got[1] if got else None

    async def upsert(self, collection: str, docs: list[Document]) -> None:
        if docs:
            await self.run(self._upsert, collection, docs)

    def _upsert(self, collection: str, docs: list[Document]) -> None:
        from sqlite_vec import serialize_float32

        dim = dimension_of(collection, docs)
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            got = self._collection(collection)
            if got is None:
                cid = c.execute(
                    "INSERT INTO collections (name, dimension, created) VALUES (?, ?, ?)",
                    (collection, dim, time.time()),
                ).lastrowid
                c.execute(f"CREATE VIRTUAL TABLE vec_{cid} USING vec0(embedding float[{dim}] distance_metric=cosine)")
                got = (cid, dim)
            elif got[1] != dim:
                raise DimensionMismatch(collection, got[1], dim)
            cid = got[0]
            now = time.time()
            for d in docs:
                self._delete(cid, d.id)
            # rowids given here, so the three tables are written by executemany (one statement
            # each, not two per chunk); one writer thread in one transaction owns max(rowid)
            first = c.execute("SELECT coalesce(max(rowid), 0) + 1 FROM chunks").fetchone()[0]
            chunk_rows: list[tuple[Any, ...]] = []
            vec_rows: list[tuple[int, bytes]] = []
            for d in docs:
                for i, (text, vec) in enumerate(zip(d.chunks, d.vectors, strict=True)):
                    rowid = first + len(chunk_rows)
                    chunk_rows.append((rowid, cid, d.id, i, text))
                    vec_rows.append((rowid, serialize_float32(vec)))
            c.executemany(
                "INSERT INTO documents (collection, id, metadata, chunks, created) VALUES (?, ?, ?, ?, ?)",
                [(cid, d.id, json.dumps(d.metadata), len(d.chunks), now) for d in docs],
            )
            c.executemany(
                "INSERT INTO chunks (rowid, collection, doc_id, idx, text) VALUES (?, ?, ?, ?, ?)", chunk_rows
            )
            c.executemany(f"INSERT INTO vec_{cid} (rowid, embedding) VALUES (?, ?)", vec_rows)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            self._ids.pop(collection, None)  # a collection created in the rolled back transaction is gone
            raise
        self._ids[collection] = got

    def _delete(self, cid: int, doc_id: str) -> bool:
        c = self._conn
        rowids = c.execute("SELECT rowid FROM chunks WHERE collection = ? AND doc_id = ?", (cid, doc_id)).fetchall()
        if not rowids:
            return False
        # by rowid, one at a time: vec0 answers `rowid = ?` directly, `rowid IN (SELECT ...)` by a scan
        c.executemany(f"DELETE FROM vec_{cid} WHERE rowid = ?", rowids)
        c.execute("DELETE FROM chunks WHERE collection = ? AND doc_id = ?", (cid, doc_id))
        return c.execute("DELETE FROM documents WHERE collection = ? AND id = ?", (cid, doc_id)).rowcount > 0

    async def delete(self, collection: str, doc_id: str) -> bool:
        return bool(await self.run(self._delete_txn, collection, doc_id))

    def _delete_txn(self, collection: str, doc_id: str) -> bool:
        got = self._collection(collection)
        if got is None:
            return False
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            found = self._delete(got[0], doc_id)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return found

    async def documents(self, collection: str, limit: int, after: str | None, where: Filter) -> list[DocInfo]:
        return list(await self.run(self._documents, collection, limit, after, where))

    def _documents(self, collection: str, limit: int, after: str | None, where: Filter) -> list[DocInfo]:
        got = self._collection(collection)
        if got is None:
            return []
        sql, args = _where(where)
        rows = self._conn.execute(
            f"SELECT id, chunks, metadata, created FROM documents d WHERE collection = ? AND id > ?{sql} "
            "ORDER BY id LIMIT ?",
            (got[0], after or "", *args, limit),
        ).fetchall()
        return [DocInfo(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    async def count(self, collection: str) -> int:
        return int(await self.run(self._count, collection))

    def _count(self, collection: str) -> int:
        got = self._collection(collection)
        if got is None:
            return 0
        return int(self._conn.execute("SELECT count(*) FROM documents WHERE collection = ?", (got[0],)).fetchone()[0])

    async def search(self, collection: str, vector: list[float], top_k: int, where: Filter) -> list[Hit]:
        return list(await self.run(self._search, collection, vector, top_k, where))

    def _search(self, collection: str, vector: list[float], top_k: int, where: Filter) -> list[Hit]:
        from sqlite_vec import serialize_float32

        got = self._collection(collection)
        if got is None:
            return []
        cid, dim = got
        if len(vector) != dim:
            raise DimensionMismatch(collection, dim, len(vector))
        q = serialize_float32(vector)
        if not where:
            # vec0's own k-nearest scan, then the chunks' text and their documents' metadata
            rows = self._conn.execute(
                f"WITH knn AS (SELECT rowid, distance FROM vec_{cid} WHERE embedding MATCH ? AND k = ?) "
                "SELECT c.doc_id, c.idx, c.text, d.metadata, knn.distance FROM knn "
                "JOIN chunks c ON c.rowid = knn.rowid "
                "JOIN documents d ON d.collection = c.collection AND d.id = c.doc_id ORDER BY knn.distance",
                (q, top_k),
            ).fetchall()
        else:
            # the same scan, over the chunks of the documents the filter keeps
            sql, args = _where(where)
            rows = self._conn.execute(
                f"WITH knn AS (SELECT rowid, distance FROM vec_{cid} WHERE embedding MATCH ? AND k = ? AND rowid IN "
                "(SELECT c.rowid FROM documents d JOIN chunks c ON c.collection = d.collection AND c.doc_id = d.id "
                f"WHERE d.collection = ?{sql})) "
                "SELECT c.doc_id, c.idx, c.text, d.metadata, knn.distance FROM knn "
                "JOIN chunks c ON c.rowid = knn.rowid "
                "JOIN documents d ON d.collection = c.collection AND d.id = c.doc_id ORDER BY knn.distance",
                (q, top_k, cid, *args),
            ).fetchall()
        return [Hit(r[0], r[1], r[2], 1.0 - float(r[4]), json.loads(r[3])) for r in rows]


def _where(where: Filter) -> tuple[str, list[Any]]:
    """SQL requiring each top-level metadata key to equal its value (JSON true/false read as
    1/0). The key is matched by json_each, not spliced into a JSON path: a key holding `"`,
    `\\` or `.` is just a key, never a path error (a 503) or another key's match."""
    sql = ""
    args: list[Any] = []
    for k, v in where.items():
        sql += " AND EXISTS (SELECT 1 FROM json_each(d.metadata) m WHERE m.key = ? AND m.value = ?)"
        args += [k, int(v) if isinstance(v, bool) else v]
    return sql, args
