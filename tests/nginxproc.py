"""nginx/llm-api.conf rendered into a throw-away prefix and run by a real nginx.

Shared by tests/test_nginx_conf.py (the site against a fake llmd) and
tests/test_nginx_e2e.py (the site in front of a real `llmd serve`).

The site is rendered with only what must differ on a test machine substituted
(certificate, log paths; for a live run also ports and the upstream), each
substitution checked, so that the file ops install is the file that is tested.
nginx is required, not optional: CI installs Debian's `nginx` package, and a
missing binary fails with that hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SITE = Path(__file__).resolve().parent.parent / "nginx" / "llm-api.conf"


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
    cert: Path  # the throw-away self-signed certificate (CN and SAN llm.internal, SAN IP 127.0.0.1)


def substitute(text: str, pattern: str, replacement: str, count: int) -> str:
    """re.sub that insists on `count` matches, so a changed site file fails loudly."""
    new_text, found = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert found == count, f"expected {count} match(es) of {pattern!r} in {SITE}, found {found}"
    return new_text


def make_certificate(directory: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "openssl")
    cert, key = directory / "llm.internal.pem", directory / "llm.internal.key"
    # IP:127.0.0.1 lets a client that trusts this certificate verify it fully (hostname
    # included) when it connects to the loopback address.
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=llm.internal",
         "-addext", "subjectAltName=DNS:llm.internal,IP:127.0.0.1",
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
    With `upstream_port` the copy is for a live run: listening on 127.0.0.1
    only, pointed at llmd (or a fake of it) on 127.0.0.1:upstream_port.
    `ipv6=False` drops the [::] listen lines for hosts without IPv6.
    """
    prefix.mkdir(parents=True, exist_ok=True)
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
    return Rendered(prefix, conf, error_log, cert)


def nginx_args(rendered: Rendered) -> list[str]:
    nginx = require_tool("nginx", "nginx")
    # -e: nginx opens its compiled-in error log before reading the config.
    return [nginx, "-p", str(rendered.prefix), "-c", str(rendered.conf), "-e", str(rendered.error_log)]


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::", 0))
    except OSError:
        return False
    return True


@contextlib.asynccontextmanager
async def run_nginx(rendered: Rendered, https_port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """nginx in the foreground until the block ends; yields once the HTTPS port accepts.

    Always stopped at the end: SIGQUIT (graceful, as `nginx -s quit`), SIGKILL after 10 s.
    """
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
        yield nginx
    finally:
        if nginx.returncode is None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                await asyncio.wait_for(nginx.wait(), timeout=10)
            except TimeoutError:
                nginx.kill()
                await nginx.wait()
