"""Exactness on the real llama-server: what the fakes cannot prove.

One `llmd serve` with one llama-server replica (Gemma 3 270M, one slot, CPU 0) for the module.
1. The premise of the `stream_options: null` defect: llama-server's JSON parser keeps the last
   duplicate key, so bytes inserted in front of a null are overridden (asked of it directly).
2. Through llmd that body still yields the upstream's usage, hidden from the client, and the
   ledger row equals what the same replica reports for the same prompt.
3. A stream the client abandons is billed the token chunks it received plus the prompt as the
   replica tokenizes it: the row's prompt_tokens equal the replica's own count.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import base_config
from tests.fakeproc import free_port
from tests.realllmd import LLAMA, MODEL, RealLlmd, call, real_llmd

pytestmark = pytest.mark.real

MESSAGES = [{"role": "user", "content": "Count from one to twenty, separated by commas."}]


def post(url: str, body: dict[str, Any] | bytes) -> bytes:
    status, _, raw = call(url, body)
    assert status == 200, raw
    return raw


def events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for ev in raw.decode().split("\n\n"):
        ev = ev.strip()
        if ev.startswith("data: ") and ev != "data: [DONE]":
            out.append(json.loads(ev[6:]))
    return out


@pytest.fixture(scope="module")
def llmd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealLlmd]:
    tmp = tmp_path_factory.mktemp("real-exact")
    doc = base_config(
        tmp,
        {"gemma": {"backend": "llama-server", "model": str(MODEL), "cpus": [[0]],
                   "args": ["-c", "1024", "-np", "1", "-t", "1"]}},
        server={"port": free_port(), "drain_seconds": 5},
        launchers={"llama-server": {"command": str(LLAMA), "start_timeout_s": 120, "health_interval_s": 0.5}},
        routing={"timeouts": {"connect_s": 2, "first_byte_s": 120, "total_s": 300}},
    )  # fmt: skip
    with real_llmd(tmp, doc) as srv:
        yield srv


def test_stream_options_null_is_billed_exactly_on_the_real_engine(llmd: RealLlmd) -> None:
    base = {"model": "gemma", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True}
    # 1. The premise, asked of the replica itself: a later null overrides an earlier object.
    inserted = b'{"stream_options":{"include_usage":true},' + json.dumps({**base, "stream_options": None}).encode()[1:]
    direct = events(post(llmd.replica() + "/v1/chat/completions", inserted))
    assert not any(e.get("usage") for e in direct), "llama-server kept the first duplicate key"
    # The replica's own usage for this prompt and answer, with include_usage asked properly.
    asked = events(
        post(llmd.replica() + "/v1/chat/completions", {**base, "stream_options": {"include_usage": True}})
    )
    usage = next(e["usage"] for e in asked if e.get("usage"))
    # 2. Through llmd: usage hidden from the client, exact in the ledger.
    before = llmd.settled_count()
    through = events(post(llmd.url + "/v1/chat/completions", {**base, "stream_options": None}))
    assert not any(e.get("usage") for e in through)
    row = llmd.row_after(before)
    assert row["stream"] == 1 and row["token_method"] == "upstream"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])


def test_an_abandoned_stream_is_billed_chunks_plus_the_replicas_prompt_count(llmd: RealLlmd) -> None:
    """The client reads three token chunks of a long answer and hangs up."""
    n0 = llmd.settled_count()
    one = json.loads(
        post(
            llmd.url + "/v1/chat/completions",
            {"model": "gemma", "messages": MESSAGES, "max_tokens": 1, "temperature": 0},
        )
    )
    prompt_tokens = one["usage"]["prompt_tokens"]
    llmd.row_after(n0)  # the ledger writes behind: wait for that row first
    before = n0 + 1
    body = json.dumps(
        {
            "model": "gemma",
            "messages": MESSAGES,
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,  # llama-server: never stop early, so the hang-up comes first
        }
    ).encode()
    req = urllib.request.Request(
        llmd.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    got = 0
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: {"):
                doc = json.loads(line[6:])
                if any((c.get("delta") or {}).get("content") for c in doc.get("choices", [])):
                    got += 1
                    if got == 3:
                        break
    row = llmd.row_after(before)
    assert row["outcome"] == "client_abort" and row["token_method"] == "stream_chunks+tokenize"
    assert row["prompt_tokens"] == prompt_tokens
    # What was generated before llmd noticed the hang-up: at least what the client read.
    assert got <= row["completion_tokens"] <= 200
