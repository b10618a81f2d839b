"""Server-side tools with the real llama-server (--jinja, its default) and Gemma 3 270M.

Gemma 3 270M with the pinned llama-server does not emit a tool call, not even with
``tool_choice: "required"`` (its template has no tool syntax: the answer is text, see the
README). So the test holds either way: when round 1 calls ``time.now``, llmd runs it and round 2
(the last of ``max_rounds: 2``, sent with ``tool_choice: "none"``) answers in text, with one row
per round and their usage summed; when it answers text at once, llmd relays that answer as it
is, one round, one row, its usage.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import base_config, run_llmd, wait_for, write_config

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "bin" / "llama-server"
MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


def rows(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM requests ORDER BY id")]
    finally:
        con.close()


async def test_real_model_runs_a_server_tool(tmp_path: Path) -> None:
    assert LLAMA.exists() and MODEL.exists(), "run `make setup` (packaging/setup.sh) first"
    doc = base_config(
        tmp_path,
        {"gemma": {"backend": "llama-server", "model": str(MODEL), "args": ["-c", "2048", "-np", "1"]}},
        launchers={"llama-server": {"command": str(LLAMA), "start_timeout_s": 120, "health_interval_s": 0.5}},
        routing={"timeouts": {"connect_s": 2, "first_byte_s": 120, "total_s": 300}},
        tools={"time.now": {"builtin": "time.now"}},
        tool_loop={"max_rounds": 2},
    )
    async with run_llmd(write_config(tmp_path / "config.yaml", doc)) as llmd:
        await wait_for(lambda: any(r.state.value == "ready" for r in llmd.services.supervisor.replicas("gemma")), 120)
        body = {
            "model": "gemma",
            "messages": [{"role": "user", "content": "What time is it now? Use the tool."}],
            "tools": [{"type": "server", "name": "time.now"}],
            "tool_choice": "required",
            "max_tokens": 48,
            "temperature": 0,
        }
        async with (
            aiohttp.ClientSession() as s,
            s.post(llmd.url + "/v1/chat/completions", json=body, headers={"X-Request-ID": "real-tool"}) as r,
        ):
            assert r.status == 200, await r.text()
            answer = await r.json()
        # round 1's row is the client's request id, settled last (after any later round's)
        await wait_for(lambda: any(r["request_id"] == "real-tool" for r in rows(tmp_path / "usage.sqlite3")), 30)
        got = {row["request_id"]: row for row in rows(tmp_path / "usage.sqlite3")}
        # a tool call in round 1 makes a second round; a text answer is the only one
        assert set(got) in ({"real-tool", "real-tool.r2"}, {"real-tool"}), got
        print("rounds:", len(got))
        assert answer["usage"]["prompt_tokens"] == sum(row["prompt_tokens"] for row in got.values())
        assert answer["usage"]["completion_tokens"] == sum(row["completion_tokens"] for row in got.values())
        msg = answer["choices"][0]["message"]
        assert "tool_calls" not in msg or not msg["tool_calls"]
        assert isinstance(msg.get("content"), str)
        print("real model's answer:", json.dumps(msg["content"]))

        # The same loop streamed, read by the official SDK: every round streams upstream, the
        # text arrives as the model's own chunks, the usage chunk sums the rounds' rows.
        client = openai.AsyncOpenAI(base_url=llmd.url + "/v1", api_key="none")
        stream = await client.chat.completions.create(
            model="gemma",
            messages=body["messages"],
            tools=body["tools"],  # type: ignore[arg-type]
            tool_choice="required",
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Request-ID": "real-tool-stream"},
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip() and len({c.id for c in chunks}) == 1
        usage = chunks[-1].usage
        assert usage is not None
        await wait_for(lambda: any(r["request_id"] == "real-tool-stream" for r in rows(tmp_path / "usage.sqlite3")), 30)
        streamed = [row for row in rows(tmp_path / "usage.sqlite3") if row["request_id"].startswith("real-tool-stream")]
        assert usage.prompt_tokens == sum(row["prompt_tokens"] for row in streamed)
        assert usage.completion_tokens == sum(row["completion_tokens"] for row in streamed)
        assert all(row["stream"] == 1 and row["token_method"] == "upstream" for row in streamed)
        print("streamed rounds:", len(streamed), "chunks:", len(chunks))
