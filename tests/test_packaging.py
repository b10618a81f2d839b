"""packaging/build.sh: the single-file dist/llmd and the llm-api .deb, tested as ops would use them.

The build runs once per test run (a module fixture; under xdist the workers share one build through
a lock and a stamp that names the run and a hash of every input). Nothing here is skipped: a
missing tool fails with the apt package to install.

dist/llmd is always run through its shebang, /usr/bin/python3 (Debian 12's Python 3.11), in an
environment without the venv (no VIRTUAL_ENV, PYTHONPATH or .venv/bin on PATH), as it runs on a
host that only has the .deb installed. The .deb is not installed here: `dpkg-deb -x` unpacks it into
a temporary directory and the unpacked /usr/bin/llmd checks the unpacked /etc/llm-api/config.yaml.
The maintainer scripts run for real, as copies whose system paths point into a temporary directory
and with every system command (systemctl, deb-systemd-*, systemd-sysusers, ...) a stub that logs
its arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from llmd import __version__
from tests.fakeproc import FAKE_LLAMA, free_port, start_fake

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "packaging" / "build.sh"
DEB_DIR = ROOT / "packaging" / "deb"
SYSTEM_PYTHON = Path("/usr/bin/python3")
# Everything the artifacts are made from: a change to any of them means a new build.
INPUT_GLOBS = ("llmd/**/*.py", "pyproject.toml", "README.md", "packaging/build.sh", "packaging/deb/**/*",
               "systemd/*", "nginx/*", "conf/*.yaml")
BUILD_TIMEOUT_S = 900  # a first build downloads the wheels; later ones take ~30 s

# Where the .deb puts each file; dpkg-deb --contents lists them with a leading "./".
EXPECTED_FILES = {
    "usr/bin/llmd": 0o755,
    "lib/systemd/system/llm-api.service": 0o644,
    "lib/systemd/system/llm-api.service.d/shiv.conf": 0o644,
    "usr/lib/sysusers.d/llm-api.conf": 0o644,
    "usr/lib/tmpfiles.d/llm-api.conf": 0o644,
    "etc/llm-api/config.yaml": 0o644,
    "etc/nginx/sites-available/llm-api.conf": 0o644,
    "usr/share/doc/llm-api/README.md": 0o644,
    "usr/share/doc/llm-api/README.Debian": 0o644,
    "usr/share/doc/llm-api/copyright": 0o644,
    "usr/share/doc/llm-api/changelog.Debian.gz": 0o644,
    "usr/share/doc/llm-api/examples/gpu-host.conf": 0o644,
    "usr/share/doc/llm-api/examples/local-stores.conf": 0o644,
    "usr/share/man/man1/llmd.1.gz": 0o644,
    "usr/share/lintian/overrides/llm-api": 0o644,
}
# Packaged verbatim from the repository: the .deb must not carry a stale or edited copy.
VERBATIM = {
    "lib/systemd/system/llm-api.service": "systemd/llm-api.service",
    "usr/lib/sysusers.d/llm-api.conf": "systemd/llm-api.sysusers",
    "usr/lib/tmpfiles.d/llm-api.conf": "systemd/llm-api.tmpfiles",
    "etc/nginx/sites-available/llm-api.conf": "nginx/llm-api.conf",
    "etc/llm-api/config.yaml": "packaging/deb/config.yaml",
    "usr/share/doc/llm-api/examples/gpu-host.conf": "systemd/gpu-host.conf",
    "usr/share/doc/llm-api/examples/local-stores.conf": "systemd/local-stores.conf",
}


def need(tool: str, apt: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; the packaging tests need it: apt-get install {apt}")
    return path


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a host without this checkout's venv: system PATH only, no PYTHON* vars."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
    }
    # pip's settings of this machine (index, certificates, timeouts) still apply to build.sh.
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_") or k == "SOURCE_DATE_EPOCH"})
    env.update(extra)
    return env


def inputs_digest() -> str:
    h = hashlib.sha256()
    for pattern in INPUT_GLOBS:
        for p in sorted(ROOT.glob(pattern)):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Artifacts:
    llmd: Path
    deb: Path
    build_log: str
    shiv_root: Path  # shared by the tests, so the zipapp is unpacked once
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(self.home, SHIV_ROOT=str(self.shiv_root), **extra)


def _check_system_python() -> None:
    if not SYSTEM_PYTHON.exists():
        pytest.fail(f"{SYSTEM_PYTHON} is missing: dist/llmd runs with the system Python 3.11 (apt-get install python3)")
    out = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, check=True, env=clean_env(Path("/tmp")))
    if out.stdout.strip() != "(3, 11)":
        pytest.fail(f"{SYSTEM_PYTHON} is Python {out.stdout.strip()}, not 3.11 (Debian 12's); "
                    "the .deb depends on python3 (>= 3.11), python3 (<< 3.12)")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """dist/llmd and dist/llm-api_*.deb, built by packaging/build.sh once in this test run.

    xdist workers each run this fixture: the first one builds under an exclusive lock and writes a
    stamp (this run's id + a digest of the inputs); the others find the stamp and reuse the files.
    A stamp from an earlier run, or from before an input changed, does not count."""
    need("dpkg-deb", "dpkg")
    _check_system_python()
    build_dir = ROOT / "build"
    build_dir.mkdir(exist_ok=True)
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"solo-{os.getpid()}-{uuid.uuid4().hex}"
    stamp_path = build_dir / ".test-packaging.stamp"
    home = tmp_path_factory.mktemp("home")
    with open(build_dir / ".test-packaging.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        want = {"run": run_id, "inputs": inputs_digest()}
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            stamp = {}
        if {k: stamp.get(k) for k in want} == want and all(Path(p).exists() for p in (stamp["llmd"], stamp["deb"])):
            llmd, deb, log = Path(stamp["llmd"]), Path(stamp["deb"]), stamp["log"]
        else:
            stamp_path.unlink(missing_ok=True)
            t0 = time.monotonic()
            # LINTIAN=no: test_lintian runs it once, with its own message when it is missing.
            proc = subprocess.run(["bash", str(BUILD_SH)], cwd=ROOT, capture_output=True, text=True,
                                  env=clean_env(home, LINTIAN="no"), timeout=BUILD_TIMEOUT_S)
            log = proc.stderr + proc.stdout
            assert proc.returncode == 0, f"packaging/build.sh failed ({proc.returncode}):\n{log[-6000:]}"
            lines = proc.stdout.strip().splitlines()
            llmd, deb = Path(lines[-2]), Path(lines[-1])
            log += f"\n(built in {time.monotonic() - t0:.0f} s)"
            stamp_path.write_text(json.dumps({**want, "llmd": str(llmd), "deb": str(deb), "log": log}))
    return Artifacts(llmd, deb, log, tmp_path_factory.mktemp("shiv"), home)


@pytest.fixture(scope="module")
def unpacked(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb's files, unpacked with `dpkg-deb -x` (no maintainer scripts, no root needed)."""
    root = tmp_path_factory.mktemp("debroot")
    subprocess.run(["dpkg-deb", "-x", str(artifacts.deb), str(root)], check=True)
    return root


def run(cmd: list[str | Path], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


# ---- dist/llmd ------------------------------------------------------------------------------------


def test_dist_llmd_is_one_executable_for_the_system_python(artifacts: Artifacts) -> None:
    data = artifacts.llmd.read_bytes()
    assert data.startswith(b"#!/usr/bin/python3\n"), data[:40]
    assert artifacts.llmd.stat().st_mode & stat.S_IXUSR
    import zipfile

    with zipfile.ZipFile(artifacts.llmd) as z:
        names = z.namelist()
        env = json.loads(z.read("environment.json"))
    assert env["entry_point"] == "llmd.cli:main"
    # The compiled dependencies are inside, as wheels for this platform and Python 3.11.
    for pkg in ("aiohttp", "uvloop", "msgspec", "prometheus_client", "aiosqlite", "yaml", "aiohttp_sse", "httptools"):
        assert any(n.startswith(f"site-packages/{pkg}/") for n in names), f"{pkg} is not bundled"
    assert any(n.startswith("site-packages/llmd/") for n in names), "llmd is not bundled"
    assert any(re.match(r"site-packages/uvloop/loop\.cpython-311-[^/]*\.so$", n) for n in names)
    # No leftovers of the build venv (console scripts with its path in the shebang).
    assert not any(n.startswith("site-packages/bin/") for n in names)


def test_dist_llmd_version_without_the_venv(artifacts: Artifacts, tmp_path: Path) -> None:
    shiv_root = tmp_path / "state" / ".shiv"
    # HOME unwritable even for root (under /proc): SHIV_ROOT alone decides where it unpacks,
    # which is what the service's drop-in relies on.
    env = clean_env(Path("/proc/llmd-no-home"), SHIV_ROOT=str(shiv_root))
    out = run([artifacts.llmd, "version"], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"llmd {__version__}"
    unpacked_dirs = [p.name for p in shiv_root.iterdir() if p.is_dir()]
    assert len(unpacked_dirs) == 1 and unpacked_dirs[0].startswith("llmd_"), unpacked_dirs


def test_dist_llmd_check_lists_errors_and_accepts_a_good_file(artifacts: Artifacts, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  m: {backend: llama-server, replicas: 0}\nserver: {prot: 1}\n")
    out = run([artifacts.llmd, "check", "-c", bad], env=artifacts.env())
    assert out.returncode == 1
    assert "models.m.replicas" in out.stderr and "server.prot" in out.stderr, out.stderr
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  m: {backend: openai, urls: ['http://127.0.0.1:9/v1']}\n")
    out = run([artifacts.llmd, "check", good], env=artifacts.env())
    assert out.returncode == 0, out.stderr
    assert "ok: 1 model(s)" in out.stdout


async def test_dist_llmd_serves_a_chat_through_the_fake_and_exits_0_on_sigterm(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    fake = await start_fake(FAKE_LLAMA, "-np", "4")
    port = free_port()
    usage_db = tmp_path / "usage.sqlite3"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "drain_seconds": 5, "log_format": "json"},
        "usage": {"path": str(usage_db), "flush_ms": 20},
        "models": {"m": {"backend": "openai", "urls": [fake.url + "/v1"], "slots": 4}},
    }))
    proc = await asyncio.create_subprocess_exec(
        str(artifacts.llmd), "serve", "-c", str(cfg), env=artifacts.env(), cwd=str(tmp_path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output = b""
    try:
        await _wait_health(f"http://127.0.0.1:{port}", proc)
        # It runs on the system interpreter, not on this test's venv Python.
        exe = os.path.realpath(f"/proc/{proc.pid}/exe")
        assert exe.startswith("/usr/bin/python3"), exe
        assert exe != os.path.realpath(sys.executable)

        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-unused", max_retries=0)
        r = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hello from the single file"}], max_tokens=3
        )
        assert r.choices[0].message.content == "t0 t1 t2"
        assert r.usage is not None and r.usage.completion_tokens == 3
        await client.close()

        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 30)
        assert proc.stdout is not None
        output = await proc.stdout.read()
        assert rc == 0, output.decode(errors="replace")[-3000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await fake.stop()
    # SIGTERM flushed the ledger: the packaged `llmd usage` reads the row back.
    out = run([artifacts.llmd, "usage", "--db", usage_db, "--format", "json"], env=artifacts.env())
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["model"], r["requests"], r["completion_tokens"]) for r in rows] == [("m", 1, 3)], rows


async def _wait_health(url: str, proc: asyncio.subprocess.Process, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                assert proc.stdout is not None
                out = await proc.stdout.read()
                raise AssertionError(f"llmd exited with {proc.returncode}:\n{out.decode(errors='replace')}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError(f"llmd did not answer {url}/health within {timeout_s}s")


# ---- the .deb -------------------------------------------------------------------------------------


def test_deb_name_version_and_control(artifacts: Artifacts) -> None:
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    assert re.fullmatch(rf"llm-api_{re.escape(__version__)}-\d+_{arch}\.deb", artifacts.deb.name), artifacts.deb.name
    fields = {f: run(["dpkg-deb", "-f", artifacts.deb, f]).stdout.strip() for f in
              ("Package", "Version", "Architecture", "Depends", "Maintainer", "Description")}
    assert fields["Package"] == "llm-api"
    assert fields["Version"].startswith(f"{__version__}-")
    assert fields["Architecture"] == arch
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert "python3 (>= 3.11)" in depends and "python3 (<< 3.12)" in depends, depends


def test_deb_contents_and_conffiles(artifacts: Artifacts) -> None:
    listing = run(["dpkg-deb", "--contents", artifacts.deb])
    assert listing.returncode == 0, listing.stderr
    entries = {}
    for line in listing.stdout.splitlines():
        mode, owner, *_rest, path = line.split(maxsplit=5)
        entries[path.removeprefix("./")] = (mode, owner)
    for path, mode in EXPECTED_FILES.items():
        assert path in entries, f"{path} missing from the .deb:\n{listing.stdout}"
        assert entries[path][1] == "root/root", (path, entries[path])
        assert entries[path][0] == stat.filemode(stat.S_IFREG | mode), (path, entries[path])

    info = run(["dpkg-deb", "-I", artifacts.deb])
    assert re.search(r"^\s+\d+ bytes,\s+\d+ lines\s+conffiles", info.stdout, re.M), info.stdout
    conffiles = run(["dpkg-deb", "-I", artifacts.deb, "conffiles"]).stdout.split()
    assert sorted(conffiles) == ["/etc/llm-api/config.yaml", "/etc/nginx/sites-available/llm-api.conf"]
    # Every file under /etc must be a conffile (dpkg would otherwise overwrite ops' edits).
    assert {"/" + p for p in entries if p.startswith("etc/") and not p.endswith("/")} == set(conffiles)


def test_deb_files_match_the_repository(unpacked: Path, artifacts: Artifacts) -> None:
    for packaged, source in VERBATIM.items():
        assert (unpacked / packaged).read_bytes() == (ROOT / source).read_bytes(), packaged
    assert (unpacked / "usr/bin/llmd").read_bytes() == artifacts.llmd.read_bytes()
    dropin = (unpacked / "lib/systemd/system/llm-api.service.d/shiv.conf").read_text()
    assert "Environment=SHIV_ROOT=/var/lib/llm-api/.shiv" in dropin
    # ... which the unit makes writable, and the only place it may write.
    unit = (unpacked / "lib/systemd/system/llm-api.service").read_text()
    assert re.search(r"^StateDirectory=llm-api$", unit, re.M) and re.search(r"^ProtectSystem=strict$", unit, re.M)
    changelog = run(["zcat", unpacked / "usr/share/doc/llm-api/changelog.Debian.gz"]).stdout
    assert changelog.startswith(f"llm-api ({__version__}-")
    assert "MIT" in (unpacked / "usr/share/doc/llm-api/copyright").read_text()


def test_packaged_config_is_safe_and_passes_check(unpacked: Path, artifacts: Artifacts) -> None:
    """The unpacked /usr/bin/llmd (system python3) checks the unpacked /etc/llm-api/config.yaml."""
    cfg_path = unpacked / "etc/llm-api/config.yaml"
    doc = yaml.safe_load(cfg_path.read_text())
    assert doc["server"]["host"] == "127.0.0.1"
    assert doc["keys"] == [] and doc["models"] == {}
    assert doc["usage"]["path"] == "/var/lib/llm-api/usage.sqlite3"
    out = run([unpacked / "usr/bin/llmd", "check", "-c", cfg_path], env=artifacts.env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: 0 model(s)" in out.stdout and "127.0.0.1:8000" in out.stdout, out.stdout
    # The commented examples are real config: with every one of them uncommented, it still passes.
    example = artifacts.home / "all-examples.yaml"
    example.write_text(uncomment_examples(cfg_path.read_text()))
    out = run([unpacked / "usr/bin/llmd", "check", "-c", example],
              env=artifacts.env(LLMD_KEY_CI="sk-ci", UPSTREAM_KEY="sk-up"))
    assert out.returncode == 0, example.read_text() + out.stderr
    assert "ok: 4 model(s)" in out.stdout and "3 key(s)" in out.stdout, out.stdout


def uncomment_examples(text: str) -> str:
    """The packaged config with its examples switched on: `tiers: {}` and friends become open
    sections followed by their commented entries, and `  # option: value` lines become options."""
    lines, out, in_examples = text.splitlines(), [], False
    for line in lines:
        m = re.fullmatch(r"(tiers|keys|models|launchers): (\{\}|\[\])", line)
        if m:
            out.append(f"{m[1]}:")
            in_examples = True
            continue
        if in_examples and re.match(r"#  +\S", line):
            out.append(line[1:])  # an example entry, or a comment inside one
        elif re.match(r"  # [a-z_]+: ", line):
            out.append("  " + line[4:])  # a commented option of server, usage or routing
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def test_lintian_is_clean(artifacts: Artifacts) -> None:
    lintian = need("lintian", "lintian")
    out = run([lintian, "--fail-on", "error,warning", artifacts.deb])
    findings = [ln for ln in out.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert out.returncode == 0 and not findings, (
        "lintian reports (fix them, or override with a reason in packaging/deb/lintian-overrides):\n"
        + out.stdout + out.stderr
    )


# ---- maintainer scripts ---------------------------------------------------------------------------

STUBS = ("systemd-sysusers", "systemd-tmpfiles", "deb-systemd-helper", "deb-systemd-invoke", "systemctl",
         "runuser", "adduser")


@dataclass
class Host:
    """A fake host for the maintainer scripts: their system paths point under ``root``."""

    root: Path
    scripts: Path
    stubs: Path
    log: Path
    state: Path
    systemd_running: bool = True

    def run(self, script: str, *args: str, **env: str) -> list[str]:
        """Run a maintainer script; returns the stub calls it made ("cmd arg ...")."""
        self.log.write_text("")
        run_dir = self.root / "run-systemd-system"
        if self.systemd_running:
            run_dir.mkdir(exist_ok=True)
        elif run_dir.exists():
            run_dir.rmdir()
        full_env = clean_env(self.root, PATH=f"{self.stubs}:/usr/sbin:/usr/bin:/sbin:/bin", STUB_LOG=str(self.log),
                             **env)
        out = run(["sh", "-e", self.scripts / script, *args], env=full_env)
        assert out.returncode == 0, f"{script} {' '.join(args)}: {out.returncode}\n{out.stdout}{out.stderr}"
        return [ln for ln in self.log.read_text().splitlines() if ln]


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    scripts, stubs = tmp_path / "DEBIAN", tmp_path / "stubs"
    scripts.mkdir()
    stubs.mkdir()
    state = tmp_path / "var-lib-llm-api"
    replace = {
        "/var/lib/llm-api": str(state),
        "/etc/llm-api": str(tmp_path / "etc-llm-api"),
        "/etc/default/llm-api": str(tmp_path / "etc-default-llm-api"),
        "/run/systemd/system": str(tmp_path / "run-systemd-system"),
        "@SHIV_BUILD@": "llmd_current",
    }
    for name in ("postinst", "prerm", "postrm"):
        text = (DEB_DIR / name).read_text()
        for old, new in replace.items():
            text = text.replace(old, new)
        (scripts / name).write_text(text)
    for name in STUBS:
        stub = stubs / name
        # was-enabled answers "yes" unless STUB_WAS_ENABLED=no, like a unit an admin disabled.
        stub.write_text('#!/bin/sh\necho "${0##*/} $*" >>"$STUB_LOG"\n'
                        'case "$*" in *was-enabled*) [ "${STUB_WAS_ENABLED:-yes}" = yes ] ;; esac\n')
        stub.chmod(0o755)
    yield Host(tmp_path, scripts, stubs, tmp_path / "calls.log", state)


def test_maintainer_scripts_are_posix_sh_and_guard_systemctl() -> None:
    for name in ("postinst", "prerm", "postrm"):
        path = DEB_DIR / name
        assert path.read_text().startswith("#!/bin/sh\n") and os.access(path, os.X_OK), name
        assert run(["sh", "-n", path]).returncode == 0, name
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.search(r"\b(systemctl|deb-systemd-invoke)\b", line) and not line.lstrip().startswith("#"):
                enclosing = _enclosing_ifs(lines, i)
                assert any("/run/systemd/system" in c for c in enclosing), f"{name}:{i + 1} unguarded: {line}"


def _enclosing_ifs(lines: list[str], index: int) -> list[str]:
    """The `if` lines that enclose lines[index], found by indentation (the scripts are indented)."""
    out, indent = [], len(lines[index]) - len(lines[index].lstrip())
    for line in reversed(lines[:index]):
        stripped = line.lstrip()
        if not stripped:
            continue
        this = len(line) - len(stripped)
        if this < indent:
            indent = this
            if stripped.startswith("if "):
                out.append(stripped)
    return out


def test_fresh_install_enables_but_does_not_start(host: Host) -> None:
    calls = host.run("postinst", "configure", "")
    assert "systemd-sysusers llm-api.conf" in calls
    assert "systemd-tmpfiles --create llm-api.conf" in calls
    assert "deb-systemd-helper enable llm-api.service" in calls
    assert "systemctl --system daemon-reload" in calls
    assert not [c for c in calls if c.startswith("deb-systemd-invoke")], calls
    # The zipapp is unpacked as the service user into the state directory.
    runuser = next(c for c in calls if c.startswith("runuser"))
    assert runuser.startswith("runuser -u llm-api --") and f"SHIV_ROOT={host.state}/.shiv" in runuser


def test_install_starts_only_when_asked(host: Host) -> None:
    assert "deb-systemd-invoke start llm-api.service" in host.run("postinst", "configure", "", LLM_API_START="yes")
    (host.root / "etc-default-llm-api").write_text("# local\nSTART=yes\n")
    assert "deb-systemd-invoke start llm-api.service" in host.run("postinst", "configure", "")
    (host.root / "etc-default-llm-api").write_text("START=no\n")
    assert not any(c.startswith("deb-systemd-invoke") for c in host.run("postinst", "configure", ""))


def test_upgrade_restarts_only_if_running_and_prunes_old_unpacked_copies(host: Host) -> None:
    shiv = host.state / ".shiv"
    for name in ("llmd_current", "llmd_old"):
        (shiv / name / "site-packages").mkdir(parents=True)
    for name in (".llmd_old_lock", ".llmd_current_lock"):
        (shiv / name).touch()
    (host.state / "usage.sqlite3").write_text("ledger")
    calls = host.run("postinst", "configure", "0.0.9-1", STUB_WAS_ENABLED="no")
    # try-restart: restarts a running service, leaves a stopped one stopped.
    invoked = [c for c in calls if c.startswith("deb-systemd-invoke")]
    assert invoked == ["deb-systemd-invoke try-restart llm-api.service"], calls
    # An admin's `systemctl disable` survives: no enable, only the state file is updated.
    assert "deb-systemd-helper enable llm-api.service" not in calls
    assert "deb-systemd-helper update-state llm-api.service" in calls
    assert sorted(p.name for p in shiv.iterdir()) == [".llmd_current_lock", "llmd_current"]
    assert (host.state / "usage.sqlite3").read_text() == "ledger"


def test_no_systemctl_in_a_chroot(host: Host) -> None:
    host.systemd_running = False
    for script, args in (("postinst", ("configure", "")), ("postinst", ("configure", "0.0.9-1")),
                         ("prerm", ("remove",)), ("postrm", ("remove",)), ("postrm", ("purge",))):
        calls = host.run(script, *args, LLM_API_START="yes")
        assert not [c for c in calls if c.split()[0] in ("systemctl", "deb-systemd-invoke")], (script, args, calls)


def test_remove_keeps_the_ledger_and_purge_deletes_it_but_not_models(host: Host) -> None:
    etc = host.root / "etc-llm-api"
    etc.mkdir()
    (etc / "env").write_text("LLMD_KEY_CI=secret\n")
    (host.state / "models").mkdir(parents=True)
    (host.state / "models" / "m.gguf").write_text("weights")
    (host.state / ".shiv" / "llmd_current").mkdir(parents=True)
    for name in ("usage.sqlite3", "usage.sqlite3-wal", "usage.sqlite3-shm"):
        (host.state / name).write_text("x")

    assert "deb-systemd-invoke stop llm-api.service" in host.run("prerm", "remove")
    assert not any(c.startswith("deb-systemd-invoke") for c in host.run("prerm", "upgrade", "0.2.0-1"))
    calls = host.run("postrm", "remove")
    assert "deb-systemd-helper mask llm-api.service" in calls
    assert (host.state / "usage.sqlite3").exists() and (etc / "env").exists()
    assert not (host.state / ".shiv").exists()

    calls = host.run("postrm", "purge")
    assert "deb-systemd-helper purge llm-api.service" in calls
    assert not any((host.state / n).exists() for n in ("usage.sqlite3", "usage.sqlite3-wal", "usage.sqlite3-shm"))
    assert not (etc / "env").exists()
    assert (host.state / "models" / "m.gguf").read_text() == "weights"

    (host.state / "models" / "m.gguf").unlink()
    host.run("postrm", "purge")
    assert not host.state.exists()
