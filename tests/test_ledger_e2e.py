"""The usage ledger under load: every request that reached limits has exactly one row, token
sums equal what the upstream reported, the monthly rollup equals the rows, and stopping llmd
(SIGTERM) loses nothing; SIGKILL loses at most the last flush window."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import base_config, run_llmd, wait_for, write_config
from tests.fakeproc import FAKE_LLAMA, FakeProc, free_port
from tests.sse import SseParser, is_token_chunk, payloads

FREE, LIMITED = "sk-ledger-free-0123456789", "sk-ledger-limited-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def keys() -> list[dict]:
    return [
        {"id": "free", "sha256": hashlib.sha256(FREE.encode()).hexdigest()},
        {"id": "limited", "tier": "small", "sha256": hashlib.sha256(LIMITED.encode()).hexdigest()},
    ]


def config(tmp_path: Path, fake: FakeProc, **server: object) -> Path:
    doc = base_config(
        tmp_path,
        {"m": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 64}},
        tiers={"small": {"requests_per_minute": 20}},
        keys=keys(),
        server=server,
    )
    return write_config(tmp_path / "config.yaml", doc)


def words(i: int) -> int:
    return 1 if i % 6 == 4 else i % 7 + 1


def expected_tokens(i: int) -> tuple[int, int]:
    """The fake's deterministic usage: a chat prompt is its words + 4 template tokens; it
    generates exactly max_tokens tokens."""
    return words(i) + 4, (1 if i % 6 == 4 else i % 5 + 1)


async def one(s: aiohttp.ClientSession, url: str, i: int) -> dict:
    """Request i of the mix; returns what the client saw (tokens reported by the upstream)."""
    kind = ["plain", "stream", "stream_usage", "abort", "limited", "error"][i % 6]
    key = LIMITED if kind == "limited" else FREE
    body: dict = {"model": "m", "messages": [{"role": "user", "content": "w " * words(i)}], "max_tokens": i % 5 + 1}
    if kind == "limited":
        body["max_tokens"] = 1  # any 20 of them pass the limit: all must count the same
    if kind.startswith("stream") or kind == "abort":
        body["stream"] = True
    if kind == "stream_usage":
        body["stream_options"] = {"include_usage": True}
    if kind == "abort":
        body["max_tokens"] = 40
        body["fake"] = {"token_delay_ms": 50}
    if kind == "error":
        body["fake"] = {"status": 500, "message": "boom"}
    async with s.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if kind == "abort":
            parser = SseParser()
            async for data in r.content.iter_any():
                if any(is_token_chunk(e.json()) for e in parser.feed(data) if not e.done):
                    break  # hang up after the first token, whatever the framing
            return {"kind": kind}
        raw = await r.read()
        seen = {"kind": kind, "status": r.status}
        if r.status == 200 and not body.get("stream"):
            seen["usage"] = json.loads(raw)["usage"]
        elif r.status == 200 and kind == "stream_usage":
            (seen["usage"],) = [d["usage"] for d in payloads(raw) if d.get("usage")]
        return seen


async def test_500_mixed_requests_at_concurrency_32(tmp_path: Path, upstream: FakeProc) -> None:
    """1. 500 requests at concurrency 32: non-stream, stream with and without include_usage,
    aborted streams, requests over a key's limit, upstream errors; once per upstream and wire
    profile. 2. Rows == requests; each outcome is right; tokens of every answered request equal
    the fake's deterministic usage computed from the inputs; the rollup equals the sum of rows;
    `llmd usage` reads the same numbers while llmd runs."""
    fake = upstream
    async with run_llmd(config(tmp_path, fake)) as llmd:
        sem = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as s:

            async def bounded(i: int) -> dict:
                async with sem:
                    return await one(s, llmd.url, i)

            seen = await asyncio.gather(*(bounded(i) for i in range(500)))
        db = llmd.services.runtime.cfg.usage.path
        for _ in range(200):
            await llmd.services.ledger.flush()
            n = sqlite3.connect(db).execute("select count(*) from requests").fetchone()[0]
            if n == 500 and not llmd.services._background:
                break
            await asyncio.sleep(0.05)
        await llmd.services.ledger.flush()
        cli = subprocess.run(
            [sys.executable, "-m", "llmd", "usage", "--db", db, "--format", "json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    con = sqlite3.connect(db)
    rows = con.execute("select outcome, key_id, prompt_tokens, completion_tokens, status from requests").fetchall()
    assert len(rows) == 500
    by_outcome: dict[str, int] = {}
    for r in rows:
        by_outcome[r[0]] = by_outcome.get(r[0], 0) + 1
    n_kind = {k: sum(1 for x in seen if x["kind"] == k) for k in ("limited", "abort", "error")}
    assert by_outcome["rejected_rate"] == n_kind["limited"] - 20
    assert by_outcome["client_abort"] == n_kind["abort"]
    assert by_outcome["upstream_error"] == n_kind["error"]
    assert by_outcome["ok"] == 500 - by_outcome["rejected_rate"] - n_kind["abort"] - n_kind["error"]
    for x, i in zip(seen, range(500), strict=True):
        if x["kind"] in ("plain", "stream_usage") or (x["kind"] == "limited" and x["status"] == 200):
            # what the client was told equals the fake's model
            assert (x["usage"]["prompt_tokens"], x["usage"]["completion_tokens"]) == expected_tokens(i)
    ok_i = [i for i in range(500) if seen[i]["kind"] in ("plain", "stream", "stream_usage")]
    exp_prompt = sum(expected_tokens(i)[0] for i in ok_i) + 20 * 5
    exp_completion = sum(expected_tokens(i)[1] for i in ok_i) + 20 * 1
    ok_tokens = con.execute(
        "select sum(prompt_tokens), sum(completion_tokens) from requests where outcome='ok'"
    ).fetchone()
    assert ok_tokens == (exp_prompt, exp_completion)
    aborted = con.execute(
        "select min(completion_tokens), max(completion_tokens), group_concat(distinct token_method) from requests "
        "where outcome='client_abort'"
    ).fetchone()
    # each client read one token before hanging up, so llmd relayed at least that one; a remote
    # url cannot tokenize, so the prompt is an estimate and the row must say so (its value is
    # llmd's formula, not something the upstream reported)
    assert aborted[0] >= 1 and aborted[1] < 40 and aborted[2] == "stream_chunks+estimate"
    errors = con.execute(
        "select sum(prompt_tokens + completion_tokens) from requests "
        "where outcome in ('rejected_rate', 'upstream_error')"
    ).fetchone()
    assert errors == (0,)
    rollup = con.execute("select sum(requests), sum(prompt_tokens), sum(completion_tokens) from monthly").fetchone()
    sums = con.execute("select count(*), sum(prompt_tokens), sum(completion_tokens) from requests").fetchone()
    assert rollup == sums
    report = json.loads(cli.stdout)
    assert sum(r["requests"] for r in report) == 500
    assert sum(r["total_tokens"] for r in report) == sums[1] + sums[2]


class Load:
    """Requests at concurrency 16 with unique request ids until llmd stops answering."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.done: dict[str, float] = {}  # request id -> when the client had the whole answer
        self.stop = False

    async def worker(self, s: aiohttp.ClientSession, w: int) -> None:
        n = 0
        while not self.stop:
            rid = f"w{w}-{n}"
            n += 1
            try:
                async with s.post(
                    self.url + "/v1/chat/completions",
                    headers={"X-Request-ID": rid, "Authorization": f"Bearer {FREE}"},
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                ) as r:
                    await r.read()
                    if r.status == 200:
                        self.done[rid] = time.monotonic()
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.01)

    async def run_until(self, proc: subprocess.Popen[bytes], sig: int, after_done: int) -> float:
        """Send ``sig`` once ``after_done`` requests have finished (a count, not a clock: a busy
        machine only makes it take longer); return when it was sent."""
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(self.worker(s, w)) for w in range(16)]
            async with asyncio.timeout(60):
                while len(self.done) < after_done:
                    await asyncio.sleep(0.02)
            sent_at = time.monotonic()
            proc.send_signal(sig)
            while proc.poll() is None:
                await asyncio.sleep(0.02)
            self.stop = True
            await asyncio.gather(*tasks)
        return sent_at


def start_llmd(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "llmd", "serve", "-c", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError


def ids_in(db: str) -> set[str]:
    return {r[0] for r in sqlite3.connect(db).execute("select request_id from requests where outcome='ok'")}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_stopping_under_load_loses_no_finished_request(tmp_path: Path, fake: FakeProc, sig: int) -> None:
    """1. llmd (usage.flush_ms 200) under load at concurrency 16. 2. SIGTERM: it drains, flushes
    and exits 0: every request the client saw finish has its row. SIGKILL: only rows of the
    last flush window may be lost; the test measures how many and how old they were."""
    port = free_port()
    path = config(tmp_path, fake, port=port)
    doc = path.read_text().replace("flush_ms: 20", "flush_ms: 200")
    path.write_text(doc)
    proc = start_llmd(path)
    try:
        await wait_listening(port)
        load = Load(f"http://127.0.0.1:{port}")
        sent_at = await load.run_until(proc, sig, after_done=100)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    db = str(tmp_path / "usage.sqlite3")
    recorded = ids_in(db)
    missing = {rid: t for rid, t in load.done.items() if rid not in recorded}
    assert len(load.done) >= 100
    if sig == signal.SIGTERM:
        assert proc.returncode == 0
        assert not missing, f"{len(missing)} finished requests have no row"
    else:
        ages = sorted(sent_at - t for t in missing.values())
        print(
            f"SIGKILL: {len(missing)} of {len(load.done)} finished requests lost; "
            f"they finished at most {max(ages, default=0) * 1000:.0f} ms before the kill"
        )
        # flush_ms (200) plus one write, with a loose margin for scheduling on a busy 2-core
        # machine: what matters is that only the last flush window is lost, not older rows.
        assert all(age < 2.0 for age in ages), ages


async def _stream_counting_chunks(s: aiohttp.ClientSession, url: str, path: str, body: dict) -> int:
    """Stream one request; the number of token-bearing events the client received."""
    parser, n = SseParser(), 0
    async with s.post(url + path, json=body) as r:
        assert r.status == 200, await r.text()
        async for data in r.content.iter_any():
            n += sum(1 for e in parser.feed(data) if not e.done and is_token_chunk(e.json()))
    return n


async def test_a_stream_without_usage_is_billed_from_its_chunks_and_the_replicas_tokenizer(tmp_path: Path) -> None:
    """1. A supervised llama-server (the fake, wire "no-usage": it ignores include_usage and
    sends no timings, as some servers do). 2. A chat stream and a completions stream run to
    their end through llmd. 3. Each row: completion_tokens == the token chunks the client
    received, prompt_tokens == the replica's tokenization of the prompt (chat: 3 words + 4
    template tokens; completions: 4 words), not 0."""
    doc = base_config(
        tmp_path,
        {"m": {"backend": "llama-server", "model": "fake.gguf", "args": ["-np", "2", "--fake-wire", "no-usage"]}},
        launchers={"llama-server": {"command": [sys.executable, str(FAKE_LLAMA)]}},
    )
    async with run_llmd(write_config(tmp_path / "c.yaml", doc)) as llmd, aiohttp.ClientSession() as s:
        await wait_for(lambda: llmd.services.readiness()[0])
        chat_chunks = await _stream_counting_chunks(s, llmd.url, "/v1/chat/completions", {
            "model": "m", "stream": True, "max_tokens": 5, "messages": [{"role": "user", "content": "one two three"}]})
        comp_chunks = await _stream_counting_chunks(s, llmd.url, "/v1/completions", {
            "model": "m", "stream": True, "max_tokens": 3, "prompt": "a b c d",
            "stream_options": {"include_usage": True}})
        assert (chat_chunks, comp_chunks) == (5, 3)  # the fake's model: max_tokens tokens
        db = llmd.services.runtime.cfg.usage.path
        rows: list = []
        for _ in range(200):  # a row whose prompt is tokenized by the replica settles in the background
            await llmd.services.ledger.flush()
            rows = sqlite3.connect(db).execute(
                "select route, outcome, prompt_tokens, completion_tokens from requests order by ts").fetchall()
            if len(rows) == 2 and not llmd.services._background:
                break
            await asyncio.sleep(0.025)
    assert rows == [("chat", "ok", 7, chat_chunks), ("completions", "ok", 4, comp_chunks)]
