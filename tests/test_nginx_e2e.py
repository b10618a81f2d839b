"""End to end: the openai SDK over HTTPS -> nginx (nginx/llm-api.conf) -> `llmd serve` -> fake.

nginx is rendered and run as in tests/test_nginx_conf.py (tests/nginxproc.py), with a
throw-away self-signed certificate the client trusts, in front of a real `llmd serve` child
process whose model is relayed to the fake llama-server. Loopback is all of 127.0.0.0/8 on
Linux, so the client binds its own source address (127.0.0.2, 127.0.0.3) to be told apart
from nginx, which reaches llmd from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import time
import uuid
from pathlib import Path

import aiohttp
import httpx2
import openai

from tests.conftest import LlmdProc, base_config, llmd_process, write_config
from tests.fakeproc import FakeProc, free_port
from tests.nginxproc import render, run_nginx

MSG = [{"role": "user", "content": "hello through nginx"}]
TOKENS = 6


async def ledger_client_ip(db_path: Path, request_id: str, timeout_s: float = 5.0) -> str:
    """requests.client_ip of one request, once llmd has flushed its row."""
    deadline = time.monotonic() + timeout_s
    while True:
        if db_path.exists():
            with sqlite3.connect(db_path) as db:
                row = db.execute("SELECT client_ip FROM requests WHERE request_id = ?", (request_id,)).fetchone()
            if row is not None:
                return row[0]
        assert time.monotonic() < deadline, f"no ledger row for {request_id}"
        await asyncio.sleep(0.05)


async def access_client(llmd: LlmdProc, request_id: str) -> str:
    """The `client` field of llmd's JSON access log line for one request."""
    doc = await llmd.wait_log(lambda d: d.get("logger") == "llmd.access" and d.get("request_id") == request_id)
    return doc["client"]


async def test_https_stream_through_nginx_arrives_event_by_event_with_the_client_address(
    tmp_path: Path, fake: FakeProc
) -> None:
    """The SDK streams through nginx event by event; llmd records the real client address.

    1. Start `llmd serve` (model m relayed to the fake; server.trusted_proxies: [127.0.0.1],
       i.e. nginx) and nginx with the site on free loopback ports in front of it.
    2. The openai SDK (httpx2, verifying the throw-away certificate) connects from
       127.0.0.2 and streams a chat over HTTPS, with a forged X-Forwarded-For: 6.6.6.6 that
       nginx must replace. The fake generates 6 tokens, then hangs: the stream never ends.
    3. Each token is its own event, in order, and all 6 reach the client while the upstream
       is still hanging: neither nginx nor llmd waits for the end of the stream (an event, not
       a clock: a busy machine cannot fail it). The client then hangs up.
    4. The ledger row (requests.client_ip) and the JSON access log line (client) say
       127.0.0.2: llmd believed nginx's X-Forwarded-For, which nginx set from the peer.
    5. Directly to llmd from 127.0.0.3 (not a trusted proxy) with a forged
       X-Forwarded-For: the header is ignored, 127.0.0.3 is recorded. From 127.0.0.1 (trusted)
       the same header is believed.
    """
    # 1. llmd, then nginx in front of it.
    doc = base_config(tmp_path, {"m": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 4}},
                      server={"trusted_proxies": ["127.0.0.1"]})
    path = write_config(tmp_path / "config.yaml", doc)
    async with llmd_process(path) as llmd:
        https_port = free_port()
        rendered = render(tmp_path / "nginx", https_port=https_port, http_port=free_port(), upstream_port=llmd.port)
        async with run_nginx(rendered, https_port):
            # 2. The SDK over HTTPS, from 127.0.0.2.
            tls = ssl.create_default_context(cafile=str(rendered.cert))  # hostname checked too (SAN IP)
            transport = httpx2.AsyncHTTPTransport(verify=tls, local_address="127.0.0.2")
            async with openai.DefaultAsyncHttpxClient(transport=transport) as http_client:
                client = openai.AsyncOpenAI(base_url=f"https://127.0.0.1:{https_port}/v1", api_key="sk-unused",
                                            max_retries=0, http_client=http_client)
                rid = f"e2e-{uuid.uuid4().hex}"
                stream = await client.chat.completions.create(
                    model="m", messages=MSG, max_tokens=TOKENS + 10, stream=True,  # type: ignore[arg-type]
                    extra_body={"fake": {"hang_after_tokens": TOKENS}},
                    extra_headers={"X-Forwarded-For": "6.6.6.6", "X-Request-ID": rid},
                )
                contents: list[str] = []
                async with asyncio.timeout(30):
                    async for chunk in stream:
                        contents += [c.delta.content for c in chunk.choices if c.delta.content]
                        if len(contents) == TOKENS:
                            break
                await stream.close()
                assert stream.response.headers["x-request-id"] == rid
                assert stream.response.headers["strict-transport-security"].startswith("max-age=")

        # 3. Event by event, as generated, while the upstream still hangs.
        assert contents == ["t0", *(f" t{i}" for i in range(1, TOKENS))]

        # 4. The client's address, not nginx's and not the forged one.
        assert await access_client(llmd, rid) == "127.0.0.2"
        assert await ledger_client_ip(tmp_path / "usage.sqlite3", rid) == "127.0.0.2"

        # 5. Forged X-Forwarded-For straight to llmd: ignored from 127.0.0.3, believed from 127.0.0.1.
        body = {"model": "m", "messages": MSG, "max_tokens": 1}
        for source, recorded in (("127.0.0.3", "127.0.0.3"), ("127.0.0.1", "6.6.6.6")):
            rid = f"direct-{uuid.uuid4().hex}"
            connector = aiohttp.TCPConnector(local_addr=(source, 0))
            async with aiohttp.ClientSession(connector=connector) as session:
                headers = {"X-Forwarded-For": "6.6.6.6", "X-Request-ID": rid}
                async with session.post(llmd.url + "/v1/chat/completions", json=body, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
            assert await access_client(llmd, rid) == recorded
            assert await ledger_client_ip(tmp_path / "usage.sqlite3", rid) == recorded
