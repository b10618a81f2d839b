"""A throwaway Debian 12 machine with systemd as PID 1, booted by systemd-nspawn, for tests.

    rootfs = ensure_rootfs()                        # cached in ~/.cache/llmd/, built once (~90 s)
    with Machine(rootfs, tmp_path, "llmd-test") as m:
        shutil.copy(deb, m.root / "root")           # m.root: the container's / seen from here
        m.boot()
        m.run("dpkg", "-i", "/root/x.deb")          # nsenter into all of its namespaces

The cached root is a `debootstrap --variant=minbase` Debian (Debian's own packages, nothing else)
plus systemd and python3; on purpose without procps, so what a minimal image lacks shows up here.
Each Machine boots an overlay of it (writes land in a per-test upper directory), so the cache
stays clean and a boot costs no copy. The container shares the host's network (no
--private-network): a service listening on 127.0.0.1 inside answers on 127.0.0.1 here.

systemd-nspawn runs with --register=no --keep-unit: no machined, no D-Bus and no systemd on the
host are needed (machinectl therefore knows nothing about it), only root. Leaving the `with`
powers the container off (SIGTERM to nspawn = a clean shutdown of the container's systemd), kills
what is left if that does not finish in time, and unmounts the overlay: nothing outlives a test.
If the test process is killed outright, nspawn still gets SIGTERM (PR_SET_PDEATHSIG) and shuts the
container down; only an empty cgroup directory (llmd-nspawn-*) and the overlay mount under the
test's temporary directory are left then.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

SUITE = "bookworm"
# What the image has beyond minbase (Essential + apt): an init, the llm-api package's Depends
# (python3, adduser) and the one shared library of llama-server that minbase lacks (libgomp1;
# libstdc++6 comes with apt). procps is deliberately absent: /bin/kill must not be needed.
INCLUDE = ("systemd", "systemd-sysv", "python3", "adduser", "libgomp1")
# Bump to rebuild cached roots after a change to how they are made (not needed for INCLUDE/SUITE:
# they are part of the cache key already).
RECIPE = 1
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT_S = 900
# Host tools and the apt packages that bring them (.ci/run installs these).
HOST_TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "nsenter": "util-linux",
              "mount": "mount"}
# What commands run with inside the container: its own PATH, no environment of this test run.
CONTAINER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                 "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb"}


class NspawnError(RuntimeError):
    """The container could not be built or booted here; the message says what is missing."""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llmd"


def missing_host_tools() -> list[str]:
    """'tool (apt-get install pkg)' for every host tool that is not installed."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin"
    return [f"{tool} (apt-get install {pkg})" for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool, path=path)]


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror this host's apt uses for ``suite`` (deb822 or one-line sources), else
    deb.debian.org: where apt works, debootstrap works with the same URL and proxy settings."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
             *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {m[1].lower(): m[2].split() for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M)}
                if ("deb" in fields.get("types", []) and suite in fields.get("suites", [])
                        and fields.get("uris") and fields.get("enabled", ["yes"]) != ["no"]):
                    return fields["uris"][0].rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and m[2] == suite:
                    return m[1].rstrip("/")
    return DEFAULT_MIRROR


def rootfs_path() -> Path:
    key = hashlib.sha256(repr((SUITE, "minbase", sorted(INCLUDE), RECIPE)).encode()).hexdigest()[:12]
    return cache_dir() / f"nspawn-rootfs-{SUITE}-{key}"


def ensure_rootfs() -> Path:
    """The cached root directory, built by debootstrap on first use (under a lock, into a temporary
    directory renamed into place only when complete: a half-built root is never used)."""
    if os.geteuid() != 0:
        raise NspawnError("booting a container needs root (debootstrap, mount, systemd-nspawn)")
    missing = missing_host_tools()
    if missing:
        raise NspawnError("missing host tools: " + ", ".join(missing))
    dest = rootfs_path()
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / "nspawn-rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_dir():  # another test run built it while this one waited
            return dest
        for stale in dest.parent.glob(dest.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.parent / f"{dest.name}.tmp-{os.getpid()}"
        cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(INCLUDE), SUITE, str(tmp), apt_mirror()]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT_S)
            if out.returncode != 0:
                log = (tmp / "debootstrap" / "debootstrap.log")
                detail = log.read_text()[-3000:] if log.exists() else ""
                raise NspawnError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}"
                                  f"{out.stderr[-3000:]}\n{detail}")
            # The downloaded .debs (~60 MB) are of no use in the image.
            for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            # Empty: every boot gets a fresh transient machine id instead of sharing this one.
            (tmp / "etc/machine-id").write_text("")
            # The container's / must be 0755: with the 0700 of a temporary directory, services
            # with User= cannot reach any path and stall at start.
            tmp.chmod(0o755)
            tmp.rename(dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


class Machine:
    """One container: an overlay of ``rootfs`` mounted under ``workdir``, booted with systemd."""

    def __init__(self, rootfs: Path, workdir: Path, name: str = "") -> None:
        self.rootfs = rootfs
        self.workdir = workdir
        # Unique: nspawn keeps per-machine state under /run/systemd/nspawn/ by name, and other test
        # runs on this host may boot containers at the same time.
        self.name = name or f"llmd-{uuid.uuid4().hex[:8]}"
        self.root = workdir / "root"  # the container's / as seen from the host
        self.log_path = workdir / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0  # host pid of the container's PID 1
        self._mounted = False
        self._cgroups: list[Path] = []
        self._libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: used in _in_child

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Machine:
        upper, work = self.workdir / "upper", self.workdir / "work"
        for d in (upper, work, self.root):
            d.mkdir(parents=True, exist_ok=True)
        upper.chmod(0o755)  # the overlay's / takes the upper directory's mode (tmp dirs are 0700)
        out = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                              f"lowerdir={self.rootfs},upperdir={upper},workdir={work}", str(self.root)],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise NspawnError(f"cannot mount an overlay of {self.rootfs}: {out.stderr.strip()}")
        self._mounted = True
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.poweroff()
        finally:
            if self._mounted:
                self._umount()

    def boot(self, timeout_s: float = 90.0) -> None:
        """Start systemd-nspawn and wait until the container's systemd has finished booting."""
        assert self.nspawn is None, "already booted"
        self._cgroups = _make_cgroups(f"llmd-nspawn-{self.name}")
        with open(self.log_path, "wb") as log:
            # --keep-unit --register=no: no machined/D-Bus/systemd needed on this host.
            # stdin is not a tty, so nspawn gives the console read-only: boot messages go to the log.
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit", f"--machine={self.name}",
                 f"--directory={self.root}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=self._in_child,
            )
        deadline = time.monotonic() + timeout_s
        self.init_pid = self._wait_for_init(deadline)
        state = ""
        while time.monotonic() < deadline:
            # Fails ("Failed to connect to bus") until PID 1 has its private socket; then blocks
            # until the boot is over and prints running, or degraded if some unit failed.
            out = self.run("systemctl", "is-system-running", "--wait", check=False,
                           timeout=max(1.0, deadline - time.monotonic()))
            state = out.stdout.strip()
            if state in ("running", "degraded"):
                return
            self._assert_alive()
            time.sleep(0.2)
        raise NspawnError(f"the container did not finish booting in {timeout_s:.0f} s (state {state!r}):\n"
                          + self.console_tail())

    def poweroff(self, timeout_s: float = 30.0) -> None:
        """Shut the container down cleanly; SIGKILL it if that takes longer than ``timeout_s``."""
        proc, self.nspawn = self.nspawn, None
        try:
            if proc is not None:
                self._stop(proc, timeout_s)
        finally:
            self.init_pid = 0
            _remove_cgroups(self._cgroups)
            self._cgroups = []

    def _stop(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        if proc.poll() is None:
            # nspawn forwards SIGTERM to the container's systemd as SIGRTMIN+3: a clean poweroff.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout_s)
        # Killing the PID namespace's init kills everything in it; then nspawn itself. (Checked
        # first: once the container is gone, its pid may belong to some other process.)
        if self.init_pid and _is_container_init(self.init_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def _in_child(self) -> None:
        """In nspawn's child before exec: its own cgroups, and SIGTERM when this test run dies.

        The signal (PR_SET_PDEATHSIG) makes nspawn shut the container down even when the test
        process is killed outright and cannot run its teardown.

        Cgroups ("0" written to cgroup.procs moves the writer): with --keep-unit, nspawn splits
        the cgroup it starts in into payload/ and supervisor/ and gives the container payload/ as
        its root. Started in this test's cgroup (the host's root cgroup, on a host without
        systemd), two containers booted at the same time by two test runs would share payload/,
        and their two systemds would manage the same system.slice."""
        self._libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        for cg in self._cgroups:
            (cg / "cgroup.procs").write_text("0")

    def _umount(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            out = subprocess.run(["umount", str(self.root)], capture_output=True, text=True, timeout=30)
            if out.returncode == 0:
                break
            if time.monotonic() > deadline:
                # Still busy: detach it so the test run can go on; it goes away with its last user.
                subprocess.run(["umount", "--lazy", str(self.root)], capture_output=True, timeout=30)
                break
            time.sleep(0.2)
        self._mounted = False

    def _wait_for_init(self, deadline: float) -> int:
        """Host pid of the container's PID 1, once it is systemd (not nspawn's child before exec)."""
        assert self.nspawn is not None
        while time.monotonic() < deadline:
            self._assert_alive()
            for status in Path("/proc").glob("[0-9]*/status"):
                with contextlib.suppress(OSError):
                    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                    if (fields.get("PPid", "").strip() == str(self.nspawn.pid)
                            and fields.get("NSpid", "").split()[-1:] == ["1"]
                            and fields.get("Name", "").strip() == "systemd"):
                        return int(status.parent.name)
            time.sleep(0.05)
        raise NspawnError("systemd did not start as the container's PID 1:\n" + self.console_tail())

    def _assert_alive(self) -> None:
        assert self.nspawn is not None
        rc = self.nspawn.poll()
        if rc is not None:
            raise NspawnError(f"systemd-nspawn exited with {rc}:\n" + self.console_tail())

    def console_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return ""

    # --- inside the container --------------------------------------------------------------------

    def run(self, *cmd: str, input: str | bytes | None = None, check: bool = True, timeout: float = 60.0,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (all its namespaces, its root, as its root user)."""
        assert self.init_pid, "not booted"
        data = input.encode() if isinstance(input, str) else input
        out = subprocess.run(["nsenter", f"--target={self.init_pid}", "--all", *cmd], input=data,
                             capture_output=True, timeout=timeout, env=CONTAINER_ENV)
        result = subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(errors="replace"),
                                             out.stderr.decode(errors="replace"))
        if check and result.returncode != 0:
            raise AssertionError(f"in the container: {' '.join(cmd)} exited with {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def sh(self, script: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """``sh -c script sh args...`` inside the container (dash: no bash in minbase)."""
        return self.run("sh", "-c", script, "sh", *args, **kw)

    def write(self, path: str, data: str | bytes, mode: int = 0o644, owner: str = "root:root") -> None:
        """Write a file inside the container (owner names resolve in the container's passwd)."""
        self.sh('cat >"$1" && chown "$2" "$1" && chmod "$3" "$1"', path, owner, f"{mode:o}", input=data)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 80) -> str:
        return self.run("journalctl", "--no-pager", "-o", "short-monotonic", "-u", unit, "-n", str(lines),
                        check=False).stdout

    def processes(self) -> list[dict[str, Any]]:
        """Every process in the container: pid, ppid (container pids), name and argv (no ps here:
        procps is not installed, so python3 reads /proc)."""
        out = self.run("python3", "-c", _PS)
        return list(json.loads(out.stdout))


_PS = r"""
import json, os
procs = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        status = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines() if ":" in l)
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    procs.append({"pid": int(pid), "ppid": int(status["PPid"]), "name": status["Name"].strip(),
                  "argv": [a.decode(errors="replace") for a in argv if a]})
print(json.dumps(procs))
"""


def _make_cgroups(leaf: str) -> list[Path]:
    """A new child ``leaf`` of this process's cgroup in the hierarchies systemd uses: the unified
    one (cgroup2) and, on a hybrid host, the named v1 "systemd" one. Returns their directories."""
    mounts: dict[str, Path] = {}  # "unified" / "name=systemd" -> mount point
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fields, (fstype, _source, options) = pre.split(), post.split()[:3]
        if fields[3] != "/":  # a bind mount of a sub-cgroup: its paths are not ours to join
            continue
        if fstype == "cgroup2":
            mounts.setdefault("unified", Path(fields[4]))
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            mounts.setdefault("name=systemd", Path(fields[4]))
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        key = "unified" if controllers == "" else controllers
        if key in mounts:
            d = mounts[key] / path.lstrip("/") / leaf
            try:
                d.mkdir()
            except OSError as e:
                _remove_cgroups(dirs)
                raise NspawnError(f"cannot create the container's cgroup {d}: {e}") from e
            dirs.append(d)
    if not dirs:
        raise NspawnError("no cgroup2 or name=systemd cgroup hierarchy is mounted: systemd cannot run here")
    return dirs


def _remove_cgroups(dirs: list[Path], timeout_s: float = 10.0) -> None:
    """rmdir the trees, deepest first (the kernel refuses a cgroup that has children or processes;
    the last processes of a killed container may take a moment to be gone)."""
    deadline = time.monotonic() + timeout_s
    for top in dirs:
        while top.exists():
            for d, _subdirs, _files in os.walk(top, topdown=False):  # children before parents
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            if not top.exists() or time.monotonic() > deadline:
                break
            time.sleep(0.1)


def _is_container_init(pid: int) -> bool:
    """Whether host pid ``pid`` is PID 1 of a PID namespace below ours (NSpid: <host pid> ... 1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    m = re.search(r"^NSpid:\s*(.*)$", status, re.M)
    return bool(m) and len(m[1].split()) > 1 and m[1].split()[-1] == "1"
