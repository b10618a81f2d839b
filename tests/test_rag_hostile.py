"""Retrieval routes under hostile input (fake llama-server): every bad request is a 400 in
OpenAI's envelope before any model call (no ledger row, nothing stored), and odd but valid
input (metadata keys with quotes, backslashes, dots) is taken literally."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from llmd.auth import hash_secret
from tests.fakeproc import FakeProc
from tests.test_rag import KEY, ROOT, post, rag_section, rows


@pytest.mark.parametrize("store", ["sqlite", "qdrant"])
async def test_filters_take_metadata_keys_literally(fake: FakeProc, llmd_for, tmp_path: Path, store: str) -> None:
    """1. two documents whose metadata keys differ only by a quote, a backslash, a dot;
    2. a filter on each key finds exactly the document holding it (never a store error, a 503,
    nor the other document); 3. a filter value past 64 bits is a 400 before the embedding call."""
    keys = [{"id": "k", "sha256": hash_secret(KEY)}]
    odd = {'k"ey': 1, "\\": 3, "a.b": 4, "x'y": 5}
    async with llmd_for(fake, keys=keys, rag=rag_section(store)) as llmd, aiohttp.ClientSession() as s:
        base = llmd.url + "/v1/rag/docs"
        metas = [odd, {"key": 1, "a": {"b": 4}}]
        body = {"texts": ["odd keys", "plain keys"], "ids": ["odd", "plain"], "metadata": metas}
        status, got = await post(s, base + "/documents", body)
        assert status == 200, got
        for k, v in odd.items():
            if store == "qdrant" and '"' in k:  # a Qdrant path cannot quote it: a 400, not a 503
                status, err = await post(s, base + "/search", {"query": "keys", "filter": {k: v}}, "big-quote")
                assert status == 400 and err["error"]["param"] == "filter", err
                continue
            status, hits = await post(s, base + "/search", {"query": "keys", "top_k": 5, "filter": {k: v}})
            assert status == 200, (k, hits)
            assert [h["id"] for h in hits["data"]] == ["odd"], k
        status, hits = await post(s, base + "/search", {"query": "keys", "filter": {"key": 1}})
        assert [h["id"] for h in hits["data"]] == ["plain"]
        for route, body in (
            ("/search", {"query": "keys", "filter": {"n": 2**64}}),
            ("/chat", {"messages": [{"role": "user", "content": "keys"}], "rag": {"filter": {"n": -(2**63) - 1}}}),
        ):
            status, err = await post(s, base + route, body, "big" + route[1:])
            assert status == 400 and err["error"]["param"] in ("filter", "rag"), err
        auth = {"Authorization": f"Bearer {KEY}"}
        async with s.get(base + "/documents", params={"filter": '{"n": 99999999999999999999}'}, headers=auth) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "filter"
        await llmd.services.ledger.flush()
    assert not [r for r in rows(tmp_path) if r["request_id"].startswith("big")]


async def test_rag_options_must_be_an_object(fake: FakeProc, llmd_for, tmp_path: Path) -> None:
    """`rag: []`, `false`, `0` or `""` on a grounded chat is a 400 naming `rag` (it was read as
    the defaults), before any model call; `rag: null` is the defaults."""
    keys = [{"id": "k", "sha256": hash_secret(KEY)}]
    msgs = [{"role": "user", "content": "q"}]
    async with llmd_for(fake, keys=keys, rag=rag_section("sqlite")) as llmd, aiohttp.ClientSession() as s:
        base = llmd.url + "/v1/rag/docs"
        assert (await post(s, base + "/documents", {"texts": ["q"]}))[0] == 200
        for n, bad in enumerate(([], False, 0, "")):
            status, err = await post(s, base + "/chat", {"messages": msgs, "rag": bad, "max_tokens": 2}, f"bad{n}")
            assert status == 400 and err["error"]["param"] == "rag", (bad, err)
        status, answer = await post(s, base + "/chat", {"messages": msgs, "rag": None, "max_tokens": 2}, "ok")
        assert status == 200 and answer["rag"]["sources"], answer
        await llmd.services.ledger.flush()
    got = {r["request_id"] for r in rows(tmp_path)}
    assert {"ok", "ok.e1"} <= got and not [r for r in got if r.startswith("bad")]


async def _cli(cwd: Path, url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmd", "rag", *args, "--url", url, "--key", KEY, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_says_what_is_wrong_without_a_traceback(fake: FakeProc, llmd_for, tmp_path: Path) -> None:
    """The CLI against things that are not llmd (no HTTP, HTML, other JSON) and with files that
    are not text (NUL bytes, blank) or too large: one line naming the problem (the file, not
    `texts[i]` of a batch), exit 1, never a Python traceback."""
    (tmp_path / "zeros.bin").write_bytes(b"\0" * 64)  # valid UTF-8, yet no text
    (tmp_path / "blank.md").write_text(" \n\n ")
    (tmp_path / "ok.md").write_text("fine\n")
    (tmp_path / "big.md").write_text("word " * 100)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(banner)
        await writer.drain()
        writer.close()

    cmds = (("ls",), ("ls", "docs"), ("search", "docs", "q"), ("add", "docs", "ok.md"), ("rm", "docs", "x"))
    for banner, want in (
        (b"SSH-2.0-OpenSSH_9.2\r\n", "cannot reach llmd"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n<html>", "did not answer JSON"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "unexpected answer"),
    ):
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            for args in cmds:
                rc, _, err = await _cli(tmp_path, url, *args)
                assert rc == 1 and want in err and "Traceback" not in err, (banner, args, err)
    rc, _, err = await _cli(tmp_path, "localhost:8000", "ls")  # no scheme
    assert rc == 1 and "cannot reach llmd" in err and "Traceback" not in err, err
    keys = [{"id": "k", "sha256": hash_secret(KEY)}]
    async with llmd_for(fake, keys=keys, rag=rag_section("sqlite", max_document_bytes=100)) as llmd:
        for name, want in (("zeros.bin", "zeros.bin: not a text file"), ("blank.md", "blank.md: empty")):
            rc, _, err = await _cli(tmp_path, llmd.url, "add", "docs", "ok.md", name)
            assert rc == 1 and want in err, err
        rc, _, err = await _cli(tmp_path, llmd.url, "add", "docs", "ok.md", "big.md")
        assert rc == 1 and "big.md is 500 bytes" in err, err
        rc, out, _ = await _cli(tmp_path, llmd.url, "ls", "docs")
        assert rc == 0 and out.splitlines()[1:] == []  # the NUL and blank files were refused before sending


async def test_a_long_query_embeds_its_end_only(fake: FakeProc, llmd_for, tmp_path: Path) -> None:
    """A query longer than a chunk (a pasted log, then the question) is embedded as its last
    chunk's worth: llama-server refuses an embedding input past its batch (500 "input is too
    large to process"), which failed the whole search or grounded chat. The fake counts words:
    the query embedding call has at most a chunk's words (it had all 3000)."""
    keys = [{"id": "k", "sha256": hash_secret(KEY)}]
    async with llmd_for(fake, keys=keys, rag=rag_section("sqlite", chunk={"tokens": 64, "overlap": 0})) as llmd:
        async with aiohttp.ClientSession() as s:
            base = llmd.url + "/v1/rag/docs"
            added = {"texts": ["restart the queue", "x y"], "ids": ["q", "x"]}
            assert (await post(s, base + "/documents", added))[0] == 200
            log = " ".join(f"line{i}" for i in range(3000))
            status, hits = await post(s, base + "/search", {"query": log + " restart the queue"}, "long")
            assert status == 200, hits
            assert 0 < hits["usage"]["prompt_tokens"] <= 64 * 4 // 2  # words of at most 256 characters
            short_log = " ".join(f"line{i}" for i in range(600))  # within the fake's context: the chat fits
            msgs = [{"role": "user", "content": short_log + "\n\nrestart the queue"}]
            status, answer = await post(s, base + "/chat", {"messages": msgs, "max_tokens": 2}, "longchat")
            assert status == 200 and 0 < answer["rag"]["usage"]["embedding_tokens"] <= 128, answer


def test_a_system_message_of_text_parts_gets_the_sources_as_one_more_part() -> None:
    """Chat templates such as Gemma's take one system message, first: a conversation whose
    system message is text parts (as the SDKs may send) keeps one system message, the sources
    appended as a part (it got a second system message in front)."""
    from llmd.grounding import INSTRUCTION, grounded
    from llmd.vectors import Hit

    hits = [Hit("d", 0, "the text", 0.9, {})]
    parts = [{"type": "text", "text": "Be brief."}]
    got = grounded([{"role": "system", "content": parts}, {"role": "user", "content": "q"}], hits)
    assert [m["role"] for m in got] == ["system", "user"]
    assert got[0]["content"][0] == parts[0] and got[0]["content"][1]["type"] == "text"
    assert INSTRUCTION in got[0]["content"][1]["text"] and "the text" in got[0]["content"][1]["text"]
    got = grounded([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], hits)
    assert [m["role"] for m in got] == ["system", "user"] and got[0]["content"].startswith("Be brief.\n\n")
    got = grounded([{"role": "user", "content": "q"}], hits)
    assert [m["role"] for m in got] == ["system", "user"]


async def test_odd_chat_content_and_duplicate_texts_are_400s(fake: FakeProc, llmd_for, tmp_path: Path) -> None:
    """A last user message whose text parts hold no string (5, null, a list) is the 400 "needs a
    last user message with text" (it was a TypeError: a 500), before any model call; two equal
    texts without ids are a 400 naming `texts` (not `ids`, which the caller did not send)."""
    keys = [{"id": "k", "sha256": hash_secret(KEY)}]
    async with llmd_for(fake, keys=keys, rag=rag_section("sqlite")) as llmd, aiohttp.ClientSession() as s:
        base = llmd.url + "/v1/rag/docs"
        assert (await post(s, base + "/documents", {"texts": ["a b"]}))[0] == 200
        for n, text in enumerate((5, None, ["x"], {"t": 1})):
            msgs = [{"role": "user", "content": [{"type": "text", "text": text}]}]
            status, err = await post(s, base + "/chat", {"messages": msgs, "max_tokens": 2}, f"odd{n}")
            assert status == 400 and err["error"]["param"] == "messages", (text, err)
        msgs = [{"role": "user", "content": [{"type": "text", "text": 5}, {"type": "text", "text": "a b"}]}]
        status, answer = await post(s, base + "/chat", {"messages": msgs, "max_tokens": 2})
        assert status == 200 and answer["rag"]["sources"], answer
        status, err = await post(s, base + "/documents", {"texts": ["same", "same"]})
        assert status == 400 and err["error"]["param"] == "texts" and "pass 'ids'" in err["error"]["message"], err
        await llmd.services.ledger.flush()
    assert not [r for r in rows(tmp_path) if r["request_id"].startswith("odd")]


async def test_server_tools_on_a_grounded_chat_are_a_400(fake: FakeProc, llmd_for, tmp_path: Path) -> None:
    """A grounded chat is one model call, not the tool loop: a `{"type": "server"}` tool was
    relayed as it is to the upstream (which does not know it); now a 400 naming `tools` before
    any model call. Client function tools are relayed as usual."""
    keys = [{"id": "k", "sha256": hash_secret(KEY)}]
    tools = {"clock": {"builtin": "time.now"}}
    async with llmd_for(fake, keys=keys, rag=rag_section("sqlite"), tools=tools) as llmd, aiohttp.ClientSession() as s:
        base = llmd.url + "/v1/rag/docs"
        assert (await post(s, base + "/documents", {"texts": ["a b"]}))[0] == 200
        msgs = [{"role": "user", "content": "what time is it"}]
        body = {"messages": msgs, "tools": [{"type": "server", "name": "clock"}], "max_tokens": 2}
        status, err = await post(s, base + "/chat", body, "srv")
        assert status == 400 and err["error"]["param"] == "tools", err
        fn = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
        status, answer = await post(s, base + "/chat", {"messages": msgs, "tools": [fn], "max_tokens": 2})
        assert status == 200 and "rag" in answer, answer
        await llmd.services.ledger.flush()
    assert not [r for r in rows(tmp_path) if r["request_id"].startswith("srv")]
