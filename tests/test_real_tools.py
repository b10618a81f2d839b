"""Server-side tools with the real llama-server (--jinja, its default) and Gemma 3 270M.

The small model does not reliably choose a tool on its own, so the request says
``tool_choice: "required"`` (llama-server constrains the output to a tool call by grammar):
round 1 must call ``time.now``, llmd runs it, and round 2 (the last of ``max_rounds: 2``, sent
with ``tool_choice: "none"``) answers in text. Whatever the model writes, llmd relays it with
the rounds' usage summed and one ledger row per round.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
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
        await wait_for(lambda: len(rows(tmp_path / "usage.sqlite3")) >= 2, 30)
        got = {row["request_id"]: row for row in rows(tmp_path / "usage.sqlite3")}
        assert set(got) == {"real-tool", "real-tool.r2"}, got  # the model called time.now: a second round
        assert answer["usage"]["prompt_tokens"] == sum(row["prompt_tokens"] for row in got.values())
        assert answer["usage"]["completion_tokens"] == sum(row["completion_tokens"] for row in got.values())
        msg = answer["choices"][0]["message"]
        assert "tool_calls" not in msg or not msg["tool_calls"]
        assert isinstance(msg.get("content"), str)
        print("real model's answer after time.now:", json.dumps(msg["content"]))
