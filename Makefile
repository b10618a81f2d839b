# The project's front door: `make run` and `make test` work on a fresh Debian 12 machine
# with Python 3.11, cmake and a C++ compiler (see .ci/run for the apt packages).
.PHONY: setup setup-vllm run test test-fast test-real lint bench package

setup:
	bash packaging/setup.sh

# The real vLLM for CPUs in its own venv, cached in ~/.cache/llmd (cold ~2-3 min, 3.5 GB; then instant).
setup-vllm:
	bash packaging/setup-vllm.sh >/dev/null

run: setup
	.venv/bin/llmd serve -c config.yaml

# Fake-backend tests in parallel (2 workers), then the few real llama-server tests serially,
# the .deb booted under a real systemd among them (tests/test_systemd_boot.py: root, a
# systemd-nspawn container of Debian 12 minbase cached in ~/.cache/llmd, ~1 min cold).
test: setup setup-vllm
	.venv/bin/python -m pytest -q -n 2 -m "not real"
	.venv/bin/python -m pytest -q -m real -p no:xdist

test-fast: setup
	.venv/bin/python -m pytest -q -n 2 -m "not real"

test-real: setup setup-vllm
	.venv/bin/python -m pytest -q -m real -p no:xdist

lint:
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python bench/relay_bench.py

# dist/llmd (single file, shiv) and dist/llm-api_<version>_<arch>.deb
package: setup
	bash packaging/build.sh
