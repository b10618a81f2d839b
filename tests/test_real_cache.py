"""The completion cache in front of the real llama-server: its streams (usage chunk asked by llmd,
hidden from the client) are stored and replayed byte for byte, whole answers too, and sampled
requests always reach the model."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import base_config, run_llmd, write_config

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "bin" / "llama-server"
MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


async def post(url: str, body: dict) -> tuple[bytes, str]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return await r.read(), r.headers.get("x-llmd-cache", "")


async def test_real_answers_are_cached_and_replayed(tmp_path: Path) -> None:
    assert LLAMA.exists() and MODEL.exists(), "run `make setup` (packaging/setup.sh) first"
    doc = base_config(
        tmp_path,
        {"g": {"backend": "llama-server", "model": str(MODEL), "args": ["-c", "1024", "-np", "1"], "cache": True}},
        launchers={"llama-server": {"command": str(LLAMA), "start_timeout_s": 120, "health_interval_s": 0.5}},
        routing={"timeouts": {"connect_s": 2, "first_byte_s": 120, "total_s": 300}},
    )
    msgs = [{"role": "user", "content": "Name three colours."}]
    async with run_llmd(write_config(tmp_path / "config.yaml", doc)) as llmd:
        for _ in range(100):  # run_llmd returns once listening; the replica loads meanwhile
            async with aiohttp.ClientSession() as s, s.get(llmd.url + "/readyz") as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.2)
        stream = {"model": "g", "messages": msgs, "temperature": 0, "max_tokens": 16, "stream": True}
        first, state = await post(llmd.url, stream)
        assert state == "miss" and first.endswith(b"data: [DONE]\n\n") and b'"usage"' not in first
        again, state = await post(llmd.url, stream)
        assert (state, again) == ("hit", first)
        whole = {"model": "g", "messages": msgs, "seed": 42, "max_tokens": 16}
        first, _ = await post(llmd.url, whole)
        again, state = await post(llmd.url, whole)
        assert (state, again) == ("hit", first)
        sampled = {"model": "g", "messages": msgs, "temperature": 1.0, "max_tokens": 4}
        assert [(await post(llmd.url, sampled))[1] for _ in range(2)] == ["bypass", "bypass"]
    con = sqlite3.connect(tmp_path / "usage.sqlite3")
    rows = con.execute(
        "SELECT cache, prompt_tokens, completion_tokens, upstream_tokens, replica FROM requests"
    ).fetchall()
    assert [r[0] for r in rows] == ["miss", "hit", "miss", "hit", "bypass", "bypass"]
    for miss, hit in (rows[0], rows[1]), (rows[2], rows[3]):
        assert miss[1] > 0 and miss[2] > 0 and miss[3] == miss[1] + miss[2] and miss[4]
        assert hit[1:3] == miss[1:3] and hit[3] == 0 and hit[4] == ""
    assert json.loads(first)["usage"]["completion_tokens"] == rows[2][2]
