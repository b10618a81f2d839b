"""Progress of the long shell steps (packaging/progress.sh): `make run` on a clean cache builds
llama-server for minutes, and must say so. packaging/build-llama-server.sh runs here against an
empty cache (LLMD_CACHE in tmp_path) whose llama.cpp source is a stand-in, with a stub cmake
(CMAKE=...) that configures at once and "compiles" printing make's `[ NN%]` lines, as the real
build does, then leaves a llama-server that answers --version."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "packaging" / "build-llama-server.sh"
VERSION = re.search(r"^LCP_VERSION=(\S+)$", SCRIPT.read_text(), re.M).group(1)  # type: ignore[union-attr]

STUB_CMAKE = """#!/usr/bin/env bash
set -e
if [ "$1" = "--build" ]; then
  build=$2
  for pct in 3 25 50 75 99 100; do
    echo "[ $pct%] Building CXX object tools/server/CMakeFiles/llama-server.dir/server.cpp.o"
    [ -n "$STUB_FAIL_AT" ] && [ "$pct" -ge "$STUB_FAIL_AT" ] && { echo "c++: fatal error: killed" >&2; exit 2; }
    sleep 0.4
  done
  mkdir -p "$build/bin"
  printf '#!/bin/sh\\necho "version: 0 (stub)"\\n' >"$build/bin/llama-server"
  chmod +x "$build/bin/llama-server"
else
  echo "-- Configuring done"
  echo "-- Generating done"
fi
"""


def cache_with_source(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    cache = tmp_path / "cache"
    src = cache / "build" / f"llama-cpp-python-{VERSION}" / "src"
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("project(stub)\n")
    cmake = tmp_path / "cmake"
    cmake.write_text(STUB_CMAKE)
    cmake.chmod(0o755)
    env = {**os.environ, "LLMD_CACHE": str(cache), "CMAKE": str(cmake), "CCACHE_DIR": str(tmp_path / "ccache"),
           "LLMD_PROGRESS_TICK_S": "0.1", "LLMD_PROGRESS_EVERY_S": "0"}
    return cache, env


def build(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    # Bytes, decoded here: text mode would turn the TTY redraw's "\r" into a newline.
    r = subprocess.run(["bash", str(SCRIPT)], env={**env, **extra}, capture_output=True, timeout=60)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def test_build_shows_one_line_per_step_and_percentages_off_a_tty(tmp_path: Path) -> None:
    cache, env = cache_with_source(tmp_path)
    r = build(env, LLMD_PROGRESS_TTY="0")
    assert r.returncode == 0, r.stderr
    binary = cache / "llama-server" / VERSION / "bin" / "llama-server"
    assert r.stdout.splitlines()[-1] == str(binary) and binary.is_file()
    lines = r.stderr.splitlines()
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
    assert lines[0] == "llama-server: configuring (cmake): started"
    assert re.fullmatch(r"llama-server: configuring \(cmake\): done in \d+\.\d s", lines[1])
    compiling = "llama-server: compiling (cold: ~10 min; ccache: ~2 min)"
    assert lines[2] == f"{compiling}: started"
    assert re.fullmatch(re.escape(compiling) + r": done, 100% in \d+\.\d s", lines[-1])
    # While it runs: the percentage as make reports it, with the time so far, only when it moved.
    middle = [re.fullmatch(re.escape(compiling) + r": (\d+)%, (\d+\.\d) s", line) for line in lines[3:-1]]
    assert middle and all(middle), lines
    pcts = [int(m.group(1)) for m in middle if m]
    assert pcts == sorted(set(pcts)) and pcts[0] < 100
    # Cached: a second run says nothing and prints the path.
    again = build(env, LLMD_PROGRESS_TTY="0")
    assert again.returncode == 0 and again.stderr == "" and again.stdout.strip() == str(binary)


def test_build_redraws_one_line_on_a_tty(tmp_path: Path) -> None:
    _, env = cache_with_source(tmp_path)
    r = build(env, LLMD_PROGRESS_TTY="1")
    assert r.returncode == 0, r.stderr
    redraws = [chunk for chunk in r.stderr.split("\r\x1b[2K") if chunk.startswith("llama-server: compiling")]
    assert len(redraws) >= 3
    assert re.match(r"llama-server: compiling \(cold: ~10 min; ccache: ~2 min\)  \d+%  \d+\.\d s", redraws[1])
    assert "compiling (cold: ~10 min; ccache: ~2 min): done, 100% in " in r.stderr.splitlines()[-1]
    assert ": started" not in r.stderr  # a TTY gets the redrawn line instead


def test_failed_build_says_where_and_shows_the_log_tail(tmp_path: Path) -> None:
    cache, env = cache_with_source(tmp_path)
    r = build(env, LLMD_PROGRESS_TTY="0", STUB_FAIL_AT="50")
    assert r.returncode == 1
    assert re.search(r"compiling \(cold: ~10 min; ccache: ~2 min\): failed \(exit 2\) after \d+\.\d s; log: ", r.stderr)
    assert "c++: fatal error: killed" in r.stderr  # the log's tail follows
    assert not (cache / "llama-server" / VERSION / "bin" / "llama-server").exists()


def test_count_and_size_measures(tmp_path: Path) -> None:
    """What setup.sh (pip's "Collecting" lines, the model file growing) and setup-vllm.sh use."""
    part = tmp_path / "model.part"
    script = f"""
. {ROOT}/packaging/progress.sh
progress_run "pip" {tmp_path}/pip.log "count:^Collecting :packages" -- \\
  sh -c 'echo Collecting a; sleep 0.3; echo Collecting b; echo Installing; sleep 0.3'
progress_run "model" {tmp_path}/model.log "size:{part}" -- \\
  sh -c 'head -c 3145728 /dev/zero >{part}; sleep 0.3'
"""
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "LLMD_PROGRESS_TTY": "0", "LLMD_PROGRESS_TICK_S": "0.1"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "pip: started" and re.fullmatch(r"pip: done, 2 packages in \d+\.\d s", lines[1])
    assert lines[2] == "model: started" and re.fullmatch(r"model: done, 3 MB in \d+\.\d s", lines[3])
