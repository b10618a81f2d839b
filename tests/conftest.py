"""Shared fixtures: fake backends as real child processes, llmd itself on a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmd import configfile
from llmd.daemon import Daemon
from tests.fakeproc import FAKE_LLAMA, FAKE_VLLM, FakeProc, start_fake

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.stores"]  # pg_server, redis_server: real PostgreSQL and Redis per session


@dataclass
class Llmd:
    daemon: Daemon
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.port}"

    @property
    def services(self):
        return self.daemon.services


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def base_config(tmp_path: Path, models: dict[str, Any], **sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_seconds": 5, "log_format": "json"},
        "usage": {"path": str(tmp_path / "usage.sqlite3"), "flush_ms": 20},
        "models": models,
        "routing": {
            "retries": 2,
            "queue_timeout_s": 5,
            "timeouts": {"connect_s": 2, "first_byte_s": 10, "total_s": 30},
        },
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    return doc


@contextlib.asynccontextmanager
async def run_llmd(path: Path) -> AsyncIterator[Llmd]:
    """llmd in this process (same code path as `llmd serve`, minus signal handlers)."""
    cfg = configfile.load(path)
    daemon = Daemon(cfg, path)
    assert await daemon.start()
    try:
        yield Llmd(daemon, path)
    finally:
        await daemon.stop()


@pytest.fixture
async def fake() -> AsyncIterator[FakeProc]:
    """One fake llama-server with 4 slots, used as a remote `openai` upstream."""
    proc = await start_fake(FAKE_LLAMA, "-np", "4", "--metrics", "--embeddings")
    try:
        yield proc
    finally:
        await proc.stop()


# The upstreams that tests where the wire matters (streams, usage, token limits) run against: the
# fake llama-server in each wire profile of tests/_fake_common.py, and the fake vLLM (its own
# framing: "content":"" role chunk, finish_reason on the last token chunk, no timings). vLLM
# serves "m" and "other" (it refuses other model names) and has no embeddings on its generate runner.
UPSTREAMS: dict[str, tuple[Path, tuple[str, ...]]] = {
    "llama": (FAKE_LLAMA, ("-np", "4", "--metrics", "--embeddings")),
    "llama-openai": (FAKE_LLAMA, ("-np", "4", "--metrics", "--embeddings", "--fake-wire", "openai")),
    "llama-chaos": (FAKE_LLAMA, ("-np", "4", "--metrics", "--embeddings", "--fake-wire", "chaos")),
    "vllm": (FAKE_VLLM, ("--served-model-name", "m", "other", "--max-num-seqs", "64", "--load-delay-s", "0")),
}


@pytest.fixture(params=list(UPSTREAMS))
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[FakeProc]:
    """The test runs once per entry of UPSTREAMS (its id names the upstream and profile)."""
    script, args = UPSTREAMS[request.param]
    proc = await start_fake(script, *args)
    try:
        yield proc
    finally:
        await proc.stop()


@pytest.fixture
def llmd_for(tmp_path: Path) -> Callable[..., contextlib.AbstractAsyncContextManager[Llmd]]:
    """llmd_for(fakes, **sections): llmd with model 'm' (alias 'gpt-4o-mini') relayed to the fakes."""

    def make(fakes: FakeProc | list[FakeProc], model_extra: dict[str, Any] | None = None, **sections: Any):
        fl = fakes if isinstance(fakes, list) else [fakes]
        model = {"backend": "openai", "urls": [f.url + "/v1" for f in fl], "aliases": ["gpt-4o-mini"], "slots": 4}
        model.update(model_extra or {})
        doc = base_config(tmp_path, {"m": model}, **sections)
        return run_llmd(write_config(tmp_path / "config.yaml", doc))

    return make


async def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0, step_s: float = 0.02) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(step_s)


os.environ.setdefault("OPENAI_LOG", "warning")


# --- `llmd serve` as a real child process (signals, sd_notify, nginx end to end) ---------------


@dataclass
class LlmdProc:
    """A running `python -m llmd serve -c CONFIG`; its stderr (JSON log lines) is collected."""

    proc: asyncio.subprocess.Process
    lines: list[str]
    port: int = 0
    _reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    async def wait_log(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0) -> dict[str, Any]:
        """The first log record matching ``pred``, waiting for it (fails if llmd exits first)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            for doc in self.logs():
                if pred(doc):
                    return doc
            if self.proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no matching log line (exit {self.proc.returncode}):\n" + "\n".join(self.lines))
            await asyncio.sleep(0.02)

    async def kill(self) -> None:
        """SIGKILL (if still running) and reap; children die with it (PR_SET_PDEATHSIG)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5)


@contextlib.asynccontextmanager
async def llmd_process(config_path: Path, env: dict[str, str] | None = None,
                       timeout_s: float = 15.0) -> AsyncIterator[LlmdProc]:
    """`llmd serve` in a child process (cwd: the repository); yields once it logs "listening".

    ``env`` is added to this environment minus systemd's notify variables. Always SIGKILLed
    and reaped at the end, whatever the test did.
    """
    base = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmd", "serve", "-c", str(config_path), cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**base, **(env or {})},
    )
    assert proc.stdout is not None
    llmd = LlmdProc(proc, [])

    async def collect(stream: asyncio.StreamReader) -> None:
        async for line in stream:
            llmd.lines.append(line.decode(errors="replace").rstrip("\n"))

    llmd._reader = asyncio.create_task(collect(proc.stdout))
    try:
        listening = await llmd.wait_log(lambda d: d.get("msg") == "listening", timeout_s)
        llmd.port = int(listening["port"])
        yield llmd
    finally:
        await llmd.kill()
