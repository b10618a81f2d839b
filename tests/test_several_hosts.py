"""Several hosts: two `llmd serve` processes on their own ports, sharing one PostgreSQL ledger and
one Redis for limits, behind one real nginx upstream (nginx/llm-api.conf with both servers), in
front of the fake llama-server. PostgreSQL and Redis are real servers the tests start
(tests/pgproc.py, tests/redisproc.py) and, here, stop and start again for outages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml

from tests.conftest import LlmdProc, base_config, llmd_process, run_llmd, write_config
from tests.fakeproc import FAKE_LLAMA, FakeProc, free_port, start_fake
from tests.nginxproc import render, run_nginx
from tests.pgproc import PgServer, fresh_db
from tests.redisproc import RedisServer

SECRET = "sk-several-hosts-test"
ADMIN = "sk-several-hosts-admin"
MSG = [{"role": "user", "content": "hello from several hosts"}]
LEASE_S = 2.0


@dataclass
class Cluster:
    fake: FakeProc
    hosts: dict[str, LlmdProc]  # instance name -> its llmd
    nginx_url: str
    dsn: str
    session: aiohttp.ClientSession

    async def chat(self, url: str | None = None, **extra: Any) -> tuple[int, str, dict[str, Any]]:
        """(status, X-Request-ID, body) of one chat request, through nginx unless ``url``."""
        body = {"model": "m", "messages": MSG, "max_tokens": 8, **extra}
        async with self.session.post(
            (url or self.nginx_url) + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {SECRET}"}
        ) as r:
            return r.status, r.headers.get("X-Request-ID", ""), await r.json(content_type=None)

    async def rows(self, sql: str = "SELECT request_id, instance, status, outcome FROM requests") -> list[Any]:
        db = await asyncpg.connect(self.dsn)
        try:
            return list(await db.fetch(sql))
        finally:
            await db.close()

    async def sigterm(self, name: str) -> int:
        host = self.hosts[name]
        host.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(host.proc.wait(), 30)


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, pg: PgServer, redis: RedisServer, key: dict[str, Any], **limits: Any
) -> AsyncIterator[Cluster]:
    dsn = fresh_db(pg)
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    fake = await start_fake(FAKE_LLAMA, "-np", "8")
    env = {"LLMD_PG_DSN": dsn, "LLMD_REDIS_URL": redis.url}
    try:
        async with contextlib.AsyncExitStack() as stack:
            hosts: dict[str, LlmdProc] = {}
            for name in ("a", "b"):
                doc = base_config(
                    tmp_path,
                    {"m": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 8}},
                    usage={"store": "postgres", "instance": name, "flush_ms": 50},
                    limits={"store": "redis", "prefix": prefix, "lease_s": LEASE_S, "timeout_ms": 2000,
                            **limits.get(name, limits.get("both", {}))},
                    keys=[{"id": "k", "sha256": hashlib.sha256(SECRET.encode()).hexdigest(), **key},
                          {"id": "ops", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest(), "admin": True}],
                )  # fmt: skip
                path = write_config(tmp_path / f"config-{name}.yaml", doc)
                hosts[name] = await stack.enter_async_context(llmd_process(path, env=env))
            https_port = free_port()
            rendered = render(
                tmp_path / "nginx", https_port=https_port, http_port=free_port(), upstream_port=hosts["a"].port
            )
            site = rendered.prefix / "llm-api.conf"
            text, n = re.subn(
                rf"server 127\.0\.0\.1:{hosts['a'].port};",
                f"server 127.0.0.1:{hosts['a'].port};\n    server 127.0.0.1:{hosts['b'].port};",
                site.read_text(),
            )
            assert n == 1
            site.write_text(text)
            # 100 clients at once, each also a connection upstream: more than the 64 of render().
            conf = rendered.conf.read_text().replace("worker_connections 64;", "worker_connections 1024;")
            rendered.conf.write_text(conf)
            await stack.enter_async_context(run_nginx(rendered, https_port))
            session = await stack.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=False))
            )
            yield Cluster(fake, hosts, f"https://127.0.0.1:{https_port}", dsn, session)
    finally:
        await fake.stop()


async def wait_rows(c: Cluster, n: int, timeout_s: float = 15.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while len(rows := await c.rows()) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return rows


async def test_rpm_holds_across_two_hosts_and_every_answer_has_one_row(
    tmp_path: Path, pg_server: PgServer, redis_server: RedisServer
) -> None:
    """100 concurrent requests through nginx for a key with 30 rpm: exactly 30 answers across
    both hosts. Every request has exactly one row in PostgreSQL, with the instance that served
    it; SIGTERM of both loses none."""
    async with cluster(tmp_path, pg_server, redis_server, {"requests_per_minute": 30}) as c:
        results = await asyncio.gather(*(c.chat() for _ in range(100)))
        statuses = [s for s, _, _ in results]
        assert statuses.count(200) == 30 and statuses.count(429) == 70
        ids = {rid for _, rid, _ in results}
        assert len(ids) == 100
        # Which host served a request: its own X-Request-ID, asked directly (the rpm is spent,
        # so these are 429s, each with a row of its own).
        direct = {name: [(await c.chat(h.url))[1] for _ in range(3)] for name, h in c.hosts.items()}
        assert await c.sigterm("a") == 0 and await c.sigterm("b") == 0
        rows = await c.rows()
        assert len(rows) == 106  # one per request, none lost at SIGTERM, none twice
        by_id = {r["request_id"]: r for r in rows}
        assert len(by_id) == 106 and set(by_id) == ids | {rid for rids in direct.values() for rid in rids}
        assert sum(1 for r in rows if r["status"] == 200 and r["outcome"] == "ok") == 30
        assert {r["instance"] for r in rows if r["request_id"] in ids} == {"a", "b"}  # nginx used both
        for name, rids in direct.items():
            assert {by_id[rid]["instance"] for rid in rids} == {name}


async def test_max_concurrent_holds_across_two_hosts(
    tmp_path: Path, pg_server: PgServer, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, pg_server, redis_server, {"max_concurrent": 2}) as c:
        await c.fake.reset()
        results = await asyncio.gather(*(c.chat(fake={"delay_ms": 400}) for _ in range(20)))
        statuses = [s for s, _, _ in results]
        assert statuses.count(200) >= 2 and statuses.count(200) + statuses.count(429) == 20
        assert (await c.fake.stats())["peak_in_flight"] == 2


async def test_monthly_quota_reached_on_one_is_refused_on_the_other(
    tmp_path: Path, pg_server: PgServer, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, pg_server, redis_server, {"monthly_tokens": 40}) as c:
        a, b = c.hosts["a"].url, c.hosts["b"].url
        served = 0
        while (status := (await c.chat(a))[0]) == 200:
            served += 1
            assert served < 20
        assert status == 429 and served >= 1
        await asyncio.sleep(0.2)  # the last settle is sent after the answer
        status, _, body = await c.chat(b)
        assert status == 429 and body["error"]["code"] == "insufficient_quota"
        # Both hosts' rows in the one ledger: /admin/usage of b reports what a served.
        assert await c.sigterm("a") == 0
        used = await c.rows("SELECT SUM(prompt_tokens + completion_tokens) AS n FROM requests WHERE status = 200")
        assert used[0]["n"] >= 40
        await asyncio.sleep(0.2)  # b's flush of its refusal
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with c.session.get(b + "/admin/usage", headers=headers) as r:
            report = (await r.json())["rows"]
        assert r.status == 200 and len(report) == 1
        assert report[0]["requests"] == served + 2 and report[0]["total_tokens"] == used[0]["n"]


async def test_kill9_frees_the_dead_hosts_slots_within_the_lease(
    tmp_path: Path, pg_server: PgServer, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, pg_server, redis_server, {"max_concurrent": 2}) as c:
        a, b = c.hosts["a"], c.hosts["b"]
        await c.fake.reset()
        slow = [asyncio.create_task(c.chat(a.url, fake={"delay_ms": 60_000})) for _ in range(2)]
        deadline = time.monotonic() + 10
        while (await c.fake.stats())["in_flight"] < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (await c.chat(b.url))[0] == 429  # both slots are a's
        await a.kill()  # kill -9: no settle, no more lease renewals
        t0 = time.monotonic()
        while (status := (await c.chat(b.url))[0]) == 429:
            assert time.monotonic() - t0 < LEASE_S + 2, "slots not freed within the lease"
            await asyncio.sleep(0.05)
        freed_after = time.monotonic() - t0
        assert status == 200
        print(f"kill -9: slots free on the other host after {freed_after:.2f} s (lease_s {LEASE_S})")
        for t in slow:
            t.cancel()
        await asyncio.gather(*slow, return_exceptions=True)


async def test_postgres_down_10s_under_load_fails_nothing_and_loses_no_row(
    tmp_path: Path, pg_server: PgServer, redis_server: RedisServer
) -> None:
    async with cluster(tmp_path, pg_server, redis_server, {}) as c:
        ids: list[str] = []
        failures: list[int] = []

        async def load(stop: asyncio.Event) -> None:
            while not stop.is_set():
                status, rid, _ = await c.chat()
                ids.append(rid)
                if status != 200:
                    failures.append(status)

        stop = asyncio.Event()
        workers = [asyncio.create_task(load(stop)) for _ in range(4)]
        await asyncio.sleep(1)
        pg_server.stop()
        try:
            await asyncio.sleep(10)
            async with c.session.get(c.hosts["a"].url + "/readyz") as r:
                ready = await r.json()
            assert r.status == 200 and ready["stores"]["usage"]["healthy"] is False  # serving, rows kept
            assert ready["stores"]["usage"]["pending_rows"] > 0
        finally:
            pg_server.start_again()
        await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*workers)
        assert failures == [] and len(ids) > 50
        rows = await wait_rows(c, len(ids))
        assert sorted(r["request_id"] for r in rows) == sorted(ids)
        print(f"PostgreSQL down 10 s under load: {len(ids)} requests, 0 failed, {len(rows)} rows")


async def test_redis_down_fail_closed_or_local(tmp_path: Path, pg_server: PgServer, redis_server: RedisServer) -> None:
    """a: on_store_error fail_closed (503 limits_unavailable, /readyz 503); b: local (served on its
    own limits). Both recover when Redis is back."""
    limits = {"a": {"on_store_error": "fail_closed"}, "b": {"on_store_error": "local"}}
    async with cluster(tmp_path, pg_server, redis_server, {"requests_per_minute": 1000}, **limits) as c:
        a, b = c.hosts["a"].url, c.hosts["b"].url
        assert (await c.chat(a))[0] == 200 and (await c.chat(b))[0] == 200
        redis_server.stop()
        try:
            t0 = time.monotonic()
            status, _, body = await c.chat(a)
            refused_in = time.monotonic() - t0
            assert status == 503 and body["error"]["code"] == "limits_unavailable"
            assert (await c.chat(b))[0] == 200
            async with c.session.get(a + "/readyz") as r:
                ready = await r.json()
                assert r.status == 503 and ready["stores"]["limits"]["healthy"] is False
            async with c.session.get(b + "/readyz") as r:
                assert r.status == 200
            async with c.session.get(a + "/metrics") as r:
                assert 'llmd_limit_store_errors_total{op="admit"}' in await r.text()
            print(f"Redis down: fail_closed answered 503 in {refused_in * 1000:.1f} ms; local served")
        finally:
            redis_server.start_again()
        deadline = time.monotonic() + 10
        while (await c.chat(a))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)


async def test_reload_keeps_the_stores_and_applies_on_store_error(
    tmp_path: Path, pg_server: PgServer, redis_server: RedisServer
) -> None:
    """SIGHUP: on_store_error applies at once; the store itself (limits.prefix here) only at the
    next restart, which the log says. Requests keep their rows in the same ledger."""
    async with cluster(tmp_path, pg_server, redis_server, {"requests_per_minute": 1000}) as c:
        a = c.hosts["a"]
        assert (await c.chat(a.url))[0] == 200
        path = tmp_path / "config-a.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["limits"] = {**doc["limits"], "on_store_error": "local", "prefix": "elsewhere:"}
        path.write_text(yaml.safe_dump(doc))
        a.proc.send_signal(signal.SIGHUP)
        await a.wait_log(lambda d: d.get("msg") == "reloaded")
        await a.wait_log(lambda d: "limits.prefix changed" in str(d.get("msg")))
        redis_server.stop()
        try:
            assert (await c.chat(a.url))[0] == 200  # local now
        finally:
            redis_server.start_again()
        assert await c.sigterm("a") == 0
        rows = await c.rows()
        assert len(rows) == 2 and {r["instance"] for r in rows} == {"a"}


async def test_each_store_works_without_the_other(
    tmp_path: Path, pg_server: PgServer, redis_server: RedisServer, fake: FakeProc, monkeypatch: Any
) -> None:
    """usage.store: postgres with in-process limits; limits.store: redis with the SQLite file."""
    monkeypatch.setenv("LLMD_PG_DSN", dsn := fresh_db(pg_server))
    monkeypatch.setenv("LLMD_REDIS_URL", redis_server.url)
    model = {"m": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 4}}
    key = {"id": "k", "sha256": hashlib.sha256(SECRET.encode()).hexdigest(), "requests_per_minute": 2}
    body = {"model": "m", "messages": MSG, "max_tokens": 4}
    auth = {"Authorization": f"Bearer {SECRET}"}
    for name, sections in (
        ("pg", {"usage": {"store": "postgres", "instance": "pg-only"}}),
        ("redis", {"limits": {"store": "redis", "prefix": f"t{uuid.uuid4().hex[:8]}:"}}),
    ):
        doc = base_config(tmp_path / name, model, keys=[key], **sections)
        (tmp_path / name).mkdir()
        async with run_llmd(write_config(tmp_path / name / "config.yaml", doc)) as llmd:
            async with aiohttp.ClientSession() as s:
                statuses = []
                for _ in range(3):
                    async with s.post(llmd.url + "/v1/chat/completions", json=body, headers=auth) as r:
                        statuses.append(r.status)
                async with s.get(llmd.url + "/readyz") as r:
                    stores = (await r.json())["stores"]
            assert statuses == [200, 200, 429]
            if name == "pg":
                assert stores["usage"]["store"] == "postgres" and stores["limits"]["store"] == "memory"
            else:
                assert stores["usage"]["store"] == "sqlite" and stores["limits"]["store"] == "redis"
    db = await asyncpg.connect(dsn)
    try:
        assert await db.fetchval("SELECT count(*) FROM requests WHERE instance = 'pg-only'") == 3
    finally:
        await db.close()
