"""Cache: the completion cache. A deterministic request asked again is answered with the bytes
the client got the first time, without a replica (DESIGN.md "cache:").

What may be answered from it (``Cache.consult``), for models with ``cache: true``:
- generative routes (chat, completions, messages, responses, completion, infill) when the
  request is deterministic: ``temperature`` 0 or a ``seed`` >= 0 (llama.cpp's -1 is "random"),
  one choice (``n``/``n_cmpl`` absent or 1); embeddings and rerank always (a pure function of
  the input);
- never a request with ``tools`` (or legacy ``functions``) unless its ``tool_choice`` is
  "none": a replayed tool call would make the client run its side effect again on an answer
  the model did not give this time; nor a Responses request that continues a stored
  conversation (``previous_response_id``: the upstream's state, not the body, decides);
- ``Cache-Control: no-cache`` from the client: not answered from the cache, the new answer
  may be stored; ``no-store``: the answer is not stored (a stored one may still answer, as
  HTTP caches do).

The entry's key is the route, the model, the scope (the key id, the tier, or nothing when
shared), the headers the route forwards, and the body in canonical form (keys sorted, no
whitespace), so neither key order nor spacing makes a miss. Only 200 answers whose usage the
upstream told are stored: a hit's ledger row carries exactly the client's tokens. A stream is
stored as the bytes the client got (event boundaries included) and replayed in one write:
there is nothing to wait for between events.

Entries live in memory, an LRU bounded by ``max_bytes`` (and ``max_entries``), each for
``ttl_s``. ``store: sqlite`` writes them behind to a file (beside the ledger) and loads them at
start, so a restart keeps the cache; the request path never touches the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec
from aiohttp import web

from .call import Call
from .config import CacheConfig, Config
from .metrics import Metrics
from .outcome import Outcome

log = logging.getLogger("llmd.cache")

GENERATIVE = frozenset({"chat", "completions", "messages", "responses", "completion", "infill"})
PURE = frozenset({"embeddings", "rerank"})  # the same input always gives the same answer
ENTRY_OVERHEAD = 200  # bytes counted per entry beyond its body and key (the Entry, the dict slot)
FLUSH_S = 0.2  # sqlite: how often the file catches up with the memory

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder(order="sorted").encode


class Entry:
    """One cached answer: what the client got and the tokens it was billed."""

    __slots__ = ("body", "completion_tokens", "content_type", "expires", "prompt_tokens", "size", "stream")

    def __init__(
        self, body: bytes, content_type: str, stream: bool, prompt_tokens: int, completion_tokens: int, expires: float
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.expires = expires  # unix seconds (a file outlives the process's monotonic clock)
        self.size = len(body) + ENTRY_OVERHEAD

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Store:
    """The entries in memory: least recently used first, bounded in bytes and entries.
    ``on_evict(key, reason)`` hears of every entry that leaves other than by replacement."""

    def __init__(self, max_bytes: int, max_entries: int | None) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.bytes = 0
        self.on_evict: Any = None  # Callable[[bytes, str], None]

    def get(self, key: bytes, now: float) -> Entry | None:
        e = self.entries.get(key)
        if e is None:
            return None
        if e.expires <= now:
            self._drop(key, "expired")
            return None
        self.entries.move_to_end(key)
        return e

    def put(self, key: bytes, entry: Entry) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size + len(key)
        if entry.size + len(key) > self.max_bytes:
            return  # larger than the whole cache: it would only evict everything else
        self.entries[key] = entry
        self.bytes += entry.size + len(key)
        self.trim()

    def trim(self) -> None:
        """Evict the least recently used until the bounds hold (after a put or a smaller config)."""
        while self.entries and (
            self.bytes > self.max_bytes or (self.max_entries is not None and len(self.entries) > self.max_entries)
        ):
            key = next(iter(self.entries))
            self._drop(key, "bytes" if self.bytes > self.max_bytes else "entries")

    def _drop(self, key: bytes, reason: str) -> None:
        e = self.entries.pop(key)
        self.bytes -= e.size + len(key)
        if self.on_evict is not None:
            self.on_evict(key, reason)


class Cache:
    """The process's completion cache (Services owns it; it outlives reloads, which may change
    its bounds, TTL and scope; the store and its file change at restart)."""

    def __init__(self, cfg: CacheConfig, usage_path: str, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.store = Store(cfg.max_bytes, cfg.max_entries)
        self.store.on_evict = self._evicted
        self.path = cfg.path or str(Path(usage_path).with_name("cache.sqlite3"))
        self.persistent = cfg.store == "sqlite"
        self._pending: dict[bytes, Entry | None] = {}  # sqlite: key -> entry to write, or None to delete
        self._db: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        # Misses being answered now, by their entry's key: identical requests wait for them.
        self._flights: dict[bytes, asyncio.Future[None]] = {}

    # --- life cycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if not self.persistent:
            return
        try:
            await self._load()
        except (sqlite3.Error, OSError) as e:
            # The cache is an optimisation: without its file llmd serves, from memory only.
            log.error("completion cache %s cannot be used (%s): keeping entries in memory only", self.path, e)
            self.persistent = False
            if self._db is not None:
                with contextlib.suppress(Exception):
                    await self._db.close()
                self._db = None
            return
        self._task = asyncio.create_task(self._flusher())

    async def _load(self) -> None:
        db = self._db = await aiosqlite.connect(self.path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(
            "CREATE TABLE IF NOT EXISTS entries (key BLOB PRIMARY KEY, expires REAL NOT NULL, stream INTEGER NOT NULL,"
            " content_type TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,"
            " body BLOB NOT NULL)"
        )
        now = time.time()
        await db.execute("DELETE FROM entries WHERE expires <= ?", (now,))
        await db.commit()
        # Oldest expiry first, so when the file holds more than max_bytes the freshest stay.
        async with db.execute(
            "SELECT key, expires, stream, content_type, prompt_tokens, completion_tokens, body FROM entries"
            " ORDER BY expires"
        ) as cur:
            async for key, expires, stream, ctype, pt, ct, body in cur:
                self.store.put(bytes(key), Entry(bytes(body), ctype, bool(stream), pt, ct, expires))
        log.info("completion cache %s: %d entries loaded", self.path, len(self.store.entries))

    def configure(self, cfg: CacheConfig) -> None:
        if cfg.store != self.cfg.store or (cfg.path or None) != (self.cfg.path or None):
            log.warning("cache.store and cache.path change at the next restart")
        self.cfg = cfg
        self.store.max_bytes, self.store.max_entries = cfg.max_bytes, cfg.max_entries
        self.store.trim()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._flush()
            await self._db.close()
            self._db = None

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            if self._pending:
                try:
                    await self._flush()
                except Exception as e:  # a full disk must not stop serving: the memory still answers
                    log.warning("completion cache %s: write failed: %s", self.path, e)

    async def _flush(self) -> None:
        db = self._db
        if db is None or not self._pending:
            return
        pending, self._pending = self._pending, {}
        puts = [
            (k, e.expires, int(e.stream), e.content_type, e.prompt_tokens, e.completion_tokens, e.body)
            for k, e in pending.items()
            if e is not None
        ]
        dels = [(k,) for k, e in pending.items() if e is None]
        try:
            if dels:
                await db.executemany("DELETE FROM entries WHERE key = ?", dels)
            if puts:
                await db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", puts)
            await db.commit()
        except BaseException:
            for k, e in pending.items():  # tried again at the next flush, unless newer news came
                self._pending.setdefault(k, e)
            raise

    def _evicted(self, key: bytes, reason: str) -> None:
        self.metrics.observe_cache_eviction(reason)
        if self.persistent:
            self._pending[key] = None

    # --- the request path ----------------------------------------------------------------------

    def consult(self, call: Call, cfg: Config) -> Entry | None:
        """The entry that answers this call, if any. Sets ``call.cache`` (hit, miss, bypass) and,
        when its answer may be stored, ``call.cache_key`` (and ``call.capture`` for a stream)."""
        route = call.route
        mcfg = cfg.models.get(call.model)
        if route is None or mcfg is None or not mcfg.cache or call.env is None:
            return None
        if route.name not in GENERATIVE and route.name not in PURE:
            return None
        directives = _cache_control(call.request.headers.get("Cache-Control"))
        try:
            # The body as it goes upstream: the client's, with what llmd changes in it (the
            # upstream's model name, include_usage) changed the same way every time.
            doc = _decode(call.upstream_body)
        except (msgspec.DecodeError, RecursionError):  # e.g. thousands of nested arrays: not ours to judge
            doc = None
        if not isinstance(doc, dict) or not (route.name in PURE or deterministic(doc)):
            call.cache = "bypass"
            return None
        key = self.key(call, doc, cfg.cache.scope)
        if "no-cache" not in directives:
            entry = self.store.get(key, time.time())
            if entry is not None:
                call.cache = "hit"
                return entry
            call.cache = "miss"
            if key not in self._flights:  # a follower's lookup is counted when it knows (follow)
                self.metrics.observe_cache(call.model, hit=False)
        else:
            call.cache = "bypass"
        if "no-store" not in directives:
            call.cache_key = key
            if call.env.stream:
                call.capture = []
        return None

    async def follow(self, call: Call, wait_s: float) -> Entry | None:
        """A miss while the same request is being answered: wait for that answer (at most
        ``wait_s``) instead of asking the model twice, then serve it as a hit. The first of them
        leads (``call.cache_leads``) and ``land`` wakes the others when it ends, stored or not."""
        key = call.cache_key
        if call.cache != "miss" or not key:
            return None
        flight = self._flights.get(key)
        if flight is None:
            self._flights[key] = asyncio.get_running_loop().create_future()
            call.cache_leads = True
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await asyncio.shield(flight)
        entry = self.store.get(key, time.time())
        if entry is not None:
            call.cache = "hit"
            return entry
        # The leader's answer could not be stored (an error, no usage, the client left): this
        # one asks the model itself, and leads the next ones if nobody does.
        self.metrics.observe_cache(call.model, hit=False)
        if key not in self._flights:
            self._flights[key] = asyncio.get_running_loop().create_future()
            call.cache_leads = True
        return None

    def land(self, call: Call) -> None:
        """The leader's request ended (its answer kept or not): its followers look again."""
        if call.cache_leads:
            call.cache_leads = False
            flight = self._flights.pop(call.cache_key, None)
            if flight is not None and not flight.done():
                flight.set_result(None)

    @staticmethod
    def key(call: Call, doc: dict[str, Any], scope: str) -> bytes:
        assert call.route is not None
        h = hashlib.sha256()
        owner = {"key": "key:" + call.key_id, "tier": "tier:" + call.tier}.get(scope, "shared")
        for part in (call.route.name, call.model, owner):
            h.update(part.encode())
            h.update(b"\0")
        for name in call.route.forward_headers:  # e.g. anthropic-version changes the answer's shape
            h.update(call.request.headers.get(name, "").encode())
            h.update(b"\0")
        h.update(_encode(doc))
        return h.digest()

    async def answer(self, call: Call, entry: Entry) -> web.StreamResponse:
        """The cached answer, as the first client got it; the exchange says so (no replica,
        the entry's tokens)."""
        ex = call.exchange
        ex.status = 200
        ex.token_method = "cache"
        ex.usage_seen = ex.prompt_seen = True
        ex.prompt_tokens, ex.completion_tokens = entry.prompt_tokens, entry.completion_tokens
        self.metrics.observe_cache(call.model, hit=True)
        headers = {**call.response_headers, "x-llmd-cache": "hit"}
        if not entry.stream:
            ex.client_bytes = len(entry.body)
            ex.finished = True
            return web.Response(status=200, body=entry.body, headers={**headers, "Content-Type": entry.content_type})
        out = web.StreamResponse(status=200, headers=headers)
        out.headers["Content-Type"] = entry.content_type
        out.headers["Cache-Control"] = "no-cache"
        out.headers["X-Accel-Buffering"] = "no"
        try:
            await out.prepare(call.request)
            ex.first_byte_sent = ex.streamed = True
            ex.ttft_s = time.monotonic() - ex.t_start
            await out.write(entry.body)
            ex.client_bytes = len(entry.body)
            await out.write_eof()
            ex.finished = True
        except (ConnectionResetError, OSError):
            ex.outcome = Outcome.CLIENT_ABORT
        return out

    def keep(self, call: Call, resp: web.StreamResponse) -> None:
        """Store the answer the client just got, if it may be and is whole: a 200 that ended
        normally, with the upstream's usage (a hit bills exactly those tokens)."""
        ex = call.exchange
        if not call.cache_key or ex.status != 200 or ex.outcome is not Outcome.OK or not ex.usage_seen:
            return
        if call.capture is not None:
            if not ex.finished:
                return
            body = b"".join(call.capture)
            ctype = resp.headers.get("Content-Type", "text/event-stream")
            stream = True
        else:
            if not isinstance(resp, web.Response) or not isinstance(resp.body, bytes):
                return
            body, ctype, stream = resp.body, resp.headers.get("Content-Type", "application/json"), False
        entry = Entry(body, ctype, stream, ex.prompt_tokens, ex.completion_tokens, time.time() + self.cfg.ttl_s)
        self.store.put(call.cache_key, entry)
        if self.persistent and call.cache_key in self.store.entries:
            self._pending[call.cache_key] = entry

    # --- metrics -------------------------------------------------------------------------------

    def observe(self) -> None:
        self.metrics.observe_cache_size(self.store.bytes, len(self.store.entries))


def deterministic(doc: dict[str, Any]) -> bool:
    """The request asks for the same answer every time: greedy or seeded, one choice, no tools
    the model could call."""
    for field in ("n", "n_cmpl", "best_of"):
        v = doc.get(field)
        if v is not None and v != 1:
            return False
    if doc.get("tools") or doc.get("functions"):
        choice = doc.get("tool_choice", doc.get("function_call"))
        if not (choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none")):
            return False
    if doc.get("previous_response_id"):
        return False
    t, seed = doc.get("temperature"), doc.get("seed")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t == 0:
        return True
    return isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0


def _cache_control(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(d.split("=", 1)[0].strip().lower() for d in value.split(","))
