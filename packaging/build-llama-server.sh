#!/usr/bin/env bash
# Build llama.cpp's llama-server (and nothing else) from the llama.cpp source that the
# pinned llama-cpp-python sdist on PyPI vendors. The result is cached per version under
# ${LLMD_CACHE:-~/.cache/llmd}/llama-server/<version>/bin/llama-server, so a second run is instant.
#
# Usage: packaging/build-llama-server.sh   (prints the binary's path on its last line; progress
# of each step on stderr: packaging/progress.sh)
# Needs: cmake, a C++ compiler, pip; uses ccache when present (a rebuild then takes ~2 min).
#   CMAKE=cmake              the cmake to run (tests/test_progress_scripts.py runs a stub)
set -euo pipefail
. "$(dirname "$0")/progress.sh"
cmake=${CMAKE:-cmake}

# Pinned source: bump both together; the hash is checked before anything is unpacked.
LCP_VERSION=0.3.36
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

cache=${LLMD_CACHE:-$HOME/.cache/llmd}
prefix=$cache/llama-server/$LCP_VERSION
bin=$prefix/bin/llama-server
if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

work=$cache/build/llama-cpp-python-$LCP_VERSION
mkdir -p "$cache/sdist" "$work"
src=$work/src
if [ ! -f "$src/CMakeLists.txt" ]; then
  sdist=$cache/sdist/llama_cpp_python-$LCP_VERSION.tar.gz
  if [ ! -f "$sdist" ] || ! echo "$LCP_SHA256  $sdist" | sha256sum -c --status; then
    tmp=$(mktemp -d)
    fetch() {
      ${PIP:-python3 -m pip} download --quiet --no-deps --no-binary :all: --no-build-isolation \
        -d "$tmp" "llama-cpp-python==$LCP_VERSION" 2>/dev/null ||
        ${PIP:-python3 -m pip} download --quiet --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LCP_VERSION"
    }
    progress_run "llama-server: downloading llama-cpp-python $LCP_VERSION source" "$work/download.log" "" -- fetch
    mv "$tmp"/llama_cpp_python-$LCP_VERSION.tar.gz "$sdist"
    rm -rf "$tmp"
  fi
  echo "$LCP_SHA256  $sdist" | sha256sum -c --status || { echo "sha256 mismatch for $sdist" >&2; exit 1; }
  rm -rf "$src" && mkdir -p "$src"
  progress_run "llama-server: unpacking llama.cpp" "$work/unpack.log" "" -- \
    tar xzf "$sdist" -C "$src" --strip-components=3 "llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
fi

launcher=()
if command -v ccache >/dev/null 2>&1; then
  export CCACHE_DIR=${CCACHE_DIR:-$cache/ccache}
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi

# Portable CPU flags (GGML_NATIVE=OFF with runtime CPU feature dispatch where the
# ggml version supports it), static, no tests/examples, no web UI download, no OpenSSL.
: >"$work/cmake.log"
progress_run "llama-server: configuring (cmake)" "$work/cmake.log" "" -- \
  "$cmake" -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  "${launcher[@]}" || { tail -50 "$work/cmake.log" >&2; exit 1; }
: >"$work/build.log"
progress_run "llama-server: compiling (cold: ~10 min; ccache: ~2 min)" "$work/build.log" percent -- \
  "$cmake" --build "$work/build" --target llama-server -j "$(nproc)" || { tail -50 "$work/build.log" >&2; exit 1; }

mkdir -p "$prefix/bin"
install -m 0755 "$work/build/bin/llama-server" "$bin.tmp"
mv "$bin.tmp" "$bin"
"$bin" --version >/dev/null 2>&1
echo "$bin"
