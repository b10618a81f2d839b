"""Stores: the vector stores of the configured collections (vectors.py, qdrant.py), opened
at their first use and kept for the process, so a reload that adds or moves a collection
needs nothing more than its next request; and a store's failures in their HTTP form."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .config import CollectionConfig, Config
from .errors import ApiError
from .outcome import Outcome
from .vectors import DimensionMismatch, SqliteStore, Store

log = logging.getLogger("llmd")


class Stores:
    """The stores of every collection, opened at their first use and kept for the process: a
    reload that moves a collection opens its new store then; ``close`` closes them all."""

    def __init__(self) -> None:
        self._stores: dict[str, Store] = {}
        self._lock = asyncio.Lock()

    async def get(self, cfg: Config, coll: CollectionConfig) -> Store:
        where = location(cfg, coll)
        store = self._stores.get(where)
        if store is not None:
            return store
        async with self._lock:
            store = self._stores.get(where)
            if store is None:
                if coll.store == "qdrant":
                    from .qdrant import QdrantStore  # qdrant-client is the `qdrant` extra, loaded when used

                    store = QdrantStore(where)
                else:
                    store = SqliteStore(where)
                await store.open()
                self._stores[where] = store
        return store

    async def close(self) -> None:
        stores, self._stores = list(self._stores.values()), {}
        for s in stores:
            await s.close()


def location(cfg: Config, coll: CollectionConfig) -> str:
    """Where a collection lives: sqlite, its file (rag.path, default rag.sqlite3 beside the
    ledger); qdrant, its URL (url_env) or local folder (qdrant_path, default qdrant/ beside it)."""
    beside = Path(cfg.usage.path).parent
    if coll.store == "qdrant":
        if coll.url_env:
            return os.environ.get(coll.url_env, "")
        return coll.qdrant_path or str(beside / "qdrant")
    return cfg.rag.path or str(beside / "rag.sqlite3")


@contextlib.contextmanager
def store_errors(name: str, coll: CollectionConfig) -> Iterator[None]:
    """A store's failure as its HTTP form: a dimension mismatch is the 409 that says what to do;
    anything else (a file that cannot be opened, a Qdrant that does not answer) a 503."""
    try:
        yield
    except DimensionMismatch as e:
        raise _mismatch(e, coll) from None
    except ApiError:
        raise
    except Exception as e:
        log.exception("rag: the store of collection %s failed", name)
        raise ApiError(
            503,
            f"The {coll.store} store of collection '{name}' failed ({type(e).__name__}); see llmd's log.",
            type="server_error",
            code="store_unavailable",
            outcome=Outcome.UPSTREAM_ERROR,
        ) from None


def _mismatch(e: DimensionMismatch, coll: CollectionConfig) -> ApiError:
    return ApiError(
        409,
        f"Collection '{e.collection}' holds {e.stored}-dimensional vectors but its embedding model "
        f"'{coll.embedding_model}' answers {e.got}: re-create the collection for this model, or configure the "
        "model it was built with.",
        code="dimension_mismatch",
        param="collection",
    )
