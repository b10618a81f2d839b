"""Upstream faults through llmd: a replica that dies, hangs or errs mid-stream, and a replica that
fails before the first byte (retried on another). The client must be told in-band, and the ledger
must bill exactly what the client received.

The billing rule for a stream cut short (no usage event arrived): completion_tokens = the
token-bearing chunks relayed, prompt_tokens = the replica's tokenization of the prompt
(llama-server: /apply-template + /tokenize). The replica here is the fake llama-server,
supervised by llmd, in several wire profiles (tests/_fake_common.py ``WIRE_PROFILES``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Llmd, base_config, run_llmd, wait_for, write_config
from tests.fakeproc import FAKE_LLAMA, FakeProc, free_port, start_fake
from tests.sse import Event, SseParser, is_token_chunk

# "one two three" as a chat prompt: <|im_start|> user one two three <|im_end|> newline
MESSAGES = [{"role": "user", "content": "one two three"}]
PROMPT_TOKENS = 7
WIRES = ["native", "openai", "chaos"]


@dataclass
class Seen:
    """What the client received from one streamed request."""

    status: int
    events: list[Event] = field(default_factory=list)

    @property
    def docs(self) -> list[Any]:
        return [e.json() for e in self.events if not e.done]

    @property
    def token_chunks(self) -> int:
        return sum(1 for d in self.docs if is_token_chunk(d))

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [d["error"] for d in self.docs if isinstance(d, dict) and "error" in d]


async def stream(llmd: Llmd, body: dict[str, Any], timeout_s: float = 30) -> Seen:
    """POST a streamed chat through llmd and read it to its end, by the SSE rules."""
    parser = SseParser()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s, s.post(
        llmd.url + "/v1/chat/completions", json={"model": "m", "stream": True, "messages": MESSAGES, **body}
    ) as r:
        seen = Seen(r.status)
        async for data in r.content.iter_any():
            seen.events += parser.feed(data)
    return seen


async def rows(llmd: Llmd, n: int) -> list[tuple]:
    """The ledger's rows once n are written and nothing settles in the background any more."""
    db = llmd.services.runtime.cfg.usage.path
    found: list[tuple] = []
    for _ in range(400):
        await llmd.services.ledger.flush()
        found = sqlite3.connect(db).execute(
            "select request_id, replica, outcome, prompt_tokens, completion_tokens from requests order by ts"
        ).fetchall()
        if len(found) >= n and not llmd.services._background:
            return found
        await asyncio.sleep(0.025)
    raise AssertionError(f"{len(found)} rows, expected {n}: {found}")


def supervised(tmp_path: Path, wire: str, **sections: Any) -> AbstractAsyncContextManager[Llmd]:
    """llmd supervising one fake llama-server replica of model "m" in the given wire profile."""
    doc = base_config(
        tmp_path,
        {"m": {"backend": "llama-server", "model": "fake.gguf", "args": ["-np", "2", "--fake-wire", wire]}},
        launchers={"llama-server": {"command": [sys.executable, str(FAKE_LLAMA)]}},
        **sections,
    )
    return run_llmd(write_config(tmp_path / "config.yaml", doc))


@pytest.fixture(params=WIRES)
async def llmd(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Llmd]:
    """llmd with a supervised fake llama-server per wire profile; routing.timeouts.total_s is 3 s
    so that a hung stream ends within the test."""
    timeouts = {"connect_s": 2, "first_byte_s": 10, "total_s": 3}
    async with supervised(tmp_path, request.param, routing={"timeouts": timeouts}) as d:
        await wait_for(lambda: d.services.readiness()[0])
        yield d


async def test_replica_dying_mid_stream_is_an_error_event_and_an_upstream_error_row(llmd: Llmd) -> None:
    """1. The replica resets the connection after 3 tokens (drop_after_tokens, as kill -9 does).
    2. The client's stream ends with an in-band error event (no [DONE], never a silently short
    stream). 3. The row: outcome upstream_error, completion_tokens == token chunks the client
    received, prompt_tokens == the replica's tokenization."""
    seen = await stream(llmd, {"max_tokens": 20, "fake": {"drop_after_tokens": 3}})
    assert seen.status == 200
    assert seen.errors and seen.errors[-1]["code"] == "upstream_unreachable", seen.docs
    assert not any(e.done for e in seen.events)
    assert seen.token_chunks <= 3
    ((_, _, outcome, prompt, completion),) = await rows(llmd, 1)
    assert (outcome, prompt, completion) == ("upstream_error", PROMPT_TOKENS, seen.token_chunks)


async def test_hang_after_tokens_ends_in_an_in_band_timeout_and_a_timeout_row(llmd: Llmd) -> None:
    """1. The replica sends 2 tokens, then nothing (hang_after_tokens); routing.timeouts.total_s
    is 3 s. 2. The client gets the 2 tokens, then an in-band upstream_timeout error event.
    3. The row: outcome timeout, the 2 relayed tokens, the replica's prompt tokenization."""
    seen = await stream(llmd, {"max_tokens": 20, "fake": {"hang_after_tokens": 2}})
    assert seen.status == 200
    assert seen.token_chunks == 2
    assert [e["code"] for e in seen.errors] == ["upstream_timeout"], seen.docs
    ((_, _, outcome, prompt, completion),) = await rows(llmd, 1)
    assert (outcome, prompt, completion) == ("timeout", PROMPT_TOKENS, 2)


async def test_upstream_error_event_mid_stream_is_relayed_and_billed(llmd: Llmd) -> None:
    """1. The replica sends 2 tokens, then its own SSE error event, and ends the stream
    (error_after_tokens, as llama-server does when decoding fails). 2. The client gets both
    tokens and that error event. 3. The row: outcome upstream_error (the answer did not
    complete), the 2 tokens relayed, the replica's prompt tokenization."""
    seen = await stream(llmd, {"max_tokens": 20, "fake": {"error_after_tokens": 2, "message": "decode failed"}})
    assert seen.status == 200
    assert seen.token_chunks == 2
    assert [e["message"] for e in seen.errors] == ["decode failed"], seen.docs
    ((_, _, outcome, prompt, completion),) = await rows(llmd, 1)
    assert (outcome, prompt, completion) == ("upstream_error", PROMPT_TOKENS, 2)


async def test_complete_stream_is_billed_exactly_whatever_the_wire(llmd: Llmd) -> None:
    """The control case of the tests above: a stream that runs to its end (5 tokens) is billed
    the upstream's usage, which equals what the client received."""
    seen = await stream(llmd, {"max_tokens": 5})
    assert seen.status == 200 and seen.token_chunks == 5 and not seen.errors and seen.events[-1].done
    ((_, _, outcome, prompt, completion),) = await rows(llmd, 1)
    assert (outcome, prompt, completion) == ("ok", PROMPT_TOKENS, 5)


async def test_client_abort_bills_exactly_the_chunks_relayed(llmd: Llmd) -> None:
    """1. The replica sends its role chunk and 1 token, then hangs, so llmd can have relayed
    exactly one token when 2. the client, having read it, hangs up. 3. The row: client_abort,
    completion_tokens 1 (the role announcement is not a token, whatever its framing: OpenAI's
    carries "refusal":null), prompt_tokens the replica's tokenization."""
    parser = SseParser()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s, s.post(
        llmd.url + "/v1/chat/completions",
        json={"model": "m", "stream": True, "messages": MESSAGES, "max_tokens": 20,
              "fake": {"hang_after_tokens": 1}},
    ) as r:
        async for data in r.content.iter_any():
            if any(is_token_chunk(e.json()) for e in parser.feed(data) if not e.done):
                break
    ((_, _, outcome, prompt, completion),) = await rows(llmd, 1)
    assert (outcome, prompt, completion) == ("client_abort", PROMPT_TOKENS, 1)


async def _retries_total(llmd: Llmd) -> float:
    async with aiohttp.ClientSession() as s, s.get(llmd.url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llmd_retries_total{") and 'model="m"' in line)


@pytest.mark.parametrize("failure", ["reset", "refused"])
@pytest.mark.parametrize("stream_it", [False, True], ids=["whole", "stream"])
async def test_failure_before_the_first_byte_is_retried_on_another_replica(
    tmp_path: Path, failure: str, stream_it: bool
) -> None:
    """1. Two replicas of "m": one resets every connection before its headers (reset) or
    refuses connections (refused), the other answers. Round-robin, so requests meet the bad one
    first in turn. 2. Four requests: every client gets 200 with the whole answer. 3. Each
    request has exactly ONE ledger row, outcome ok, on the good replica; llmd_retries_total
    counts one retry per request that met the bad replica first."""
    good = await start_fake(FAKE_LLAMA, "-np", "4")
    bad: FakeProc | None = None
    try:
        if failure == "reset":
            bad = await start_fake(FAKE_LLAMA, "-np", "4", "--fake-controls", '{"drop": true}')
            bad_url = bad.url
        else:
            bad_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        model = {"backend": "openai", "urls": [good.url + "/v1", bad_url + "/v1"], "slots": 4}
        doc = base_config(tmp_path, {"m": model}, routing={"strategy": "round-robin"})
        async with run_llmd(write_config(tmp_path / "config.yaml", doc)) as d:
            ids = [f"retry-{failure}-{stream_it}-{i}" for i in range(4)]
            async with aiohttp.ClientSession() as s:
                for rid in ids:
                    body = {"model": "m", "messages": MESSAGES, "max_tokens": 3, "stream": stream_it}
                    async with s.post(d.url + "/v1/chat/completions", json=body, headers={"X-Request-ID": rid}) as r:
                        raw = await r.read()
                        assert r.status == 200, raw
                        if stream_it:
                            docs = [e.json() for e in SseParser().feed(raw) if not e.done]
                            assert sum(1 for doc in docs if is_token_chunk(doc)) == 3, docs
                        else:
                            assert b"t0 t1 t2" in raw, raw
            found = await rows(d, 4)
            retries = await _retries_total(d)
        good_requests = (await good.stats())["requests"]
        bad_requests = (await bad.stats())["requests"] if bad else None
    finally:
        await good.stop()
        if bad is not None:
            await bad.stop()
    assert [r[0] for r in found] == ids  # one row per request, none for the failed attempt
    # a remote url cannot tokenize, but the upstream's usage arrived: exact tokens
    assert {(r[1], r[2], r[3], r[4]) for r in found} == {("m/0", "ok", PROMPT_TOKENS, 3)}
    assert good_requests == 4
    assert retries >= 1  # round-robin sent at least one request to the bad replica first
    if bad_requests is not None:
        assert retries == bad_requests  # every attempt on the bad replica was retried once
