"""The admin page's server side: static files with their security headers, and the data routes
it reads (/admin/usage/daily, /admin/keys, /admin/keys/new, /admin/events), each refused
without an admin key. llmd runs in this process on a real socket, relaying to a fake
llama-server; the ledger is seeded with rows before llmd opens it."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llmd.admin import SECURITY_HEADERS
from llmd.config import UsageConfig
from llmd.months import current_month, month_start
from llmd.usage import Ledger, UsageRow
from tests.conftest import base_config, run_llmd, write_config
from tests.fakeproc import FakeProc

ADMIN = "sk-test-admin-0123456789abcdef0123456789abcdef"
ALICE = "sk-test-alice-0123456789abcdef0123456789abcdef"
BOB = "sk-test-bob-0123456789abcdef0123456789abcdef012"


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def keys_section() -> list[dict[str, Any]]:
    return [
        {"id": "ops", "sha256": sha(ADMIN), "admin": True},
        {"id": "alice", "tier": "team", "sha256": sha(ALICE), "monthly_tokens": 100000},
        {"id": "bob", "tier": "free", "sha256": sha(BOB), "models": ["m"]},
        {"id": "gone", "sha256": sha("sk-old-0123456789abcdef0123456789abcdefgh"), "revoked": True},
    ]


TIERS = {"team": {"requests_per_minute": 60, "tokens_per_minute": 50000}, "free": {"requests_per_minute": 5}}


def row(day: int, key: str, tier: str, model: str, prompt: int, completion: int, outcome: str = "ok") -> UsageRow:
    ts = month_start(current_month()) + (day - 1) * 86400 + 3600
    return UsageRow(ts=ts, request_id=f"r{day}{key}{model}{prompt}", key_id=key, tier=tier, model=model,
                    replica=f"{model}/0", route="chat", status=200 if outcome == "ok" else 502, stream=False,
                    outcome=outcome, prompt_tokens=prompt, completion_tokens=completion)


# Day 1: alice 2 requests on m (100+20, 50+5) and 1 on "other"; day 2: bob 1 (7+3), one failed.
SEEDED = [
    row(1, "alice", "team", "m", 100, 20),
    row(1, "alice", "team", "m", 50, 5),
    row(1, "alice", "team", "other", 30, 3),
    row(2, "bob", "free", "m", 7, 3),
    row(2, "bob", "free", "m", 4, 0, outcome="upstream_error"),
]


async def seed(path: Path, rows: list[UsageRow]) -> None:
    ledger = Ledger(UsageConfig(path=str(path), flush_ms=10))
    await ledger.open()
    for r in rows:
        ledger.record(r)
    assert await ledger.flush()
    await ledger.close()


def config(tmp_path: Path, fake: FakeProc) -> Path:
    model = {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 4}
    doc = base_config(tmp_path, {"m": model}, keys=keys_section(), tiers=TIERS)
    return write_config(tmp_path / "config.yaml", doc)


def bearer(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


@pytest.fixture
async def served(tmp_path: Path, fake: FakeProc):
    await seed(tmp_path / "usage.sqlite3", SEEDED)
    async with run_llmd(config(tmp_path, fake)) as llmd, aiohttp.ClientSession() as http:
        yield llmd, http


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_script = False
        self.handlers: list[str] = []
        self.styles: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.handlers += [k for k in a if k.startswith("on")]
        if "style" in a:
            self.styles.append(tag)
        if tag == "script":
            self.scripts.append(a)
            self._in_script = True

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_script = True


async def test_page_is_static_with_a_strict_csp(served) -> None:
    llmd, http = served
    async with http.get(llmd.url + "/admin", allow_redirects=False) as r:
        assert r.status == 308 and r.headers["Location"] == "/admin/"
    async with http.get(llmd.url + "/admin/") as r:
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
        headers = r.headers
    csp = headers["Content-Security-Policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    # Scripts only from this origin: no inline code, no eval, no other host, no CDN.
    assert directives["script-src"] == ["'self'"] and directives["default-src"] == ["'none'"]
    assert directives["connect-src"] == ["'self'"] and directives["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp and "http" not in csp
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "no-referrer" and headers["X-Content-Type-Options"] == "nosniff"
    tags = _Tags()
    tags.feed(html)
    assert tags.scripts == [{"src": "app.js", "defer": None}] and not tags.inline_script
    assert tags.handlers == [] and tags.styles == []
    assert "sk-" not in html.replace("sk-...", "")  # the page ships no key
    for name, ctype in (("app.js", "text/javascript"), ("app.css", "text/css")):
        async with http.get(f"{llmd.url}/admin/{name}") as r:
            assert r.status == 200 and r.content_type == ctype
            assert r.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]
            body = await r.text()
            # Vendored nothing, fetched nothing: no URL of another origin in the page's code.
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", body), name


@pytest.mark.parametrize("route", ["/admin/usage/daily", "/admin/keys", "/admin/events", "/admin/status"])
async def test_admin_data_needs_an_admin_key(served, route: str) -> None:
    llmd, http = served
    for secret, status in ((None, 401), ("sk-wrong", 401), (ALICE, 403), (BOB, 403)):
        async with http.get(llmd.url + route, headers=bearer(secret)) as r:
            assert r.status == status, (route, secret)
            body = await r.json()
            assert body["error"]["code"] in ("invalid_api_key", "admin_required")
            assert "rows" not in body and "keys" not in body
    async with http.post(llmd.url + "/admin/keys/new", headers=bearer(ALICE), json={"id": "x"}) as r:
        assert r.status == 403


async def test_daily_usage_totals_and_filters(served) -> None:
    llmd, http = served
    month = current_month()
    async with http.get(llmd.url + "/admin/usage/daily", headers=bearer(ADMIN)) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["month"] == month
    got = {(x["day"][-2:], x["key_id"], x["tier"], x["model"]): x for x in doc["rows"]}
    assert set(got) == {("01", "alice", "team", "m"), ("01", "alice", "team", "other"), ("02", "bob", "free", "m")}
    a = got[("01", "alice", "team", "m")]
    assert (a["requests"], a["prompt_tokens"], a["completion_tokens"], a["total_tokens"]) == (2, 150, 25, 175)
    b = got[("02", "bob", "free", "m")]
    assert (b["requests"], b["total_tokens"], b["errors"]) == (2, 14, 1)
    assert sum(x["total_tokens"] for x in doc["rows"]) == 175 + 33 + 14
    # Filters: tier, key, model; the same numbers as CSV.
    async with http.get(llmd.url + "/admin/usage/daily?tier=free", headers=bearer(ADMIN)) as r:
        assert [x["key_id"] for x in (await r.json())["rows"]] == ["bob"]
    async with http.get(llmd.url + "/admin/usage/daily?model=other&key=alice", headers=bearer(ADMIN)) as r:
        assert [x["total_tokens"] for x in (await r.json())["rows"]] == [33]
    async with http.get(llmd.url + f"/admin/usage/daily?month={month}&format=csv", headers=bearer(ADMIN)) as r:
        assert r.status == 200 and r.content_type == "text/csv"
        assert f"llmd-usage-{month}.csv" in r.headers["Content-Disposition"]
        table = list(csv.DictReader(io.StringIO(await r.text())))
    assert sum(int(x["total_tokens"]) for x in table) == 222 and table[0]["day"].startswith(month)
    async with http.get(llmd.url + "/admin/usage/daily?month=1999-01", headers=bearer(ADMIN)) as r:
        assert (await r.json())["rows"] == []
    for bad in ("month=2024-13", "month=may", "format=xml"):
        async with http.get(llmd.url + "/admin/usage/daily?" + bad, headers=bearer(ADMIN)) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] in ("month", "format")


async def test_keys_listed_without_secrets_and_new_key_yaml(served) -> None:
    llmd, http = served
    async with http.get(llmd.url + "/admin/keys", headers=bearer(ADMIN)) as r:
        text = await r.text()
        doc = json.loads(text)
    assert [k["id"] for k in doc["keys"]] == ["ops", "alice", "bob", "gone"]
    by_id = {k["id"]: k for k in doc["keys"]}
    assert by_id["ops"]["admin"] and by_id["gone"]["revoked"] and by_id["bob"]["models"] == ["m"]
    assert by_id["alice"]["limits"]["monthly_tokens"] == 100000 and by_id["alice"]["tier"] == "team"
    assert doc["tiers"] == ["free", "team"]
    for k in keys_section():
        assert k["sha256"] not in text
    for secret in (ADMIN, ALICE, BOB):
        assert secret not in text
    carol = {"id": "carol", "tier": "team"}
    async with http.post(llmd.url + "/admin/keys/new", headers=bearer(ADMIN), json=carol) as r:
        assert r.status == 200
        new = await r.json()
    assert new["secret"].startswith("sk-") and new["sha256"] == sha(new["secret"])
    assert new["yaml"] == f"  - id: carol\n    tier: team\n    sha256: {sha(new['secret'])}\n"
    for body, param in (({"id": "alice"}, "id"), ({"id": "a b"}, "id"), ({"id": "x", "tier": "gold"}, "tier")):
        async with http.post(llmd.url + "/admin/keys/new", headers=bearer(ADMIN), json=body) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == param
    async with http.post(llmd.url + "/admin/keys/new", headers=bearer(ADMIN), data=b"[1,2]") as r:
        assert r.status == 400


async def test_events_stream_snapshots(served) -> None:
    llmd, http = served
    # One request by alice: her minute windows and month count show it in the next snapshot.
    async with http.post(llmd.url + "/v1/chat/completions", headers=bearer(ALICE),
                         json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status == 200
        used = (await r.json())["usage"]["total_tokens"]
    async with http.get(llmd.url + "/admin/events", headers=bearer(ADMIN)) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert r.headers["Cache-Control"] == "no-store"
        event, data = None, ""
        async for raw in r.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data += line.split(":", 1)[1].strip()
            elif not line and data:
                break
    assert event == "snapshot"
    snap = json.loads(data)
    assert [(x["replica"], x["state"]) for x in snap["replicas"]] == [("m/0", "ready")]
    assert snap["queues"] == [{"model": "m", "depth": 0, "max_queue": 256, "oldest_wait_s": 0.0,
                               "last_wait_s": 0.0, "in_flight": 0, "slots": 4}]
    limits = {x["key_id"]: x for x in snap["limits"]}
    assert set(limits) == {"ops", "alice", "bob"}  # revoked keys have no limits to show
    alice = limits["alice"]
    assert alice["requests_per_minute"]["limit"] == 60 and alice["requests_per_minute"]["remaining"] == 59
    assert alice["tokens_per_minute"]["used"] == used and alice["tokens_per_minute"]["remaining"] == 50000 - used
    # The seeded month (222 tokens, alice's 208 of them) was loaded at start, plus this request.
    assert alice["monthly_tokens"] == {"limit": 100000, "used": 208 + used, "remaining": 100000 - 208 - used}
    assert limits["ops"]["requests_per_minute"] is None and limits["bob"]["requests_per_minute"]["limit"] == 5


async def test_open_mode_answers_this_host_only(tmp_path: Path, fake: FakeProc) -> None:
    """No keys: the page's routes answer a local client whatever key it sends, and refuse a
    remote one that nginx (a trusted proxy on loopback) forwards."""
    doc = base_config(tmp_path, {"m": {"backend": "openai", "urls": [fake.url + "/v1"]}})
    async with run_llmd(write_config(tmp_path / "config.yaml", doc)) as llmd, aiohttp.ClientSession() as http:
        for route in ("/admin/usage/daily", "/admin/keys"):
            async with http.get(llmd.url + route, headers=bearer("anything")) as r:
                assert r.status == 200
            async with http.get(llmd.url + route, headers={"X-Forwarded-For": "203.0.113.7"}) as r:
                assert r.status == 403 and (await r.json())["error"]["code"] == "admin_required"
        async with http.get(llmd.url + "/admin/events", headers={"X-Forwarded-For": "203.0.113.7"}) as r:
            assert r.status == 403
        # A hop with a port, or one that is no address at all, is not the proxy itself (loopback):
        # both were taken for the proxy's own address, and so for a local client.
        for hop in ("203.0.113.7:4711", "[2001:db8::7]:4711", "unknown", "127.0.0.1, bogus"):
            async with http.get(llmd.url + "/admin/keys", headers={"X-Forwarded-For": hop}) as r:
                assert r.status == 403, hop


async def test_trailing_newlines_are_refused(served) -> None:
    """A regex's "$" also matches before a final newline: a month or key id ending in one was
    taken, and the month then went into the CSV's Content-Disposition header (aiohttp refused
    to write it and dropped the connection)."""
    llmd, http = served
    for route in ("/admin/usage/daily?format=csv&month=", "/admin/usage/daily?month=", "/admin/usage?month="):
        async with http.get(llmd.url + route + "2026-01%0A", headers=bearer(ADMIN)) as r:
            assert r.status == 400 and r.headers["X-Frame-Options"] == "DENY", route
            assert (await r.json())["error"]["param"] == "month"
    async with http.post(llmd.url + "/admin/keys/new", headers=bearer(ADMIN), json={"id": "carol\n"}) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "id"


async def test_new_key_body_split_over_segments(served) -> None:
    """content.read(n) returns what has arrived so far: a body in two TCP segments was cut and
    refused as not JSON."""
    llmd, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", int(llmd.url.rsplit(":", 1)[1]))
    body = b'{"id": "carol", "tier": "team"}'
    head = (f"POST /admin/keys/new HTTP/1.1\r\nHost: llmd\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    writer.write(head.encode() + body[:10])
    await writer.drain()
    await asyncio.sleep(0.2)  # the rest as a later segment
    writer.write(body[10:])
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status, _, payload = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(payload)["id"] == "carol"


async def test_events_stream_ends_when_a_reload_revokes_its_key(tmp_path: Path, fake: FakeProc) -> None:
    """An admin key revoked by SIGHUP: a stream it opened before must not go on for ever."""
    path = config(tmp_path, fake)
    async with run_llmd(path) as llmd, aiohttp.ClientSession() as http:
        async with http.get(llmd.url + "/admin/events", headers=bearer(ADMIN)) as r:
            assert r.status == 200
            await r.content.readline()  # the first snapshot is under way
            doc = yaml.safe_load(path.read_text())
            doc["keys"][0]["revoked"] = True
            write_config(path, doc)
            assert await llmd.daemon.reload()
            async with asyncio.timeout(30):  # a guard: the stream ends at the next tick
                async for _ in r.content:
                    pass
        async with http.get(llmd.url + "/admin/events", headers=bearer(ADMIN)) as r:
            assert r.status == 401
