"""The real llama-server (built from pinned llama.cpp source) serving the real Gemma 3 270M
GGUF, supervised by a real `llmd serve` process; the openai SDK as the client.

Few and focused (2 cores): one llmd for the module with a chat model on two replicas pinned
to CPU 0 and CPU 1, and an embeddings model; the last test SIGKILLs llmd itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import base_config, write_config
from tests.fakeproc import free_port

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "bin" / "llama-server"
MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def status(self) -> list[dict]:
        return json.loads(http_get(self.url + "/admin/status")[1])["replicas"]

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if http_get(self.url + "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError("llmd not ready:\n" + self.log.read_text()[-3000:])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    assert LLAMA.exists() and MODEL.exists(), "run `make setup` (packaging/setup.sh) first"
    tmp = tmp_path_factory.mktemp("real")
    port = free_port()
    doc = base_config(
        tmp,
        {
            "gemma-3-270m": {
                "backend": "llama-server",
                "model": str(MODEL),
                "replicas": 2,
                "cpus": [[0], [1 % (os.cpu_count() or 1)]],
                "args": ["-c", "2048", "-np", "2"],
            },
            "gemma-embed": {
                "backend": "llama-server",
                "model": str(MODEL),
                "args": ["--embeddings", "--pooling", "mean", "-c", "1024", "-np", "1", "-t", "1"],
            },
        },
        server={"port": port, "drain_seconds": 5},
        launchers={
            "llama-server": {
                "command": str(LLAMA),
                "start_timeout_s": 120,
                "restart_delay_s": 0.5,
                "health_interval_s": 0.5,
            }
        },
        routing={"timeouts": {"connect_s": 2, "first_byte_s": 120, "total_s": 300}},
    )
    path = write_config(tmp / "config.yaml", doc)
    log = tmp / "llmd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmd", "serve", "-c", str(path)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    srv = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_two_replicas_on_two_cpu_sets_both_serve(server: Server) -> None:
    reps = [r for r in server.status() if r["model"] == "gemma-3-270m"]
    assert [r["state"] for r in reps] == ["ready", "ready"]
    assert reps[0]["slots"] == 2
    cpus = {tuple(sorted(os.sched_getaffinity(r["pid"]))) for r in reps}
    if (os.cpu_count() or 1) >= 2:
        assert cpus == {(0,), (1,)}
    c = sdk(server)
    for i in range(4):  # distinct prompts spread over both replicas (rendezvous tie-break)
        c.chat.completions.create(
            model="gemma-3-270m",
            max_tokens=2,
            messages=[{"role": "user", "content": f"Conversation {i}: " + "hi " * 60}],
        )
    served = {r["replica"]: r["served"] for r in server.status() if r["model"] == "gemma-3-270m"}
    assert len(served) == 2 and all(n >= 1 for n in served.values()), served


def test_chat_stream_and_include_usage(server: Server) -> None:
    c = sdk(server)
    r = c.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage is not None and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    chunks = list(
        c.chat.completions.create(
            model="gemma-3-270m", messages=[{"role": "user", "content": "Count"}], max_tokens=8, stream=True
        )
    )
    assert chunks and all(ch.usage is None for ch in chunks)  # llmd hid the usage chunk it asked for
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    chunks = list(
        c.chat.completions.create(
            model="gemma-3-270m",
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_completions_and_embeddings(server: Server) -> None:
    c = sdk(server)
    r = c.completions.create(model="gemma-3-270m", prompt="The capital of France is", max_tokens=4)
    assert r.choices[0].text is not None and r.usage is not None and r.usage.completion_tokens > 0
    e = c.embeddings.create(model="gemma-embed", input=["hello world", "goodbye"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 640
    assert e.usage.prompt_tokens > 0


def test_tools_are_relayed_and_answered_in_a_valid_shape(server: Server) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    r = sdk(server).chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools,  # type: ignore[arg-type]
        max_tokens=16,
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.role == "assistant"
    assert choice.message.content is not None or choice.message.tool_calls


def test_json_schema_response_format_is_honoured(server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}},
        "required": ["name"],
        "additionalProperties": False,
    }
    r = sdk(server).chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Give a name as JSON."}],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}},
    )
    doc = json.loads(r.choices[0].message.content or "")
    assert isinstance(doc, dict) and set(doc) == {"name"} and isinstance(doc["name"], str)


def test_kill_9_of_a_replica_during_a_stream(server: Server) -> None:
    """1. A stream starts on some replica. 2. That replica is SIGKILLed after the first chunk.
    3. The client gets a completed stream or a clean error, never a hang. 4. The replica is
    READY again (new pid, restarts + 1) within restart delay + load time, and serves."""
    c = sdk(server)
    stream = c.chat.completions.create(
        model="gemma-3-270m",
        max_tokens=200,
        stream=True,
        messages=[{"role": "user", "content": "Tell a long story " * 5}],
    )
    it = iter(stream)
    next(it)
    busy = [r for r in server.status() if r["model"] == "gemma-3-270m" and r["in_flight"] > 0]
    assert len(busy) == 1
    victim = busy[0]
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        for _ in it:
            pass
        outcome = "completed"
    except openai.APIError as e:
        outcome = f"error: {e}"
    assert time.monotonic() - t0 < 30, outcome
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = {r["replica"]: r for r in server.status()}[victim["replica"]]
        if now["state"] == "ready" and now["pid"] != victim["pid"]:
            break
        time.sleep(0.2)
    assert now["state"] == "ready" and now["restarts"] == victim["restarts"] + 1, now
    recovery = time.monotonic() - t0
    assert recovery < 30
    r = c.chat.completions.create(model="gemma-3-270m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert r.choices


def test_sigkill_of_llmd_leaves_no_llama_server_behind(server: Server) -> None:
    pids = [r["pid"] for r in server.status()]
    assert len(pids) == 3 and all(pids)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    assert not alive, f"llama-server survived llmd: {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False
