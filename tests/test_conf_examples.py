"""The example configs in conf/ stay valid: `llmd check` passes on every file, and the GPU host's
replicas get the GPU sets, tensor-parallel size and slots its comments promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmd import configfile
from llmd.launchers import flag_value, launch_spec, launcher_for

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
EXAMPLES = sorted(CONF.glob("*.yaml")) + sorted(CONF.glob("*.yml"))


def needed_env(path: Path) -> dict[str, str]:
    """Placeholder values for the variables a file reads from the environment (secret_env,
    api_key_env, ${VAR}): `llmd check` refuses a config whose secrets are not set, as it should
    on the host, where systemd's EnvironmentFile provides them."""
    doc = yaml.safe_load(path.read_text()) or {}
    names = {k["secret_env"] for k in doc.get("keys") or [] if k.get("secret_env")}
    names |= {m["api_key_env"] for m in (doc.get("models") or {}).values() if m.get("api_key_env")}
    names |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", path.read_text()))
    return {name: f"placeholder-{name.lower()}" for name in names}


def test_conf_has_the_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"gpu-host.yaml", "cpu-host.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_llmd_check_passes(path: Path) -> None:
    env = {**os.environ, **needed_env(path)}
    r = subprocess.run([sys.executable, "-m", "llmd", "check", str(path)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert ": ok: " in r.stdout


def test_gpu_host_replicas_get_their_gpu_sets_and_tensor_parallel_size(monkeypatch: pytest.MonkeyPatch) -> None:
    path = CONF / "gpu-host.yaml"
    for name, value in needed_env(path).items():
        monkeypatch.setenv(name, value)
    cfg = configfile.load(path)
    vllm = [(name, m) for name, m in cfg.models.items() if m.backend == "vllm"]
    assert vllm, "the GPU example has a vLLM model"
    name, model = vllm[0]
    specs = [launch_spec(name, model, launcher_for(model, cfg.launchers), i, port=9000 + i, environ={})
             for i in range(model.replicas)]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0,1", "2,3"]
    assert all(flag_value(s.argv, ["--tensor-parallel-size"]) == "2" for s in specs)
    assert all(flag_value(s.argv, ["--served-model-name"]) == name for s in specs)
    assert all(s.env["VLLM_HOST_IP"] == "127.0.0.1" for s in specs)
    assert {s.slots for s in specs} == {int(flag_value(model.args, ["--max-num-seqs"]) or 0)}
    # The llama-server models stay off each other's cores.
    cpu_sets = [set(c) for m in cfg.models.values() if m.backend == "llama-server" for c in m.cpus or []]
    assert sum(len(s) for s in cpu_sets) == len(set().union(*cpu_sets))
    # The multi-node model is an upstream llmd routes to, not a child it starts.
    assert any(m.backend == "openai" and m.urls for m in cfg.models.values())


def test_cpu_host_replicas_do_not_share_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    path = CONF / "cpu-host.yaml"
    for name, value in needed_env(path).items():
        monkeypatch.setenv(name, value)
    cfg = configfile.load(path)
    cpu_sets = [set(c) for m in cfg.models.values() for c in m.cpus or []]
    assert len(cpu_sets) >= 3
    assert sum(len(s) for s in cpu_sets) == len(set().union(*cpu_sets))
    assert any("--embeddings" in m.args for m in cfg.models.values())
