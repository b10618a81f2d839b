"""config.yaml parsing: every error is reported with its YAML path; defaults; the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from llmd import config, configfile

ROOT = Path(__file__).resolve().parent.parent

BROKEN = """
server:
  port: 99999
  hots: 1.2.3.4
tiers:
  std: {requests_per_minute: 0, priority: x}
models:
  m1:
    backend: llama-server
    replicas: 0
  m2:
    backend: openai
    urls: [http://127.0.0.1:1/v1]
    bogus: 1
  m3: {backend: foo}
routing: {strategy: random, timeouts: {connect_s: -1}}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(config.ConfigError) as e:
        configfile.parse(text, "t.yaml")
    return e.value.errors


def test_every_structural_error_is_listed_with_its_path() -> None:
    errs = errors_of(BROKEN)
    expected = [
        "server.port: must be <= 65535, got 99999",
        "server.hots: unknown key",
        "tiers.std.requests_per_minute: must be >= 1, got 0",
        "tiers.std.priority: expected an integer or null, got 'x'",
        "models.m1.replicas: must be >= 1, got 0",
        "models.m2.bogus: unknown key",
        "models.m3.backend: expected one of 'llama-server', 'vllm', 'openai', got 'foo'",
        "routing.strategy: expected one of 'prefix-affinity', 'least-loaded', 'round-robin', got 'random'",
        "routing.timeouts.connect_s: must be > 0.0, got -1",
    ]
    for want in expected:
        assert any(e.startswith(want) for e in errs), (want, errs)
    assert len(errs) == len(expected)


def test_semantic_errors_are_listed_together() -> None:
    errs = errors_of(
        """
tiers: {std: {requests_per_minute: 5}}
keys:
  - {id: a, tier: nope, secret: hunter2}
  - {id: b, sha256: zz}
  - {id: b, secret_env: LLMD_TEST_UNSET_VAR}
models:
  m1: {backend: llama-server, model: x.gguf, replicas: 2, cpus: [[0]]}
  m2: {backend: openai, urls: [ftp://x], aliases: [m1]}
  m3: {backend: vllm}
"""
    )
    joined = "\n".join(errs)
    assert "keys[0].tier: unknown tier 'nope'" in joined
    assert "keys[0].secret: plain secrets are not allowed" in joined and "sha256sum" in joined
    assert "hunter2" not in joined  # the secret itself is never echoed
    assert "keys[1].sha256: expected 64 hex digits" in joined
    assert "keys[2].id: duplicate key id 'b'" in joined
    assert "keys[2].secret_env: environment variable LLMD_TEST_UNSET_VAR is not set" in joined
    assert "models.m1.cpus: expected one set per replica (2), got 1" in joined
    assert "models.m2.urls[0]: expected an http(s) URL" in joined
    assert "models.m2: name 'm1' is already used by models.m1" in joined
    assert "models.m3.model: required for backend vllm" in joined


def test_defaults_env_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMD_TEST_PORT", "8123")
    p = tmp_path / "c.yaml"
    p.write_text(
        """
server: {port: "${LLMD_TEST_PORT}"}
usage: {path: ./u.sqlite3}
models:
  g: {backend: llama-server, model: ./m.gguf, aliases: [gpt-4o-mini]}
"""
    )
    cfg = configfile.load(p)
    assert cfg.server.port == 8123
    assert cfg.server.host == "127.0.0.1"
    assert cfg.server.max_body_bytes == 8 * 1024 * 1024
    assert cfg.usage.path == str(tmp_path / "u.sqlite3")
    assert cfg.models["g"].model == str(tmp_path / "m.gguf")
    assert cfg.model_names() == {"g": "g", "gpt-4o-mini": "g"}
    assert cfg.routing.strategy == "prefix-affinity"
    assert cfg.launchers.llama_server.command == "llama-server"


def test_yaml_syntax_error_names_the_line() -> None:
    errs = errors_of("models:\n  a: [1, 2\n")
    assert errs[0].startswith("line ")


def test_default_config_is_valid() -> None:
    cfg = configfile.load(ROOT / "config.yaml")
    assert "gemma-3-270m" in cfg.models
    assert cfg.server.host == "127.0.0.1"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmd", *args], capture_output=True, text=True, cwd=ROOT)


def test_llmd_check_lists_all_errors_and_exits_1(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(BROKEN)
    r = run_cli("check", "-c", str(p))
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith(f"{p}: ") and "error(s)" not in line]
    assert len(lines) == 9, r.stderr
    assert f"{p}: server.port: must be <= 65535, got 99999" in r.stderr


def test_llmd_check_ok_prints_one_line_summary() -> None:
    r = run_cli("check", "-c", str(ROOT / "config.yaml"))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1
    assert ": ok: 2 model(s)" in r.stdout


def test_llmd_version_and_module_entry_point() -> None:
    r = run_cli("version")
    assert r.returncode == 0 and r.stdout.startswith("llmd ")


def test_keys_new_output_pasted_into_config_authenticates(tmp_path: Path) -> None:
    from llmd.auth import KeyTable, hash_secret

    r = run_cli("keys", "new", "alice", "--tier", "std")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    secret = next(line for line in lines if line.startswith("sk-"))
    assert len(secret) >= 3 + 43  # 256 bits, base64url
    entry = "\n".join(line for line in lines if line.startswith("  "))
    cfg = configfile.parse(
        f"tiers: {{std: {{}}}}\nkeys:\n{entry}\nmodels: {{m: {{backend: openai, urls: [http://x/v1]}}}}\n"
    )
    table = KeyTable(cfg)
    assert cfg.keys[0].sha256 == hash_secret(secret)
    assert table.principals()[0].key_id == "alice"


def test_flags_llmd_sets_itself_are_refused_at_check_time() -> None:
    errs = errors_of("models:\n  g: {backend: llama-server, model: m.gguf, args: ['--port', '9000']}\n")
    assert any(e.startswith("models.g.args: --port is set by llmd") for e in errs), errs


def _llmd_imports(path: Path) -> set[str]:
    """The llmd modules a module imports, at any depth of its code (late imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.module == "llmd":
                names.update(a.name for a in node.names)
            elif node.module and node.module.startswith("llmd."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("llmd."))
    return names - {"__version__"}


def test_llmd_has_no_import_cycles_and_config_is_its_bottom() -> None:
    """1. Every module's llmd imports, late ones included, form a graph without cycles.
    2. config.py and decode.py import nothing of llmd, so any module may import them."""
    graph = {p.stem: _llmd_imports(p) for p in (ROOT / "llmd").glob("*.py")}
    assert graph["config"] == set() and graph["decode"] == set()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
