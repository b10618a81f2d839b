"""systemd/: the unit, its GPU drop-in, sysusers and tmpfiles, checked by systemd's own tools.

systemd-analyze, systemd-sysusers and systemd-tmpfiles all work offline (no
PID 1 systemd needed); they come with Debian's `systemd` package, which CI
installs. A missing tool fails with that hint rather than skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llmd.config import ServerConfig

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "llm-api.service"
GPU_DROP_IN = SYSTEMD_DIR / "gpu-host.conf"
EXEC_START = "/usr/bin/llmd serve -c /etc/llm-api/config.yaml"
MAX_EXPOSURE = 2.0


def require_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} not found: install it with `apt-get install -y systemd`", pytrace=False)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def directives(path: Path) -> dict[str, list[str]]:
    """Key -> values in file order (systemd keys may repeat, so not configparser)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def install(tmp_path: Path, *, drop_in: bool, exec_start: str | None = None) -> Path:
    """Copy the unit (and optionally gpu-host.conf as its drop-in) into tmp_path.

    A private copy keeps analyses independent of whatever is installed on the
    machine running the tests; systemd-analyze reads drop-ins from
    <unit>.d/ next to a unit given by path.
    """
    text = UNIT.read_text()
    if exec_start is not None:
        text, replaced = re.subn(r"^ExecStart=/usr/bin/llmd ", f"ExecStart={exec_start} ", text, flags=re.M)
        assert replaced == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    if drop_in:
        (tmp_path / f"{UNIT.name}.d").mkdir()
        shutil.copy(GPU_DROP_IN, tmp_path / f"{UNIT.name}.d" / GPU_DROP_IN.name)
    return unit


def exposure(unit: Path) -> tuple[float, str]:
    analyze = require_tool("systemd-analyze")
    result = run(analyze, "security", "--offline=true", "--no-pager", str(unit))
    # Unknown keys and bad values are reported on stderr, and a directive
    # that was ignored scores as if absent: both are failures here.
    assert result.returncode == 0 and result.stderr == "", result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1)), result.stdout


def test_security_exposure(tmp_path: Path) -> None:
    score, report = exposure(install(tmp_path, drop_in=False))
    assert score <= MAX_EXPOSURE, report


def test_security_exposure_with_gpu_drop_in(tmp_path: Path) -> None:
    score, report = exposure(install(tmp_path, drop_in=True))
    assert "char-nvidia-uvm:rw" in report, "the drop-in was not applied"
    assert score <= MAX_EXPOSURE, report


@pytest.mark.parametrize("drop_in", [False, True], ids=["cpu", "gpu"])
def test_verify(tmp_path: Path, drop_in: bool) -> None:
    """`systemd-analyze verify` is clean.

    verify insists that ExecStart= names an existing executable, and
    /usr/bin/llmd exists only where the package is installed. So the copy
    under test differs in that one path, pointing at a stub; every other
    line, ExecReload's /bin/sh included, is verified as written.
    """
    analyze = require_tool("systemd-analyze")
    stub = tmp_path / "llmd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = install(tmp_path, drop_in=drop_in, exec_start=str(stub))
    result = run(analyze, "verify", "--man=no", str(unit))
    # verify exits 0 even for unknown keys; those land on stderr.
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stdout + result.stderr


def test_unit_contract() -> None:
    """The directives DESIGN.md and llmd's signal handling depend on."""
    unit = directives(UNIT)
    assert unit["ExecStart"] == [EXEC_START]
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    # dash's builtin, not /bin/kill (procps, absent from minimal images): see test_systemd_boot.py.
    assert unit["ExecReload"] == ["/bin/sh -c 'kill -HUP ${MAINPID}'"]
    assert unit["KillMode"] == ["mixed"]
    assert unit["User"] == unit["Group"] == ["llm-api"]
    assert unit["StateDirectory"] == unit["ConfigurationDirectory"] == ["llm-api"]
    # systemd must not SIGKILL a daemon that is still draining.
    assert float(unit["TimeoutStopSec"][0]) > ServerConfig().drain_seconds + 10
    assert int(unit["WatchdogSec"][0]) >= 10


def test_sysusers(tmp_path: Path) -> None:
    sysusers = require_tool("systemd-sysusers")
    # --root makes it read and (would) write tmp_path/etc, never the host's.
    result = run(sysusers, "--dry-run", f"--root={tmp_path}", str(SYSTEMD_DIR / "llm-api.sysusers"))
    assert result.returncode == 0, result.stderr
    assert "Creating user 'llm-api'" in result.stdout + result.stderr
    # The home must be the state directory: vllm and triton cache in ~/.cache,
    # and ProtectSystem=strict leaves no other writable place.
    (entry,) = [
        line.split(None, 4) for line in (SYSTEMD_DIR / "llm-api.sysusers").read_text().splitlines()
        if line.startswith("u ")
    ]  # fmt: skip
    assert entry[1] == "llm-api"
    assert entry[4].endswith(f"/var/lib/{directives(UNIT)['StateDirectory'][0]}")


def test_tmpfiles(tmp_path: Path) -> None:
    """tmpfiles.d creates the state and models directories with the intended modes.

    1. An alternate root gets a passwd/group in which root and llm-api are
       both the invoking user, so the chowns succeed without privileges.
    2. systemd-tmpfiles --create applies the file under that root.
    3. The modes are checked; ownership is what step 1 made it.
    """
    tmpfiles = require_tool("systemd-tmpfiles")
    uid, gid = os.getuid(), os.getgid()
    etc = tmp_path / "etc"
    (etc / "llm-api").mkdir(parents=True)
    (etc / "passwd").write_text(
        f"root:x:{uid}:{gid}::/root:/bin/sh\nllm-api:x:{uid}:{gid}::/var/lib/llm-api:/bin/false\n"
    )
    (etc / "group").write_text(f"root:x:{gid}:\nllm-api:x:{gid}:\n")
    (etc / "llm-api" / "config.yaml").write_text("models: {}\n")

    result = run(tmpfiles, f"--root={tmp_path}", "--create", str(SYSTEMD_DIR / "llm-api.tmpfiles"))
    assert result.returncode == 0 and result.stderr == "", result.stderr

    def mode(relative: str) -> int:
        return (tmp_path / relative).stat().st_mode & 0o7777

    assert mode("var/lib/llm-api") == 0o750
    assert mode("var/lib/llm-api/models") == 0o750
    assert mode("etc/llm-api/config.yaml") == 0o640
    # "z" only adjusts files that exist; the optional env file is not created.
    assert not (etc / "llm-api" / "env").exists()


def test_verify_with_local_stores_drop_in(tmp_path: Path) -> None:
    """systemd/local-stores.conf (ordering after local PostgreSQL and Redis) verifies clean and
    changes nothing of the sandbox: same exposure as the unit alone."""
    analyze = require_tool("systemd-analyze")
    stub = tmp_path / "llmd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = install(tmp_path, drop_in=False, exec_start=str(stub))
    (tmp_path / f"{UNIT.name}.d").mkdir()
    shutil.copy(SYSTEMD_DIR / "local-stores.conf", tmp_path / f"{UNIT.name}.d" / "local-stores.conf")
    result = run(analyze, "verify", "--man=no", str(unit))
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stdout + result.stderr
    assert exposure(unit)[0] <= MAX_EXPOSURE
    found = directives(SYSTEMD_DIR / "local-stores.conf")
    assert found["After"] == ["postgresql.service redis-server.service"]
