"""The fake llama-server against the real one, in the same run, on the routes llmd relays besides
chat, completions and embeddings: every request of capture_routes.CAPTURES goes to a real
llama-server (Gemma 3 270M; a --jinja chat server and a --reranking one) and to the fake started
with the same flags; status, content type and shapes (JSON keys and value types, recursively; SSE
event names, order and data shapes) must be equal, and error type, code and message too.

Two real servers, one thread each, for the module (~10 s to load on 2 cores); the requests ask
for few tokens at temperature 0.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.capture_routes import CAPTURES, LLAMA_VSCODE_INFILL, Capture, exchange
from tests.fakeproc import free_port
from tests.routeshapes import Answer, answer_gaps
from tests.test_fake_routes import FAKE_ARGS, start_fakes, stop_fakes

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "bin" / "llama-server"
MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
# the real servers' flags (the fakes get the same, see FAKE_ARGS, plus --no-fim for the chat one)
REAL_ARGS: dict[str, list[str]] = {
    "chat": ["--jinja", "-c", "2048", "-np", "2", "-t", "1"],
    "rerank": ["--reranking", "-c", "1024", "-np", "1", "-t", "1"],
}


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"llama-server at {url} not healthy:\n" + log.read_text()[-3000:])


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    assert LLAMA.exists() and MODEL.exists(), "run `make setup` (packaging/setup.sh) first"
    tmp = tmp_path_factory.mktemp("real-routes")
    procs: list[tuple[subprocess.Popen[bytes], str, Path]] = []
    urls: dict[str, str] = {}
    try:
        for kind, args in REAL_ARGS.items():
            port = free_port()
            log = tmp / f"{kind}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    ["nice", str(LLAMA), "-m", str(MODEL), *args, "--host", "127.0.0.1", "--port", str(port)],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            urls[kind] = f"http://127.0.0.1:{port}"
            procs.append((proc, urls[kind], log))
        for proc, url, log in procs:
            wait_healthy(url, proc, log)
        yield urls
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def fakes(real: dict[str, str]) -> Iterator[dict[str, str]]:
    started, procs = start_fakes(FAKE_ARGS)
    try:
        yield {kind: fake.url for kind, fake in started.items()}
    finally:
        stop_fakes(procs)


def ask(base: str, capture: Capture) -> Answer:
    status, _, headers, body = exchange(base, capture.method, capture.path, capture.body)
    content_type = dict((k.lower(), v) for k, v in headers).get("content-type", "").split(";")[0]
    return Answer(status, content_type, body)


LIVE = [c for c in CAPTURES if c.live]


@pytest.mark.parametrize("capture", LIVE, ids=[c.name for c in LIVE])
def test_fake_answers_in_the_real_ones_shapes(real: dict[str, str], fakes: dict[str, str], capture: Capture) -> None:
    real_answer = ask(real[capture.server], capture)
    fake_answer = ask(fakes[capture.server], capture)
    gaps = answer_gaps(real_answer, fake_answer, compare_message="malformed" not in capture.name)
    assert not gaps, f"{capture.name}:\n" + "\n".join(gaps) + f"\nreal: {real_answer.body[:600]!r}"


def test_fake_infill_with_fim_is_the_real_completions_shape(real: dict[str, str], fakes: dict[str, str]) -> None:
    """The real model has no FIM tokens, so a FIM answer is compared with what llama.cpp builds
    it from: /completion's answer, with and without llama.vscode's response_fields."""
    for fields in (LLAMA_VSCODE_INFILL["response_fields"], None):
        body = {**LLAMA_VSCODE_INFILL, "response_fields": fields} if fields else {
            k: v for k, v in LLAMA_VSCODE_INFILL.items() if k != "response_fields"}
        completion = {"prompt": "def add(a, b):", "n_predict": 8, "temperature": 0,
                      **({"response_fields": fields} if fields else {})}
        real_answer = ask(real["chat"], Capture("completion", "chat", "POST", "/completion", completion))
        fake_answer = ask(fakes["fim"], Capture("infill", "fim", "POST", "/infill", body))
        gaps = answer_gaps(real_answer, fake_answer)
        assert not gaps, "\n".join(gaps)
        assert fields is None or set(json.loads(fake_answer.body)) == set(fields)
