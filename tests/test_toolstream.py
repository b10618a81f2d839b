"""Streamed tool loops as clients see them, beyond test_tools.py: an upstream that ignores
include_usage (no usage sum is told that the ledger would not match), the official openai SDK
reading every chunk of a loop."""

from __future__ import annotations

import json
from pathlib import Path

import openai

from tests.conftest import wait_for
from tests.fakeproc import FakeProc
from tests.test_tools import KEYS, chat, config, post, rows, run_llmd

CALL = {"tool_call": {"name": "math_eval", "arguments": {"expression": "2+2"}}}


async def test_an_upstream_without_usage_gets_no_made_up_sum(tmp_path: Path, fake: FakeProc) -> None:
    """The rounds' usage is not told by the upstream: their rows are counted from the chunks
    after the loop; a sum told to the client now (round 1 as 0 tokens) would not match them."""
    ctl = {**CALL, "wire": "no-usage", "after_tool": {"text": "it is four", "wire": "no-usage"}}
    async with run_llmd(config(tmp_path, fake)) as llmd:
        body = chat(["math.eval"], ctl, stream=True, stream_options={"include_usage": True})
        status, text, _ = await post(llmd.url, body, rid="nu")
        assert status == 200 and text.endswith("data: [DONE]\n\n")
        chunks = [json.loads(e[len("data: ") :]) for e in text.split("\n\n") if e.startswith("data: {")]
        assert not any("usage" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        await wait_for(lambda: len(rows(tmp_path)) >= 2)
        assert [r["token_method"] for r in rows(tmp_path)] == ["stream_chunks+estimate"] * 2


async def test_the_openai_sdk_reads_a_streamed_loop(tmp_path: Path, fake: FakeProc) -> None:
    """Every chunk parses; one id; the text, one finish and the summed usage equal the rows'."""
    ctl = {**CALL, "wire": "openai", "after_tool": {"text": "it is four", "wire": "openai"}}
    async with run_llmd(config(tmp_path, fake)) as llmd:
        client = openai.AsyncOpenAI(base_url=llmd.url + "/v1", api_key=KEYS["prem"], max_retries=0)
        for include in (True, False):
            stream = await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "2+2?"}],
                max_tokens=8,
                tools=[{"type": "server", "name": "math.eval"}],  # type: ignore[list-item]
                stream=True,
                stream_options={"include_usage": include},
                extra_body={"fake": ctl},
                extra_headers={"X-Request-ID": f"sdk-{include}"},
            )
            got = [c async for c in stream]
            assert len({c.id for c in got}) == 1
            assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "it is four"
            assert [c.choices[0].finish_reason for c in got if c.choices and c.choices[0].finish_reason] == ["stop"]
            usage = [c.usage for c in got if c.usage is not None]
            if not include:
                assert usage == []
                continue
            assert len(usage) == 1
            await wait_for(lambda: len(rows(tmp_path)) >= 2)
            mine = [r for r in rows(tmp_path) if r["request_id"].startswith("sdk-True")]
            assert len(mine) == 2
            assert usage[0].prompt_tokens == sum(r["prompt_tokens"] for r in mine)
            assert usage[0].completion_tokens == sum(r["completion_tokens"] for r in mine)
