"""nginx/llm-api.conf under a real nginx, in a throw-away prefix.

The site is rendered into tmp_path by tests/nginxproc.py with only what must
differ on a test machine substituted (certificate, log paths; for the live
test also ports and the upstream), each substitution checked, so that the file
ops install is the file that is tested. nginx is required, not optional: CI
installs Debian's `nginx` package, and a missing binary fails with that hint.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from llmd.config import ServerConfig
from tests.fakeproc import free_port
from tests.nginxproc import has_ipv6, nginx_args, render, run_nginx

# client_max_body_size must match llmd's own limit.
MAX_BODY_BYTES = ServerConfig().max_body_bytes

# nginx >= 1.25.1 warns about "listen ... http2", which the site keeps for
# nginx 1.22/1.24; any other warning is a defect in the file.
ALLOWED_WARNINGS = (re.compile(r'the "listen \.\.\. http2" directive is deprecated'),)


def unexpected_warnings(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if re.search(r"\[(warn|emerg|alert|crit|error)\]", line)
        and not any(allowed.search(line) for allowed in ALLOWED_WARNINGS)
    ]


def test_site_passes_nginx_t(tmp_path: Path) -> None:
    rendered = render(tmp_path, https_port=free_port(), http_port=free_port(), ipv6=has_ipv6())
    result = subprocess.run([*nginx_args(rendered), "-t"], capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "syntax is ok" in output, output
    assert "test is successful" in output, output
    assert unexpected_warnings(output) == [], output


# /v1/stream holds its second event until the client has read the first (or 10 s passed): if
# nginx buffered the stream, the client could not read the first before the stub gives up.
STREAM_RELEASE = web.AppKey("stream_release", asyncio.Event)
STREAM_RELEASED_IN_TIME = web.AppKey("stream_released_in_time", list)


def fake_llmd() -> web.Application:
    """Echoes the headers llmd would see; /v1/stream sends its second SSE event only once the
    client has received the first."""

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"path": request.path, "headers": dict(request.headers)})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        try:
            await asyncio.wait_for(request.app[STREAM_RELEASE].wait(), 10)
            request.app[STREAM_RELEASED_IN_TIME].append(True)
        except TimeoutError:
            request.app[STREAM_RELEASED_IN_TIME].append(False)
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application(client_max_size=2 * MAX_BODY_BYTES)
    app[STREAM_RELEASE] = asyncio.Event()
    app[STREAM_RELEASED_IN_TIME] = []
    app.router.add_get("/v1/stream", stream)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@dataclass
class Live:
    https: str
    http: str
    https_port: int
    upstream: web.AppRunner


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    """nginx with the site on loopback ports, in front of a fake llmd."""
    runner = web.AppRunner(fake_llmd())
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()

    https_port, http_port = free_port(), free_port()
    rendered = render(tmp_path, https_port=https_port, http_port=http_port, upstream_port=upstream_port)
    try:
        async with run_nginx(rendered, https_port):
            yield Live(f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", https_port, runner)
    finally:
        await runner.cleanup()


async def test_site_serves_llmd_traffic(live: Live) -> None:
    """The headers, limits and streaming behaviour llmd relies on.

    1. A request reaches llmd with the real client IP (spoofed XFF dropped),
       X-Forwarded-Proto https and a request id: generated, passed through,
       or replaced when malformed.
    2. SSE chunks arrive unbuffered.
    3. Plain HTTP redirects with 308; /metrics is refused outside the
       monitoring network; an oversized body and a dead llmd both answer in
       the OpenAI error envelope.
    """
    # The throw-away certificate is self-signed; the PKI is not under test.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as client:
        async with client.post(
            f"{live.https}/v1/chat/completions", json={"model": "m"}, headers={"X-Forwarded-For": "6.6.6.6"}
        ) as response:
            assert response.status == 200
            assert response.headers["Strict-Transport-Security"].startswith("max-age=")
            seen = (await response.json())["headers"]
        assert seen["X-Forwarded-For"] == "127.0.0.1"
        assert seen["X-Real-IP"] == "127.0.0.1"
        assert seen["X-Forwarded-Proto"] == "https"
        assert re.fullmatch(r"[0-9a-f]{32}", seen["X-Request-ID"])
        # Upstream keepalive: nginx must not ask llmd to close the connection.
        assert seen.get("Connection", "") == ""

        for sent, expected in (("sdk-req_1.2:3", r"sdk-req_1\.2:3"), ("x" * 129, r"[0-9a-f]{32}")):
            async with client.get(f"{live.https}/v1/models", headers={"X-Request-ID": sent}) as response:
                assert re.fullmatch(expected, (await response.json())["headers"]["X-Request-ID"])

        async with client.get(f"{live.https}/v1/stream") as response:
            first = await response.content.readline()
            live.upstream.app[STREAM_RELEASE].set()  # the stub may now finish its stream
            rest = await response.read()
        assert first == b"data: first\n"
        assert live.upstream.app[STREAM_RELEASED_IN_TIME] == [True], "SSE chunk was buffered by nginx"
        assert rest.endswith(b"data: [DONE]\n\n")

        async with client.post(f"{live.http}/v1/chat/completions", allow_redirects=False) as response:
            assert response.status == 308
            assert response.headers["Location"].startswith("https://")

        async with client.get(f"{live.https}/metrics") as response:
            assert response.status == 403

        too_large = b"x" * (MAX_BODY_BYTES + 1)
        async with client.post(f"{live.https}/v1/chat/completions", data=too_large) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "request_too_large"
        async with client.post(f"{live.https}/v1/embeddings", data=b"x" * MAX_BODY_BYTES) as response:
            assert response.status == 200

        await live.upstream.cleanup()  # llmd stops listening
        async with client.get(f"{live.https}/v1/models") as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "5"
            assert (await response.json())["error"]["type"] == "server_error"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_versions(live: Live, version: ssl.TLSVersion) -> None:
    """TLS 1.2 (with the site's cipher list and an ECDSA certificate) and 1.3 both negotiate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    _, writer = await asyncio.open_connection("127.0.0.1", live.https_port, ssl=context, server_hostname="llm.internal")
    negotiated = writer.get_extra_info("ssl_object").version()
    writer.close()
    await writer.wait_closed()
    assert negotiated == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
