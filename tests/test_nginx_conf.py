"""nginx/llm-api.conf under a real nginx, in a throw-away prefix.

The site is rendered into tmp_path with only what must differ on a test
machine substituted (certificate, log paths; for the live test also ports and
the upstream), each substitution checked, so that the file ops install is the
file that is tested. nginx is required, not optional: CI installs Debian's
`nginx` package, and a missing binary fails with that hint.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from llmd.config import ServerConfig

SITE = Path(__file__).resolve().parent.parent / "nginx" / "llm-api.conf"
# client_max_body_size must match llmd's own limit.
MAX_BODY_BYTES = ServerConfig().max_body_bytes

# nginx >= 1.25.1 warns about "listen ... http2", which the site keeps for
# nginx 1.22/1.24; any other warning is a defect in the file.
ALLOWED_WARNINGS = (re.compile(r'the "listen \.\.\. http2" directive is deprecated'),)


def require_tool(name: str, debian_package: str) -> str:
    # Debian puts nginx in /usr/sbin, which a non-root PATH often lacks.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} not found: install it with `apt-get install -y {debian_package}`", pytrace=False)
    return path


@dataclass
class Rendered:
    prefix: Path
    conf: Path
    error_log: Path


def substitute(text: str, pattern: str, replacement: str, count: int) -> str:
    """re.sub that insists on `count` matches, so a changed site file fails loudly."""
    new_text, found = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert found == count, f"expected {count} match(es) of {pattern!r} in {SITE}, found {found}"
    return new_text


def make_certificate(directory: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "openssl")
    cert, key = directory / "llm.internal.pem", directory / "llm.internal.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=llm.internal",
         "-addext", "subjectAltName=DNS:llm.internal",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def render(
    prefix: Path, *, https_port: int, http_port: int, upstream_port: int | None = None, ipv6: bool = True
) -> Rendered:
    """Write prefix/nginx.conf that includes the site, listening on the given ports.

    `nginx -t` binds the listen sockets too, so even the syntax check needs
    ports a non-root CI user may bind (an address in use is ignored by -t).
    With `upstream_port` the copy is for a live run: loopback only, pointed
    at a fake llmd. `ipv6=False` drops the [::] listen lines for hosts
    without IPv6.
    """
    cert, key = make_certificate(prefix)
    logs = prefix / "logs"
    logs.mkdir()
    site = SITE.read_text()
    site = substitute(site, r"^(\s*ssl_certificate)\s+\S+;", rf"\1 {cert};", 1)
    site = substitute(site, r"^(\s*ssl_certificate_key)\s+\S+;", rf"\1 {key};", 1)
    site = substitute(site, r"/var/log/nginx/", f"{logs}/", 2)
    ipv4 = "127.0.0.1:" if upstream_port is not None else ""
    site = substitute(site, r"^(\s*listen) 443 ", rf"\1 {ipv4}{https_port} ", 1)
    site = substitute(site, r"^(\s*listen) 80;", rf"\1 {ipv4}{http_port};", 1)
    if ipv6 and upstream_port is None:
        site = substitute(site, r"^(\s*listen) \[::\]:443 ", rf"\1 [::]:{https_port} ", 1)
        site = substitute(site, r"^(\s*listen) \[::\]:80;", rf"\1 [::]:{http_port};", 1)
    else:
        site = substitute(site, r"^\s*listen \[::\]:\d+.*\n", "", 2)
    if upstream_port is not None:
        site = substitute(site, r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{upstream_port};", 1)
    (prefix / "llm-api.conf").write_text(site)

    temp = prefix / "temp"
    temp.mkdir()
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp_paths = "\n".join(f"    {kind}_temp_path {temp / kind};" for kind in kinds)
    # As root, workers would run as nobody and could not enter pytest's 0700
    # tmp_path; as non-root the directive would only draw a warning.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    error_log = prefix / "error.log"
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"{user}pid {prefix / 'nginx.pid'};\n"
        f"error_log {error_log} warn;\n"
        "worker_processes 1;\n"
        "events { worker_connections 64; }\n"
        "http {\n"
        f"{temp_paths}\n"
        f"    access_log {logs / 'access.log'};\n"
        f"    include {prefix / 'llm-api.conf'};\n"
        "}\n"
    )
    return Rendered(prefix, conf, error_log)


def nginx_args(rendered: Rendered) -> list[str]:
    nginx = require_tool("nginx", "nginx")
    # -e: nginx opens its compiled-in error log before reading the config.
    return [nginx, "-p", str(rendered.prefix), "-c", str(rendered.conf), "-e", str(rendered.error_log)]


def unexpected_warnings(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if re.search(r"\[(warn|emerg|alert|crit|error)\]", line)
        and not any(allowed.search(line) for allowed in ALLOWED_WARNINGS)
    ]


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::", 0))
    except OSError:
        return False
    return True


def test_site_passes_nginx_t(tmp_path: Path) -> None:
    rendered = render(tmp_path, https_port=free_port(), http_port=free_port(), ipv6=has_ipv6())
    result = subprocess.run([*nginx_args(rendered), "-t"], capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "syntax is ok" in output, output
    assert "test is successful" in output, output
    assert unexpected_warnings(output) == [], output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_llmd() -> web.Application:
    """Echoes the headers llmd would see; /v1/stream sends two SSE events 0.5 s apart."""

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"path": request.path, "headers": dict(request.headers)})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.sleep(0.5)
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application(client_max_size=2 * MAX_BODY_BYTES)
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
    nginx = await asyncio.create_subprocess_exec(
        *nginx_args(rendered), "-g", "daemon off;", stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if nginx.returncode is not None:
                output = await nginx.stdout.read() if nginx.stdout else b""
                pytest.fail(f"nginx exited {nginx.returncode}: {output.decode()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", https_port)
            except OSError:
                assert time.monotonic() < deadline, rendered.error_log.read_text()
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            break
        yield Live(f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", https_port, runner)
    finally:
        if nginx.returncode is None:
            nginx.send_signal(signal.SIGQUIT)  # graceful stop, as `nginx -s quit`
            try:
                await asyncio.wait_for(nginx.wait(), timeout=10)
            except TimeoutError:
                nginx.kill()
                await nginx.wait()
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

        started = time.monotonic()
        async with client.get(f"{live.https}/v1/stream") as response:
            first = await response.content.readline()
            first_after_s = time.monotonic() - started
            rest = await response.read()
        assert first == b"data: first\n"
        assert first_after_s < 0.4, "SSE chunk was buffered by nginx"
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
