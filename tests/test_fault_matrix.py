"""The fault matrix: every way an upstream, a replica, the disk, a reload or a client can misbehave,
against real processes and sockets; each row asserts what the client saw, the ledger row, and
that nothing leaked (replica, limiter and admission counters back at zero).

Upstream faults are played by ``faultkit.RawUpstream`` (raw asyncio streams on a loopback socket,
so it can hang, reset, send garbage or compress), replica faults by the fake llama-server that
llmd itself supervises, the ledger's disk by a tiny tmpfs mounted in tmp_path (needs root; those
rows are skipped without it), reloads by a real ``llmd serve`` and SIGHUP, hostile clients by raw sockets, through the
shipped nginx site where nginx is the one that must cut them.

``bench/fault_matrix.py`` runs this module and prints the matrix (fault, expected, seen, rows lost)
from the JSON lines each test writes to ``$LLMD_FAULT_MATRIX``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Llmd, base_config, llmd_process, run_llmd, wait_for, write_config
from tests.fakeproc import FAKE_LLAMA, FakeProc, free_port
from tests.faultkit import (
    GOOD_USAGE,
    HTML,
    STREAM_TOKENS,
    Matrix,
    RawUpstream,
    Seen,
    assert_no_leaks,
    call,
    ledger_rows,
    read_rows,
    whole_answer,
)
from tests.nginxproc import Rendered, render, run_nginx, substitute

# --- shared ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the matrix, written when the test's ``with`` block ends (pass or fail)."""

    fault: str
    expected: str
    seen: str = "(not reached)"
    rows_lost: int = 0


@contextlib.contextmanager
def matrix_row(fault: str, expected: str) -> Iterator[Row]:
    """The block fills in ``seen`` and ``rows_lost`` before it asserts, so that a failing row
    still shows what happened."""
    row = Row(fault, expected)
    try:
        yield row
    except pytest.skip.Exception as e:
        row.seen = f"SKIPPED: {e.msg}"[:300]
        raise
    except BaseException as e:
        row.seen = f"FAILED: {row.seen} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:300]
        raise
    finally:
        Matrix.row(row.fault, row.expected, row.seen, row.rows_lost)


def config(tmp_path: Path, urls: list[str], *, first_byte_s: float = 10, total_s: float = 30,
           retries: int = 2, **sections: Any) -> Path:
    """Model ``m`` relayed to ``urls`` (round-robin: the first request goes to urls[1], so a
    bad replica listed second is always tried)."""
    doc = base_config(tmp_path, {"m": {"backend": "openai", "urls": urls, "slots": 4}}, **sections)
    doc["routing"].update(strategy="round-robin", retries=retries,
                          timeouts={"connect_s": 2, "first_byte_s": first_byte_s, "total_s": total_s})
    return write_config(tmp_path / "config.yaml", doc)


async def rows_of(llmd: Llmd, seen: list[Seen], expect: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The ledger rows of these requests, in order, and how many are missing (waiting for
    ``expect`` of them, all by default)."""
    rids = [s.request_id for s in seen]
    rows = await ledger_rows(llmd.services, llmd.services.ledger.path, rids, expect=expect)
    return [rows[r] for r in rids if r in rows], len(rids) - len(rows)


async def all_rows(llmd: Llmd) -> int:
    """How many rows the ledger holds in all (after a flush)."""
    await llmd.services.ledger.flush()
    with contextlib.closing(sqlite3.connect(llmd.services.ledger.path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


def brief(s: Seen) -> str:
    """The client's view in a few words, for the matrix."""
    if s.exception:
        return s.exception[:60]
    if s.events or s.headers.get("content-type", "").startswith("text/event-stream"):
        err = s.errors[0].get("code") if s.errors else None
        tail = (f", error event {err}" if err else "") + (", [DONE]" if s.done else "")
        return f"{s.status} SSE {s.tokens} tok{tail}"
    try:
        code = s.envelope.get("code")
        return f"{s.status} envelope {code}"
    except (ValueError, TypeError, AssertionError):
        return f"{s.status} {s.headers.get('content-type', '')} {len(s.body)} B"


def row_brief(r: dict[str, Any]) -> str:
    return f"row {r['status']}/{r['outcome']} p{r['prompt_tokens']} c{r['completion_tokens']} {r['token_method']}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# --- upstream hangs -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_upstream_hangs_before_headers(tmp_path: Path, session: aiohttp.ClientSession, stream: bool) -> None:
    """1. The upstream reads the request and never answers. 2. After first_byte_s (1 s) the
    client gets 504 in the envelope (a stream too: no header went out yet), not retried.
    3. Row: 504, outcome timeout, no tokens."""
    with matrix_row(f"upstream hangs before headers ({'stream' if stream else 'whole'})",
                    "504 upstream_timeout after first_byte_s; row 504/timeout") as m:
        async with RawUpstream("hang_headers") as up, run_llmd(config(tmp_path, [up.url], first_byte_s=1)) as llmd:
            s = await call(session, llmd.url, stream=stream)
            (row,), m.rows_lost = await rows_of(llmd, [s])
            m.seen = f"{brief(s)} in {s.elapsed_s:.1f}s; {row_brief(row)}"
            assert s.status == 504 and s.envelope["code"] == "upstream_timeout", s
            assert 0.9 <= s.elapsed_s < 8, s.elapsed_s
            assert len(up.requests) == 1  # a timeout is not retried: the upstream may still be working on it
            assert (row["status"], row["outcome"], row["completion_tokens"]) == (504, "timeout", 0)
            await assert_no_leaks(llmd.services)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_upstream_hangs_after_headers(tmp_path: Path, session: aiohttp.ClientSession, stream: bool) -> None:
    """1. The upstream sends 200 headers (an event stream, or JSON of 1000 bytes) and no body.
    2. At total_s (2 s): a stream gets an in-band error event (upstream_timeout) and its end; a
    whole answer gets 504 in the envelope. 3. Row: outcome timeout, no completion tokens."""
    with matrix_row(f"upstream hangs after headers ({'stream' if stream else 'whole'})",
                    "stream: error event + end at total_s; whole: 504; row timeout") as m:
        async with RawUpstream("hang_body") as up, \
                run_llmd(config(tmp_path, [up.url], first_byte_s=1, total_s=2)) as llmd:
            s = await call(session, llmd.url, stream=stream)
            (row,), m.rows_lost = await rows_of(llmd, [s])
            m.seen = f"{brief(s)} in {s.elapsed_s:.1f}s; {row_brief(row)}"
            assert s.exception is None, s.exception
            assert 1.9 <= s.elapsed_s < 9, s.elapsed_s
            if stream:
                assert s.status == 200 and s.tokens == 0 and not s.done
                assert [e["code"] for e in s.errors] == ["upstream_timeout"], s.events
                assert (row["status"], row["outcome"], row["completion_tokens"]) == (200, "timeout", 0)
                assert row["token_method"].startswith("stream_chunks+")
            else:
                assert s.status == 504 and s.envelope["code"] == "upstream_timeout"
                assert (row["status"], row["outcome"], row["completion_tokens"]) == (504, "timeout", 0)
            await assert_no_leaks(llmd.services)


@pytest.mark.parametrize("fault", ["hang_mid", "reset_mid"])
async def test_stream_breaks_after_the_first_byte(tmp_path: Path, session: aiohttp.ClientSession, fault: str) -> None:
    """1. The upstream streams 3 token chunks, then hangs (until total_s, 2 s) or resets the
    connection (RST). Two replicas: after the first byte nothing may be retried.
    2. The client has the 3 tokens, then one in-band error event (upstream_timeout or
    upstream_unreachable) and the end of the stream, no [DONE].
    3. Row: 200, outcome timeout / upstream_error, completion_tokens == the 3 chunks the client got."""
    code, outcome = (
        ("upstream_timeout", "timeout") if fault == "hang_mid" else ("upstream_unreachable", "upstream_error")
    )
    with matrix_row(f"stream {'hangs' if fault == 'hang_mid' else 'reset (RST)'} mid-stream",
                    f"3 tok + error event {code}; row 200/{outcome} c3") as m:
        async with RawUpstream(fault) as up, RawUpstream(fault) as up2, \
                run_llmd(config(tmp_path, [up.url, up2.url], first_byte_s=1, total_s=2)) as llmd:
            s = await call(session, llmd.url, stream=True)
            (row,), m.rows_lost = await rows_of(llmd, [s])
            m.seen = f"{brief(s)}; {row_brief(row)}"
            assert s.exception is None and s.status == 200, s
            assert s.tokens == 3 and not s.done
            assert [e["code"] for e in s.errors] == [code], s.events
            assert len(up.requests) + len(up2.requests) == 1  # not retried after the first byte
            assert (row["status"], row["outcome"]) == (200, outcome)
            assert row["completion_tokens"] == s.tokens == 3
            await assert_no_leaks(llmd.services)


async def test_unframed_stream_reset_mid_stream(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """1. The upstream streams without Content-Length or chunked framing (the body ends with the
    connection), sends 3 token chunks and resets the connection, with no [DONE].
    2. The client must learn that the stream broke: 3 tokens, then an in-band error event.
    3. Row: 200/upstream_error, completion_tokens 3."""
    with matrix_row("stream reset mid-stream, body framed by close",
                    "3 tok + error event; row 200/upstream_error c3") as m:
        async with RawUpstream("reset_mid_unframed") as up, run_llmd(config(tmp_path, [up.url])) as llmd:
            s = await call(session, llmd.url, stream=True)
            (row,), m.rows_lost = await rows_of(llmd, [s])
            m.seen = f"{brief(s)}; {row_brief(row)}"
            await assert_no_leaks(llmd.services)
            assert s.status == 200 and s.tokens == 3 and not s.done, s
            assert row["completion_tokens"] == 3
            assert [e["code"] for e in s.errors] == ["upstream_unreachable"], s.events
            assert (row["status"], row["outcome"]) == (200, "upstream_error")


@pytest.mark.parametrize("fault", ["hang_mid", "reset_mid", "garbage_status"])
async def test_whole_answer_breaks_on_the_only_replica(tmp_path: Path, session: aiohttp.ClientSession,
                                                       fault: str) -> None:
    """1. One replica. It sends 100 of 1000 promised bytes and then hangs or resets, or it
    answers a status line that is not HTTP at all.
    2. The client gets the envelope: 504 upstream_timeout (hang, at total_s) or 502
    upstream_unreachable. 3. Row: that status, outcome timeout / upstream_error."""
    status, code, outcome = ((504, "upstream_timeout", "timeout") if fault == "hang_mid"
                             else (502, "upstream_unreachable", "upstream_error"))
    label = {"hang_mid": "hangs mid-body", "reset_mid": "resets mid-body",
             "garbage_status": "garbage status line"}[fault]
    with matrix_row(f"whole answer {label}, one replica", f"{status} {code}; row {status}/{outcome}") as m:
        async with RawUpstream(fault) as up, \
                run_llmd(config(tmp_path, [up.url], first_byte_s=1, total_s=2)) as llmd:
            s = await call(session, llmd.url)
            (row,), m.rows_lost = await rows_of(llmd, [s])
            m.seen = f"{brief(s)}; {row_brief(row)}"
            assert s.status == status and s.envelope["code"] == code, s
            assert (row["status"], row["outcome"]) == (status, outcome)
            await assert_no_leaks(llmd.services)


@pytest.mark.parametrize("fault", ["reset_mid", "garbage_status"])
async def test_whole_answer_breaks_and_another_replica_answers(tmp_path: Path, session: aiohttp.ClientSession,
                                                               fault: str) -> None:
    """1. Two replicas, a good one and a bad one (resets mid-body / garbage status line).
    2. Two requests (round-robin: one is sent to the bad replica first): both 200 with the
    good answer, the bad replica saw at least one of them. 3. Rows: 200/ok, served by the good replica, with the
    upstream's usage."""
    label = {"reset_mid": "resets mid-body", "garbage_status": "garbage status line"}[fault]
    with matrix_row(f"whole answer {label}, 2 replicas", "retried: 200 from the other; rows 200/ok") as m:
        async with RawUpstream("ok") as good, RawUpstream(fault) as bad, \
                run_llmd(config(tmp_path, [good.url, bad.url])) as llmd:
            seen = [await call(session, llmd.url) for _ in range(2)]
            rows, m.rows_lost = await rows_of(llmd, seen)
            m.seen = f"{[s.status for s in seen]}, bad replica tried {len(bad.requests)}x; " + \
                "; ".join(row_brief(r) for r in rows)
            assert [s.status for s in seen] == [200, 200], seen
            assert all(s.json() == json.loads(whole_answer()) for s in seen)
            assert len(bad.requests) >= 1 and len(good.requests) == 2
            assert [(r["status"], r["outcome"], r["replica"]) for r in rows] == [(200, "ok", "m/0")] * 2
            assert all((r["prompt_tokens"], r["completion_tokens"]) == (12, STREAM_TOKENS) for r in rows)
            await assert_no_leaks(llmd.services)


@pytest.mark.parametrize("replicas", [1, 2])
async def test_upstream_refuses_connections(tmp_path: Path, session: aiohttp.ClientSession, replicas: int) -> None:
    """1. An upstream url where nothing listens (connection refused), alone or listed second
    after a good one. 2. Alone: 502 upstream_unreachable at once. With a good one: both of two
    requests (round-robin: one goes to the dead url first) answer 200. 3. Rows say so."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    expected = "502 upstream_unreachable; row 502/upstream_error" if replicas == 1 else "retried: 200; rows 200/ok"
    with matrix_row(f"upstream refuses connections, {replicas} replica(s)", expected) as m:
        async with RawUpstream("ok") as good:
            urls = [dead] if replicas == 1 else [good.url, dead]
            async with run_llmd(config(tmp_path, urls)) as llmd:
                seen = [await call(session, llmd.url) for _ in range(replicas)]
                rows, m.rows_lost = await rows_of(llmd, seen)
                m.seen = f"{', '.join(brief(s) for s in seen)}; " + "; ".join(row_brief(r) for r in rows)
                if replicas == 1:
                    assert seen[0].status == 502 and seen[0].envelope["code"] == "upstream_unreachable"
                    assert (rows[0]["status"], rows[0]["outcome"]) == (502, "upstream_error")
                else:
                    assert [s.status for s in seen] == [200, 200] and len(good.requests) == 2
                    assert [(r["status"], r["outcome"], r["replica"]) for r in rows] == [(200, "ok", "m/0")] * 2
                await assert_no_leaks(llmd.services)


# --- odd answers ----------------------------------------------------------------------------------


async def test_malformed_sse_is_relayed(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """1. The upstream's stream holds garbage lines, non-JSON and binary data, JSON of the
    wrong shape, a comment, then 2 good token chunks and [DONE].
    2. The client gets every data event relayed, the 2 tokens and [DONE]; llmd does not crash.
    3. Row: 200/ok, completion_tokens == the 2 token chunks (no usage came)."""
    with matrix_row("malformed SSE (garbage, non-JSON data)", "relayed as is, 2 tok + [DONE]; row 200/ok c2") as m:
        async with RawUpstream("malformed_sse") as up, run_llmd(config(tmp_path, [up.url])) as llmd:
            s = await call(session, llmd.url, stream=True)
            (row,), m.rows_lost = await rows_of(llmd, [s])
            m.seen = f"{brief(s)}, {len(s.events)} data events; {row_brief(row)}"
            assert s.status == 200 and s.tokens == 2 and s.done and not s.errors, s
            assert b"{not json" in s.events and b"[1, 2, 3]" in s.events
            assert (row["status"], row["outcome"], row["completion_tokens"]) == (200, "ok", 2)
            assert row["token_method"].startswith("stream_chunks+")
            # Still serving.
            up.mode = "ok"
            assert (await call(session, llmd.url)).status == 200
            await assert_no_leaks(llmd.services)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_gzip_answer_although_identity_was_asked(tmp_path: Path, session: aiohttp.ClientSession,
                                                       stream: bool) -> None:
    """1. The upstream compresses its answer (Content-Encoding: gzip) although llmd sent
    Accept-Encoding: identity. 2. The client gets the decompressed answer (valid JSON, or the
    6 tokens and [DONE]) without a Content-Encoding header. 3. Row: 200/ok with the upstream's usage."""
    with matrix_row(f"gzip answer not asked for ({'stream' if stream else 'whole'})",
                    "decoded, no Content-Encoding; row 200/ok with usage") as m:
        async with RawUpstream("gzip") as up, run_llmd(config(tmp_path, [up.url])) as llmd:
            s = await call(session, llmd.url, stream=stream)
            (row,), m.rows_lost = await rows_of(llmd, [s])
            m.seen = f"{brief(s)}, content-encoding={s.headers.get('content-encoding')}; {row_brief(row)}"
            assert up.requests[0].headers.get("accept-encoding") == "identity"
            assert s.status == 200 and "content-encoding" not in s.headers, s.headers
            if stream:
                assert s.tokens == STREAM_TOKENS and s.done and not s.errors
                assert not any(b'"usage"' in e for e in s.events)  # llmd asked for it: hidden
            else:
                assert s.json() == json.loads(whole_answer())
            assert (row["status"], row["outcome"], row["token_method"]) == (200, "ok", "upstream")
            assert (row["prompt_tokens"], row["completion_tokens"]) == (
                GOOD_USAGE["prompt_tokens"], GOOD_USAGE["completion_tokens"])
            await assert_no_leaks(llmd.services)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_html_answer_is_relayed_as_is(tmp_path: Path, session: aiohttp.ClientSession, stream: bool) -> None:
    """1. The upstream answers 200 text/html (a misconfigured url reaching a web server).
    2. The client gets it as it is (status, content type, bytes). 3. Row: 200/ok, no completion tokens."""
    with matrix_row(f"text/html 200 from upstream ({'stream' if stream else 'whole'})",
                    "relayed as is; row 200/ok c0") as m:
        async with RawUpstream("html") as up, run_llmd(config(tmp_path, [up.url])) as llmd:
            s = await call(session, llmd.url, stream=stream)
            (row,), m.rows_lost = await rows_of(llmd, [s])
            m.seen = f"{brief(s)}; {row_brief(row)}"
            assert s.status == 200 and s.headers["content-type"].startswith("text/html") and s.body == HTML, s
            assert (row["status"], row["outcome"], row["completion_tokens"]) == (200, "ok", 0)
            await assert_no_leaks(llmd.services)


# --- supervised replica dies or freezes mid-stream -------------------------------------------------


def supervised_config(tmp_path: Path, slots: int = 2) -> Path:
    """Model ``s``: one llama-server replica that llmd supervises, whose command is the fake
    llama-server; health every 0.2 s, 2 failures make it unhealthy, short backoff."""
    launchers = {"llama-server": {
        "command": [sys.executable, str(FAKE_LLAMA)], "start_timeout_s": 15, "stop_timeout_s": 1,
        "health_interval_s": 0.2, "health_failures": 2, "restart_delay_s": 0.3, "restart_max_delay_s": 2,
    }}  # fmt: skip
    model = {"backend": "llama-server", "model": str(tmp_path / "fake.gguf"),
             "args": ["-np", str(slots), "--load-delay-s", "0.1"]}
    return write_config(tmp_path / "config.yaml", base_config(tmp_path, {"s": model}, launchers=launchers))


class StateLog:
    """Every state a replica passes through, sampled every 10 ms (BACKOFF lasts 0.3 s here)."""

    def __init__(self, replica: Any) -> None:
        self.replica = replica
        self.states: list[str] = [replica.state.value]
        self._task = asyncio.create_task(self._sample())

    def _take(self) -> None:
        if self.replica.state.value != self.states[-1]:
            self.states.append(self.replica.state.value)

    async def _sample(self) -> None:
        while True:
            self._take()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._take()  # the state the caller waited for, if it came after the last sample


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
async def test_supervised_replica_dies_mid_stream(tmp_path: Path, session: aiohttp.ClientSession,
                                                   sig: signal.Signals) -> None:
    """1. llmd supervises one fake llama-server; a stream of 60 tokens, 100 ms apart, starts.
    2. After 3 tokens reached the client the replica gets SIGKILL, or SIGSTOP (it freezes: its
       health checks time out, llmd finds it unhealthy and kills it, SIGKILL after stop_timeout_s).
    3. The client has its tokens, then an in-band error event (upstream_unreachable) and the end.
    4. The replica goes BACKOFF, then READY again as a new process, and serves the next request.
    5. Rows: the broken stream 200/upstream_error with completion_tokens == the chunks the client
       got; the next request 200/ok with the upstream's usage. Nothing leaked."""
    name = sig.name
    with matrix_row(f"replica {name} mid-stream (supervised)",
                    "tokens + error event; BACKOFF -> READY; row 200/upstream_error c=chunks") as m:
        async with run_llmd(supervised_config(tmp_path)) as llmd:
            (replica,) = llmd.services.supervisor.replicas("s")
            await wait_for(lambda: replica.state.value == "ready", 20)
            old_pid = replica.pid
            assert old_pid is not None
            states = StateLog(replica)
            sent: list[float] = []

            def strike(seen: Seen) -> None:
                if seen.tokens >= 3 and not sent:
                    os.kill(old_pid, sig)
                    sent.append(time.monotonic())

            try:
                s = await call(session, llmd.url, model="s", stream=True, on_event=strike,
                               body={"max_tokens": 60, "fake": {"token_delay_ms": 100}})
                await wait_for(lambda: replica.state.value == "ready" and replica.pid != old_pid, 20)
            finally:
                await states.stop()
                if sig == signal.SIGSTOP:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(old_pid, signal.SIGCONT)
            after = await call(session, llmd.url, model="s")
            rows, m.rows_lost = await rows_of(llmd, [s, after])
            m.seen = f"{brief(s)}; states {'>'.join(states.states)}; next {after.status}; " + \
                "; ".join(row_brief(r) for r in rows)
            assert s.status == 200 and s.exception is None and s.tokens >= 3 and not s.done, s
            assert [e["code"] for e in s.errors] == ["upstream_unreachable"], s.events
            assert "backoff" in states.states and states.states[-1] == "ready", states.states
            assert replica.restarts >= 1
            assert after.status == 200, after
            assert m.rows_lost == 0
            broken, ok = rows
            assert (broken["status"], broken["outcome"]) == (200, "upstream_error")
            assert broken["completion_tokens"] == s.tokens
            assert broken["token_method"].startswith("stream_chunks+")
            assert (ok["status"], ok["outcome"], ok["token_method"]) == (200, "ok", "upstream")
            await assert_no_leaks(llmd.services)


async def test_replica_killed_with_requests_queued(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """1. llmd supervises one fake llama-server with one slot; a long stream holds the slot and two
    more requests wait in the model's queue (admission depth 2).
    2. The replica gets SIGKILL. The stream ends with an error event.
    3. The queued requests were never sent anywhere: they must wait for the restarted replica
       (within queue_timeout_s, 5 s) and be answered 200.
    4. Rows: the stream 200/upstream_error, the two others 200/ok. Nothing leaked."""
    with matrix_row("replica SIGKILL with 2 requests queued (one replica)",
                    "stream: error event; queued ones wait for the restart: 200") as m:
        async with run_llmd(supervised_config(tmp_path, slots=1)) as llmd:
            (replica,) = llmd.services.supervisor.replicas("s")
            await wait_for(lambda: replica.state.value == "ready", 20)
            pool = llmd.services.pools["s"]
            two_tokens = asyncio.Event()

            def note(seen: Seen) -> None:
                if seen.tokens >= 2:
                    two_tokens.set()

            stream = asyncio.create_task(call(session, llmd.url, model="s", stream=True, on_event=note,
                                              body={"max_tokens": 60, "fake": {"token_delay_ms": 100}}))
            await two_tokens.wait()
            queued = [asyncio.create_task(call(session, llmd.url, model="s")) for _ in range(2)]
            await wait_for(lambda: pool.admission.depth == 2, 10)
            assert replica.pid is not None
            os.kill(replica.pid, signal.SIGKILL)
            s = await stream
            waited = await asyncio.gather(*queued)
            rows, m.rows_lost = await rows_of(llmd, [s, *waited])
            m.seen = f"{brief(s)}; queued: {', '.join(brief(w) for w in waited)}"
            await assert_no_leaks(llmd.services)
            assert [e["code"] for e in s.errors] == ["upstream_unreachable"], s.events
            assert [w.status for w in waited] == [200, 200], [brief(w) for w in waited]
            assert [(r["status"], r["outcome"]) for r in rows] == [(200, "upstream_error"), (200, "ok"), (200, "ok")]


# --- the ledger's disk -------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "512k") -> Iterator[Path]:
    """A tiny tmpfs at ``path`` (a disk that can really fill up or go read-only); needs root."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full (ENOSPC); returns it (delete it to heal)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # unbuffered: nothing left to flush at close
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


async def truncate_wal(db_path: Path) -> None:
    """Checkpoint the ledger's WAL into the database and truncate it to 0 bytes: the next
    write must grow the WAL, so a full disk fails it (instead of reusing old WAL frames).
    Retried while a reader or writer holds the WAL (busy)."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.closing(sqlite3.connect(db_path)) as db:
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy == 0 and os.path.getsize(f"{db_path}-wal") == 0:
            return
        assert time.monotonic() < deadline, "the WAL could not be truncated"
        await asyncio.sleep(0.05)


async def remount(path: Path, mode: str, timeout_s: float = 10.0) -> None:
    """``mount -o remount,ro|rw``: retried while the ledger has its file open (EBUSY); after a
    failed write it closes its connection and waits (backoff) before it opens a new one."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, done.stderr
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("fault", ["full", "read_only"])
async def test_ledger_disk_fails_and_heals(tmp_path: Path, session: aiohttp.ClientSession, fault: str) -> None:
    """1. The ledger lives on a 512 KiB tmpfs; one request writes its row (the file exists).
    2. The disk fills up (the WAL truncated first, so the next write must grow it); for
       read_only, once a write failed (the ledger closed its file) the tmpfs is remounted read-only.
    3. 20 requests (streams and whole answers) are all answered 200 while every write fails:
       the rows wait in memory (pending_rows), none is dropped.
    4. The disk heals (read-write again, the filler deleted): every row reaches the file."""
    with matrix_row(f"ledger disk {'full' if fault == 'full' else 'read-only'}",
                    "requests answered; rows kept in memory, written once healed; 0 dropped") as m:
        async with RawUpstream("ok") as up:
            with tmpfs(tmp_path / "disk") as disk:
                db = disk / "usage.sqlite3"
                path = config(tmp_path, [up.url], usage={"path": str(db)})
                async with run_llmd(path) as llmd:
                    ledger = llmd.services.ledger
                    errors: list[BaseException] = []
                    ledger.on_flush_error = errors.append
                    first = await call(session, llmd.url)
                    assert first.status == 200 and await ledger.flush()
                    await truncate_wal(db)
                    filler = fill(disk)
                    seen = [await call(session, llmd.url, stream=i % 2 == 1) for i in range(10)]
                    await wait_for(lambda: ledger.write_errors >= 1, 10)
                    if fault == "read_only":
                        await remount(disk, "ro")
                        n = ledger.write_errors
                        await wait_for(lambda: ledger.write_errors > n, 10)  # a write on the read-only disk
                    seen += [await call(session, llmd.url, stream=i % 2 == 1) for i in range(10)]
                    await wait_for(lambda: ledger.write_errors >= 2, 10)
                    pending, healthy = ledger.pending_rows, ledger.healthy
                    if fault == "read_only":
                        await remount(disk, "rw")
                    filler.unlink()
                    rows, m.rows_lost = await rows_of(llmd, seen)
                    m.seen = (f"{sum(s.status == 200 for s in seen)}/20 answered 200; {pending} rows pending, "
                              f"{ledger.write_errors} failed writes ({type(errors[-1]).__name__}: "
                              f"{str(errors[-1]).replace(str(db), 'usage.sqlite3')}); "
                              f"healed: {len(rows)} rows written, {ledger.dropped_rows} dropped")
                    assert [s.status for s in seen] == [200] * 20
                    assert all(s.done for s in seen[1::2])
                    assert not healthy and pending == 20, (healthy, pending)
                    assert m.rows_lost == 0 and ledger.dropped_rows == 0 and ledger.pending_rows == 0
                    assert all((r["status"], r["outcome"]) == (200, "ok") for r in rows)
                    await assert_no_leaks(llmd.services)


async def test_ledger_over_max_pending_rows_drops_the_oldest(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """1. usage.max_pending_rows: 5; the ledger's disk fills up. 2. 15 requests, all answered 200.
    3. Only the 5 newest rows are kept; 10 are dropped and counted (dropped_rows, /admin/status).
    4. The disk heals: those 5 rows are written."""
    with matrix_row("ledger disk full, over max_pending_rows=5",
                    "requests answered; oldest rows dropped and counted; newest written") as m:
        async with RawUpstream("ok") as up:
            with tmpfs(tmp_path / "disk") as disk:
                db = disk / "usage.sqlite3"
                path = config(tmp_path, [up.url], usage={"path": str(db), "max_pending_rows": 5})
                async with run_llmd(path) as llmd:
                    ledger = llmd.services.ledger
                    assert (await call(session, llmd.url)).status == 200 and await ledger.flush()
                    await truncate_wal(db)
                    filler = fill(disk)
                    seen = [await call(session, llmd.url) for _ in range(15)]
                    await wait_for(lambda: ledger.write_errors >= 1, 10)
                    async with session.get(llmd.url + "/admin/status") as resp:
                        usage = (await resp.json())["usage"]
                    filler.unlink()
                    rows, lost = await rows_of(llmd, seen, expect=5)
                    m.rows_lost = lost
                    m.seen = (f"{sum(s.status == 200 for s in seen)}/15 answered 200; /admin/status usage {usage}; "
                              f"healed: {len(rows)} written")
                    assert [s.status for s in seen] == [200] * 15
                    assert usage == {"pending_rows": 5, "dropped_rows": 10}
                    assert lost == 10 and ledger.dropped_rows == 10
                    assert set(read_rows(db, [s.request_id for s in seen])) == {s.request_id for s in seen[10:]}
                    await assert_no_leaks(llmd.services)


async def test_ledger_file_deleted(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """1. A request writes its row. 2. The ledger's file (and its -wal, -shm) is deleted while
    llmd runs. 3. 10 requests are answered 200. 4. The ledger notices, creates a fresh file, and
    every one of the 10 rows is in it (the first row went with the deleted file)."""
    with matrix_row("ledger file deleted while running", "requests answered; fresh file with every new row") as m:
        async with RawUpstream("ok") as up, run_llmd(config(tmp_path, [up.url])) as llmd:
            ledger = llmd.services.ledger
            db = Path(ledger.path)
            assert (await call(session, llmd.url)).status == 200 and await ledger.flush()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink()
            seen = [await call(session, llmd.url, stream=i % 2 == 1) for i in range(10)]
            rows, m.rows_lost = await rows_of(llmd, seen)
            m.seen = f"{sum(s.status == 200 for s in seen)}/10 answered 200; {len(rows)} rows in the new file"
            assert [s.status for s in seen] == [200] * 10
            assert m.rows_lost == 0 and ledger.dropped_rows == 0 and db.exists()
            await assert_no_leaks(llmd.services)


# --- SIGHUP storm ------------------------------------------------------------------------------------

STORM_KEY = "sk-fault-storm-0123456789abcdef0123456789"
STORM_ADMIN = "sk-fault-storm-admin-0123456789abcdef01234"
STORM_REQUESTS, STORM_CONCURRENCY, STORM_RELOADS = 300, 8, 10


def write_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Replace the config in one rename, as config management does: a reload never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write_config(tmp, doc)
    os.replace(tmp, path)


def storm_config(tmp_path: Path, fake_url: str, variant: int) -> dict[str, Any]:
    """Two valid configs that differ in an alias and a key: variant 0 serves alias-a, variant 1
    alias-b and has an extra key. The load's key and model are in both."""
    keys = [{"id": "load", "sha256": hashlib.sha256(STORM_KEY.encode()).hexdigest()},
            {"id": "ops", "admin": True, "sha256": hashlib.sha256(STORM_ADMIN.encode()).hexdigest()}]
    if variant:
        keys.append({"id": "extra", "sha256": hashlib.sha256(b"sk-extra-key-for-variant-b").hexdigest()})
    model = {"backend": "openai", "urls": [fake_url + "/v1"], "slots": 8, "aliases": [f"alias-{'ab'[variant]}"]}
    return base_config(tmp_path, {"m": model}, keys=keys)


async def test_sighup_storm_under_load(tmp_path: Path, fake: FakeProc) -> None:
    """1. `llmd serve` (a real process) relays model m to the fake llama-server.
    2. 300 requests run at concurrency 8, streams and whole answers in turn; meanwhile the config
       is replaced 10 times (alternating two valid files: another alias, another key) and each
       time llmd gets SIGHUP, the next one once the previous reload is logged.
    3. Every request succeeds (200, streams end with [DONE], no error event): 0 failed.
    4. The last config is in force (alias-a answers, alias-b is unknown).
    5. Nothing is left in flight or queued (/admin/status).
    6. SIGTERM: llmd exits 0 and the ledger has exactly one ok row per request, with the
       fake's usage (completion_tokens == max_tokens)."""
    fault = f"SIGHUP storm: {STORM_RELOADS} reloads under {STORM_REQUESTS} requests at c={STORM_CONCURRENCY}"
    with matrix_row(fault, "0 failed; rows == requests") as m:
        path = tmp_path / "config.yaml"
        write_config(path, storm_config(tmp_path, fake.url, 0))
        async with llmd_process(path) as llmd, aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {STORM_KEY}"}
            results: list[tuple[Seen, int]] = []
            storm_done = asyncio.Event()
            counter = iter(range(10**6))

            async def worker() -> None:
                # Keep going until both the planned load is done and the storm is over, so every
                # reload lands while requests are in flight.
                while True:
                    i = next(counter)
                    if i >= STORM_REQUESTS and storm_done.is_set():
                        return
                    n = i % 5 + 1
                    msgs = [{"role": "user", "content": "w " * (i % 7 + 1)}]
                    s = await call(session, llmd.url, stream=i % 2 == 1, headers=headers,
                                   body={"max_tokens": n, "messages": msgs})
                    results.append((s, n))

            async def storm() -> None:
                for k in range(STORM_RELOADS):
                    while len(results) < (k + 1) * STORM_REQUESTS // (STORM_RELOADS + 2):
                        await asyncio.sleep(0.01)  # spread the reloads over the load
                    write_atomic(path, storm_config(tmp_path, fake.url, (k + 1) % 2))
                    os.kill(llmd.pid, signal.SIGHUP)
                    await wait_for(lambda k=k: sum(d.get("msg") == "reloaded" for d in llmd.logs()) >= k + 1, 15)
                storm_done.set()

            await asyncio.gather(storm(), *(worker() for _ in range(STORM_CONCURRENCY)))
            failed = [s for s, _ in results if s.status != 200 or s.errors or s.exception
                      or (s.headers.get("content-type", "").startswith("text/event-stream") and not s.done)]
            alias_a = await call(session, llmd.url, model="alias-a", headers=headers)
            alias_b = await call(session, llmd.url, model="alias-b", headers=headers)
            reloads = sum(d.get("msg") == "reloaded" for d in llmd.logs())
            async with session.get(llmd.url + "/admin/status",
                                   headers={"Authorization": f"Bearer {STORM_ADMIN}"}) as resp:
                status = await resp.json()
            llmd.proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(llmd.proc.wait(), 30)
        seen = [s for s, _ in results]
        rows = read_rows(tmp_path / "usage.sqlite3", [s.request_id for s in seen])
        m.rows_lost = len(seen) - len(rows)
        leaked = {"in_flight": sum(r["in_flight"] for r in status["replicas"]),
                  "queued": sum(status["queues"].values())}
        m.seen = (f"{len(seen)} requests, {len(failed)} failed, {reloads} reloads; "
                  f"{len(rows)} rows; afterwards {leaked}; exit {code}")
        assert not failed, [brief(s) for s in failed[:5]]
        assert reloads == STORM_RELOADS and code == 0
        assert leaked == {"in_flight": 0, "queued": 0}
        assert (alias_a.status, alias_b.status) == (200, 404)  # variant 0 is the last one loaded
        assert m.rows_lost == 0
        for s, n in results:
            r = rows[s.request_id]
            assert (r["status"], r["outcome"], r["completion_tokens"]) == (200, "ok", n), r


# --- hostile clients straight at llmd ----------------------------------------------------------------

GOOD_KEY = "sk-fault-good-0123456789abcdef0123456789ab"


async def raw_http(port: int, data: bytes, timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as it is on a fresh connection, reading at the same time (a server that
    refuses a huge request answers and closes before it is all sent); (status, headers, body)
    of the answer, status 0 if the connection closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for i in range(0, len(data), 65536):
                writer.write(data[i:i + 65536])
                await writer.drain()

    sender = asyncio.create_task(send())
    raw = b""
    try:
        async with asyncio.timeout(timeout_s):
            while piece := await reader.read(65536):
                raw += piece
    except ConnectionError:
        pass
    finally:
        sender.cancel()
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/"):
        return 0, {}, raw
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


def keyed_config(tmp_path: Path, url: str) -> Path:
    doc = base_config(tmp_path, {"m": {"backend": "openai", "urls": [url], "slots": 4}},
                      keys=[{"id": "good", "sha256": hashlib.sha256(GOOD_KEY.encode()).hexdigest()}])
    return write_config(tmp_path / "config.yaml", doc)


FLOODS = {
    "5000 headers": b"".join(b"X-Flood-%d: v\r\n" % i for i in range(5000)),
    "one 1 MB header": b"X-Big: " + b"a" * 1_000_000 + b"\r\n",
}


@pytest.mark.parametrize("flood", list(FLOODS))
async def test_header_flood_straight_at_llmd(tmp_path: Path, session: aiohttp.ClientSession, flood: str) -> None:
    """1. A client sends llmd (no nginx in front) a request with thousands of headers, or one
    header of 1 MB. 2. It gets a 4xx and its connection ends. 3. llmd still answers a normal
    request; no row is written for a request that never got parsed."""
    with matrix_row(f"header flood straight at llmd: {flood}", "4xx, no crash, next request 200") as m:
        async with RawUpstream("ok") as up, run_llmd(keyed_config(tmp_path, up.url)) as llmd:
            body = b'{"model": "m", "messages": []}'
            request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: llmd\r\nContent-Type: application/json\r\n"
                       + FLOODS[flood] + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            status, _, answer = await raw_http(llmd.daemon.port, request)
            after = await call(session, llmd.url, headers={"Authorization": f"Bearer {GOOD_KEY}"})
            rows, lost = await rows_of(llmd, [after])
            m.rows_lost = lost
            m.seen = f"{status} {answer[:40].decode(errors='replace')!r}; next request {after.status}"
            assert 400 <= status < 500, (status, answer[:200])
            assert after.status == 200 and len(rows) == 1
            assert await all_rows(llmd) == 1  # the flood never became a request
            assert not up.requests[:-1]  # only the normal request reached the upstream
            await assert_no_leaks(llmd.services)


AUTH_VARIANTS = {
    "unicode key": b"Authorization: Bearer sk-\xc3\xbc\xc3\xb1\xc3\xaf\r\n",
    "non-UTF-8 bytes": b"Authorization: Bearer sk-\xff\xfe\x80\r\n",
    "em space before the good key": b"Authorization: Bearer \xe2\x80\x83" + GOOD_KEY.encode() + b"\r\n",
    "no-break space after the good key": b"Authorization: Bearer " + GOOD_KEY.encode() + b"\xc2\xa0\r\n",
    "tab instead of space": b"Authorization: Bearer\t" + GOOD_KEY.encode() + b"\r\n",
    "space inside the key": b"Authorization: Bearer " + f"{GOOD_KEY[:10]} {GOOD_KEY[10:]}".encode() + b"\r\n",
    "empty bearer": b"Authorization: Bearer \r\n",
    "scheme only": b"Authorization: Bearer\r\n",
    "unicode scheme": b"Authorization: B\xc3\xa9arer " + GOOD_KEY.encode() + b"\r\n",
    "X-API-Key non-UTF-8": b"X-API-Key: \xff\xfe\r\n",
    "X-API-Key unicode": b"X-API-Key: \xe2\x80\x83\xe2\x80\x83\r\n",
}


async def test_odd_authorization_headers_are_401(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """1. llmd with one key. 2. Requests whose Authorization / X-API-Key hold unicode, bytes that
    are not UTF-8, Unicode spaces around the good key, a tab, an empty credential.
    3. Each is 401 invalid_api_key in the OpenAI envelope (never 500, never accepted); the good
    key with plain spaces around it still works."""
    with matrix_row(f"Authorization with unicode/whitespace/non-UTF-8 ({len(AUTH_VARIANTS)} variants)",
                    "401 invalid_api_key envelope each, no 500") as m:
        async with RawUpstream("ok") as up, run_llmd(keyed_config(tmp_path, up.url)) as llmd:
            body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
            got: dict[str, tuple[int, Any]] = {}
            for label, header in AUTH_VARIANTS.items():
                status, headers, answer = await raw_http(llmd.daemon.port, (
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: llmd\r\nConnection: close\r\n"
                    b"Content-Type: application/json\r\n" + header + b"Content-Length: %d\r\n\r\n" % len(body) + body))
                code = json.loads(answer)["error"]["code"] if headers.get("content-type", "").startswith(
                    "application/json") else answer[:40]
                got[label] = (status, code)
            plain = await call(session, llmd.url, headers={"Authorization": f"Bearer   {GOOD_KEY}  "})
            m.seen = ", ".join(sorted({f"{s} {c}" for s, c in got.values()})) + f"; padded good key {plain.status}"
            bad = {k: v for k, v in got.items() if v != (401, "invalid_api_key")}
            assert not bad, bad
            assert plain.status == 200 and len(up.requests) == 1
            assert await all_rows(llmd) == 1  # refused before the limits: no row (DESIGN "Usage ledger")
            await assert_no_leaks(llmd.services)


# --- hostile clients through the shipped nginx site ----------------------------------------------------

# The site's client_header_timeout (10s) is shortened in the test's rendered copy, so that the
# module stays fast; the directive, its place in the site and nginx's behaviour are what is tested.
SLOW_HEADER_TIMEOUT_S = 2


@contextlib.asynccontextmanager
async def nginx_in_front(tmp_path: Path, llmd_port: int) -> AsyncIterator[tuple[int, ssl.SSLContext, Rendered]]:
    """nginx with nginx/llm-api.conf (rendered for the test, client_header_timeout 2 s) proxying
    to llmd; yields (https port, a TLS context trusting its throw-away certificate, the render)."""
    https_port = free_port()
    rendered = render(tmp_path / "nginx", https_port=https_port, http_port=free_port(), upstream_port=llmd_port)
    site = rendered.prefix / "llm-api.conf"
    site.write_text(substitute(site.read_text(), r"^(\s*client_header_timeout)\s+\S+;",
                               rf"\1 {SLOW_HEADER_TIMEOUT_S}s;", 1))
    async with run_nginx(rendered, https_port):
        yield https_port, ssl.create_default_context(cafile=str(rendered.cert)), rendered


async def tls_connect(port: int, tls: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="llm.internal")


async def timed_normal_request(session: aiohttp.ClientSession, port: int, tls: ssl.SSLContext) -> tuple[int, float]:
    """(status, seconds) of one ordinary chat through nginx."""
    t0 = time.monotonic()
    async with session.post(f"https://127.0.0.1:{port}/v1/chat/completions", ssl=tls,
                            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                            timeout=aiohttp.ClientTimeout(total=30)) as resp:
        await resp.read()
        return resp.status, time.monotonic() - t0


async def test_slowloris_through_nginx(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """1. nginx (the shipped site, client_header_timeout 2 s for the test) in front of llmd.
    2. A client sends a request's headers one byte per 100 ms over TLS.
    3. While it does, an ordinary request through nginx answers 200 quickly.
    4. nginx closes the slow connection once client_header_timeout has passed (no answer; its
       access log says 408); llmd never saw that request (no row, nothing in flight)."""
    with matrix_row("slowloris via nginx (headers 1 B / 100 ms)",
                    "nginx closes it at client_header_timeout (408); llmd unaffected") as m:
        async with RawUpstream("ok") as up, run_llmd(config(tmp_path, [up.url])) as llmd, \
                nginx_in_front(tmp_path, llmd.daemon.port) as (port, tls, rendered):
            reader, writer = await tls_connect(port, tls)
            slow = b"POST /v1/chat/completions HTTP/1.1\r\nHost: llm.internal\r\nContent-Type: application/json\r\n" \
                + b"X-Padding: " + b"x" * 200 + b"\r\n\r\n"
            t0 = time.monotonic()
            closed_after: float | None = None
            normal: tuple[int, float] | None = None
            sent = 0
            try:
                for i, byte in enumerate(slow):
                    writer.write(bytes([byte]))
                    await writer.drain()
                    sent += 1
                    if i == 5:
                        normal = await timed_normal_request(session, port, tls)
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(reader.read(1024), 0.1) == b"":
                            closed_after = time.monotonic() - t0
                            break
            except ConnectionError:
                closed_after = time.monotonic() - t0
            finally:
                writer.close()
            await asyncio.sleep(0.2)  # the access log line is written when nginx closes
            access = (rendered.prefix / "logs" / "llm-api.access.log").read_text()
            ordinary = normal and f"{normal[0]} in {normal[1]:.2f}s"
            m.seen = (f"closed after {closed_after and round(closed_after, 1)}s ({sent} of {len(slow)} bytes sent); "
                      f"access log 408: {' 408 ' in access}; normal request {ordinary}; "
                      f"llmd saw {len(up.requests)} upstream request(s)")
            assert closed_after is not None and SLOW_HEADER_TIMEOUT_S - 0.5 <= closed_after < 15, closed_after
            assert sent < len(slow)
            assert ' 408 ' in access, access
            assert normal is not None and normal[0] == 200 and normal[1] < 5, normal
            assert len(up.requests) == 1  # the normal one only
            assert await all_rows(llmd) == 1  # the normal request's
            await assert_no_leaks(llmd.services)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_100_mb_body_through_nginx(tmp_path: Path, session: aiohttp.ClientSession, framing: str) -> None:
    """1. nginx (the shipped site) in front of llmd. 2. A client uploads a 100 MB body, with a
    Content-Length that says so, or chunked without one. 3. nginx answers 413 in the OpenAI
    envelope (code request_too_large) at once (Content-Length) or after 8 MiB (chunked) and
    llmd sees nothing of it. 4. An ordinary request answers 200 meanwhile."""
    with matrix_row(f"100 MB body via nginx ({framing})", "nginx 413 request_too_large; llmd unaffected") as m:
        async with RawUpstream("ok") as up, run_llmd(config(tmp_path, [up.url])) as llmd, \
                nginx_in_front(tmp_path, llmd.daemon.port) as (port, tls, _):
            reader, writer = await tls_connect(port, tls)
            size = 100 * 1024 * 1024
            framing_header = f"Content-Length: {size}" if framing == "content-length" else "Transfer-Encoding: chunked"
            writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: llm.internal\r\n"
                         f"Content-Type: application/json\r\n{framing_header}\r\n\r\n".encode())
            block = b'{"model": "m", "messages": [' + b" " * (1024 * 1024 - 28)

            async def upload() -> int:
                sent = 0
                with contextlib.suppress(ConnectionError):
                    while sent < size:
                        writer.write(block if framing == "content-length" else b"%x\r\n%s\r\n" % (len(block), block))
                        await writer.drain()
                        sent += len(block)
                return sent

            uploader = asyncio.create_task(upload())
            t0 = time.monotonic()
            answer = b""
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(30):
                    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                        piece = await reader.read(4096)
                        if not piece:
                            break
                        answer += piece
            elapsed = time.monotonic() - t0
            normal = await timed_normal_request(session, port, tls)
            uploader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await uploader
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0
            code = json.loads(body)["error"]["code"] if body.strip().startswith(b"{") else body[:40]
            m.seen = f"{status} {code} after {elapsed:.2f}s; normal request {normal[0]} in {normal[1]:.2f}s"
            assert status == 413, answer[:300]
            assert json.loads(body)["error"]["code"] == "request_too_large"
            assert normal[0] == 200 and normal[1] < 5, normal
            assert len(up.requests) == 1  # the normal one only
            assert await all_rows(llmd) == 1
            await assert_no_leaks(llmd.services)
