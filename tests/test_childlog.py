"""Child output at the level it was written: llama-server's and vLLM's lines parsed, routine
per-request lines at DEBUG unless the model says ``child_log: verbose``.

tests/data/childlog/llama-server.txt is real output of bin/llama-server (start, one chat
request, exit); the vLLM lines are in the forms vLLM 0.x writes (its logger and uvicorn's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from llmd.childlog import ChildLog
from llmd.config import LauncherConfig, ModelConfig
from llmd.launchers import launch_spec
from tests.fakeproc import free_port
from tests.realllmd import MODEL, call, real_llmd

DATA = Path(__file__).resolve().parent / "data" / "childlog"
D, I, W, E = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR  # noqa: E741 (the letters llama-server writes)


def levels(backend: str, lines: list[str], mode: str = "quiet") -> list[int]:
    c = ChildLog(backend)
    return [c.level(line, mode) for line in lines]  # type: ignore[arg-type]


def test_real_llama_server_output() -> None:
    lines = DATA.joinpath("llama-server.txt").read_text().splitlines()
    got = dict(zip(lines, levels("llama-server", lines), strict=True))
    for line, level in got.items():
        if " slot " in line:
            assert level == D, line  # per request: slot chosen, progress, timings, release
        elif " W " in line:
            assert level == W, line  # the security notice and the tokenizer warning
        else:
            assert level == I, line  # start-up: loading, listening
    assert sum(1 for v in got.values() if v == W) == 2 and sum(1 for v in got.values() if v == D) >= 7
    # verbose: the routine lines at INFO, warnings still warnings.
    verbose = levels("llama-server", lines, "verbose")
    assert D not in verbose and verbose.count(W) == 2


def test_llama_server_levels_and_older_bare_format() -> None:
    lines = [
        "0.05.000.000 E srv    operator(): got exception: {\"code\":500}",
        "0.05.000.001 D srv  update_slots: all slots are idle",
        "0.05.000.002 I srv  log_server_r: request: POST /v1/chat/completions 127.0.0.1 200",
        "0.05.000.003 I srv  update_slots: all slots are idle",
        "srv  log_server_r: request: GET /health 127.0.0.1 200",
        "slot launch_slot_: id  0 | task 1 | processing task",
        "main: server is listening on http://127.0.0.1:8080 - starting the main loop",
        "srv    load_model: failed to load model, 'x.gguf'",
        "build: 6000 (abc) with cc for x86_64-linux-gnu",
    ]
    assert levels("llama-server", lines) == [E, D, D, D, D, D, I, E, I]


def test_vllm_lines_and_tracebacks() -> None:
    lines = [
        "(APIServer pid=12) INFO 10-01 12:00:00 [api_server.py:1] vLLM API server version 0.32.0",
        '(APIServer pid=12) INFO:     127.0.0.1:51234 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
        "(APIServer pid=12) INFO 10-01 12:00:01 [loggers.py:123] Engine 000: Avg prompt throughput: 1.0 tokens/s",
        "WARNING 10-01 12:00:00 [cpu.py:100] Pin memory is not supported on CPU.",
        "(EngineCore_DP0 pid=13) ERROR 10-01 12:00:00 [core.py:1] EngineCore failed to start.",
        "(EngineCore_DP0 pid=13) Traceback (most recent call last):",
        '(EngineCore_DP0 pid=13)   File "x.py", line 1, in <module>',
        "(EngineCore_DP0 pid=13) RuntimeError: boom",
        "an unknown line",
        "  indented after an info line",
        "DEBUG 10-01 12:00:00 [x.py:1] detail",
    ]
    assert levels("vllm", lines) == [I, D, D, W, E, E, E, E, I, I, D]
    assert levels("vllm", lines, "verbose")[:3] == [I, I, I]


def test_child_log_is_a_reload_setting_not_a_new_server() -> None:
    """A reload that only changes child_log keeps the process (same identity) and hands the new
    mode to it (ManagedProcess.update takes the spec; _log_line reads it per line)."""
    launcher = LauncherConfig(command="llama-server")
    quiet = launch_spec("m", ModelConfig(backend="llama-server", model="/x.gguf"), launcher, 0)
    loud = launch_spec("m", ModelConfig(backend="llama-server", model="/x.gguf", child_log="verbose"), launcher, 0)
    assert (quiet.child_log, loud.child_log) == ("quiet", "verbose")
    assert quiet.identity() == loud.identity()


@pytest.mark.real
def test_real_llama_server_quiet_by_default(tmp_path: Path) -> None:
    """Two models on the real llama-server, one quiet (the default), one verbose: after a
    request to each, only the verbose one's slot lines are in llmd's INFO log."""
    def model(**extra: object) -> dict[str, object]:
        return {"backend": "llama-server", "model": str(MODEL), "args": ["-c", "2048", "-np", "1", "-t", "1"], **extra}

    doc = {
        "server": {"host": "127.0.0.1", "port": free_port(), "log_format": "json"},
        "usage": {"path": str(tmp_path / "usage.sqlite3")},
        "launchers": {"llama-server": {"command": str(MODEL.parent.parent / "bin" / "llama-server")}},
        "models": {"quiet": model(), "loud": model(child_log="verbose")},
    }
    with real_llmd(tmp_path, doc) as srv:
        for name in ("quiet", "loud"):
            body = {"model": name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            assert call(srv.url + "/v1/chat/completions", body)[0] == 200
        records = []
        for line in srv.log.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    child = [r for r in records if r.get("logger") == "llmd.replica"]
    slot = [r for r in child if " slot " in r["msg"] or r["msg"].startswith("slot ")]
    assert {r["replica"] for r in slot} == {"loud/0"}, "the quiet model's slot lines reached INFO"
    assert all(r["level"] == "info" for r in slot) and len(slot) >= 4
    # Start-up lines and warnings of both are there.
    for name in ("quiet/0", "loud/0"):
        mine = [r for r in child if r["replica"] == name]
        assert any("model loaded" in r["msg"] and r["level"] == "info" for r in mine), name
        assert any(r["level"] == "warning" for r in mine), name
