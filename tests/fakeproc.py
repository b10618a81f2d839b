"""Start the fake backends as real child processes for tests.

    async with await start_fake(FAKE_LLAMA, "-np", "2", "--metrics") as fake:
        ...  # fake.url, await fake.stats()

``start_fake`` picks a free loopback port, starts the script in its own process group with stdout
and stderr collected in ``fake.output``, and (by default) waits until ``/health`` answers 200.
``stop()`` sends SIGTERM, escalates to SIGKILL after a bounded wait, and always reaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

TESTS_DIR = Path(__file__).resolve().parent
FAKE_LLAMA = TESTS_DIR / "fake_backend.py"
FAKE_VLLM = TESTS_DIR / "fake_vllm.py"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller's child binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class FakeProc:
    proc: asyncio.subprocess.Process
    port: int
    host: str = "127.0.0.1"
    output: list[str] = field(default_factory=list)  # stdout and stderr lines, in arrival order
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      timeout_s: float = 5.0) -> tuple[int, Any]:
        """(status, parsed JSON or text) of one request; a fresh session keeps tests independent."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
            method, self.url + path, json=json_body
        ) as resp:
            text = await resp.text()
            if resp.content_type == "application/json":
                return resp.status, await resp.json(content_type=None)
            return resp.status, text

    async def stats(self) -> dict[str, Any]:
        _, body = await self.request("GET", "/fake/stats")
        return body

    async def reset(self) -> None:
        await self.request("POST", "/fake/reset")

    async def wait_healthy(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"fake exited with {self.proc.returncode}:\n" + "\n".join(self.output))
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.url + "/health") as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fake not healthy after {timeout_s}s:\n" + "\n".join(self.output))
                await asyncio.sleep(0.02)

    async def wait_for_output(self, needle: str, timeout_s: float = 5.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.output:
                if needle in line:
                    return line
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{needle!r} not in output:\n" + "\n".join(self.output))

    async def wait_exit(self, timeout_s: float = 5.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, timeout_s: float = 3.0) -> int:
        """SIGTERM the group, SIGKILL it after timeout_s, reap; returns the exit status."""
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def __aenter__(self) -> FakeProc:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _collect(stream: asyncio.StreamReader, sink: list[str]) -> None:
    async for line in stream:
        sink.append(line.decode(errors="replace").rstrip("\n"))


async def start_fake(script: str | Path = FAKE_LLAMA, *args: str, env: dict[str, str] | None = None,
                     wait_healthy: bool = True, timeout_s: float = 10.0, host: str = "127.0.0.1",
                     port: int | None = None) -> FakeProc:
    """Start a fake (FAKE_LLAMA, FAKE_VLLM or a path relative to tests/) with --host/--port added.

    ``env`` is added to the current environment. Unless ``wait_healthy`` is false, returns once
    /health is 200; a port lost to a concurrent test between pick and bind is retried."""
    path = Path(script)
    if not path.is_absolute():
        path = TESTS_DIR / path
    for attempt in range(3):
        chosen = port or free_port(host)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(path), *args, "--host", host, "--port", str(chosen),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        assert proc.stdout is not None
        fake = FakeProc(proc, chosen, host)
        fake._reader = asyncio.create_task(_collect(proc.stdout, fake.output))
        if not wait_healthy:
            return fake
        try:
            await fake.wait_healthy(timeout_s)
            return fake
        except RuntimeError:
            await fake.stop()
            if port is not None or attempt == 2 or not any("address already in use" in line.lower()
                                                          for line in fake.output):
                raise
        except BaseException:
            await fake.stop()
            raise
    raise AssertionError("unreachable")
