"""The llm-api .deb installed on a minimal Debian 12 and run by a real systemd (PID 1), with the
real llama-server and Gemma 3 270M: what ops get from `apt install ./llm-api_*.deb`.

test_systemd_unit.py checks the unit offline; here it runs. One container for the module
(tests/nspawn.py: a cached `debootstrap --variant=minbase` root, overlaid per run, booted with
systemd-nspawn and driven with nsenter). The .deb comes from packaging/build.sh (the packaging
tests' fixture) and is installed with dpkg -i while systemd runs, so its maintainer scripts do
their real work (user, directories, enablement). llama-server and the model are copied in, as ops
would install them. The container shares this host's network: llmd's 127.0.0.1 port answers here.

The tests run in file order and each one first brings the service to the state it needs, so a
failure in one does not cascade; they share one container (booted and installed once).
Nothing is skipped: a host that cannot boot the container fails with what it lacks.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import nspawn
from tests import test_packaging as packaging_tests
from tests.fakeproc import free_port

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "bin" / "llama-server"
MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
UNIT = "llm-api.service"
CONFIG = "/etc/llm-api/config.yaml"
MODEL_PATH = f"/var/lib/llm-api/models/{MODEL.name}"
LLAMA_PATH = "/usr/local/bin/llama-server"
NAME = "gemma-3-270m"
MAX_EXPOSURE = 2.0  # as in test_systemd_unit.py, here measured online by the container's systemd
READY_TIMEOUT_S = 180.0  # model load on one shared core, after a (re)start
# The unit's RestartSec=2s plus a llama-server that exits at once on its parent's death
# (PR_SET_PDEATHSIG): far below TimeoutStopSec=45, which a leftover child would make systemd wait out.
RESTART_TIMEOUT_S = 30.0

# The packaging tests' module-scoped build of dist/llmd and the .deb, reused rather than repeated.
artifacts = packaging_tests.artifacts


def http(method: str, url: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text


def config_doc(port: int, aliases: list[str] | None = None) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "drain_seconds": 20, "log_format": "json"},
        "usage": {"path": "/var/lib/llm-api/usage.sqlite3"},
        "launchers": {"llama-server": {"command": LLAMA_PATH, "start_timeout_s": READY_TIMEOUT_S}},
        "models": {NAME: {"backend": "llama-server", "model": MODEL_PATH, "aliases": aliases or [],
                          "args": ["-c", "1024", "-np", "1", "-t", "1"]}},
    }


@dataclass
class Box:
    """The booted container with the package installed, and llmd's port."""

    m: nspawn.Machine
    port: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, doc: dict[str, Any] | str) -> None:
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
        # As the package leaves it: 0640 root:llm-api (the service reads it as llm-api).
        self.m.write(CONFIG, text, 0o640, "root:llm-api")

    def systemctl(self, *args: str, timeout: float = 120.0) -> None:
        out = self.m.run("systemctl", *args, check=False, timeout=timeout)
        assert out.returncode == 0, f"systemctl {' '.join(args)}: {out.returncode}\n{out.stdout}{out.stderr}\n" \
                                    + self.journal()

    def show(self, *props: str) -> dict[str, str]:
        return self.m.show(UNIT, *props)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def journal(self) -> str:
        return "--- journal of llm-api ---\n" + self.m.journal(UNIT)

    def wait(self, what: str, cond: Callable[[], Any], timeout_s: float, step_s: float = 0.2) -> Any:
        """Poll ``cond`` until it returns something truthy; fail with the journal after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s:.0f} s\n{self.journal()}")
            time.sleep(step_s)

    def readyz(self) -> tuple[int, Any]:
        try:
            return http("GET", self.url + "/readyz", timeout=5)
        except OSError:
            return 0, None

    def wait_ready(self) -> dict[str, Any]:
        return self.wait("GET /readyz 200", lambda: (r := self.readyz())[0] == 200 and r[1], READY_TIMEOUT_S, 0.25)

    def serving(self) -> None:
        """The service active and its replica READY, starting it if a previous test left it down."""
        if self.show("ActiveState")["ActiveState"] != "active":
            self.systemctl("reset-failed", UNIT)  # a crash earlier must not count against StartLimitBurst
            self.systemctl("start", UNIT)
        self.wait_ready()

    def replicas(self) -> list[dict[str, Any]]:
        status, body = http("GET", self.url + "/admin/status", timeout=10)
        assert status == 200, body
        return list(body["replicas"])

    def model_ids(self) -> set[str]:
        status, body = http("GET", self.url + "/v1/models", timeout=10)
        assert status == 200, body
        return {m["id"] for m in body["data"]}

    def chat(self, model: str = NAME, max_tokens: int = 8) -> dict[str, Any]:
        status, body = http("POST", self.url + "/v1/chat/completions", {
            "model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Say hello"}],
        }, timeout=120)
        assert status == 200, (status, body)
        return dict(body)

    def llama_servers(self) -> list[dict[str, Any]]:
        return [p for p in self.m.processes() if p["argv"][:1] == [LLAMA_PATH] or p["name"] == "llama-server"]

    def cgroup_procs(self, cgroup: str) -> set[int] | None:
        """Pids in the unit's cgroup, from whichever hierarchy systemd tracks it in here:
        the unified one (cgroup v2 host) or name=systemd / unified (a hybrid v1 host, like this one).
        None when the cgroup does not exist (systemd removes it once the unit is down and empty)."""
        for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"):
            out = self.m.run("cat", f"{base}{cgroup}/cgroup.procs", check=False)
            if out.returncode == 0:
                return {int(p) for p in out.stdout.split()}
        return None


@pytest.fixture(scope="module")
def box(artifacts: packaging_tests.Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    assert LLAMA.exists() and MODEL.exists(), "run `make setup` (packaging/setup.sh) first"
    t0 = time.monotonic()
    try:
        rootfs = nspawn.ensure_rootfs()
    except nspawn.NspawnError as e:
        pytest.fail(f"cannot make the container's root here: {e}", pytrace=False)
    timings = {"rootfs_s": time.monotonic() - t0}
    with nspawn.Machine(rootfs, tmp_path_factory.mktemp("nspawn")) as m:
        # Staged through the overlay before boot; placed (owners need the llm-api group) after dpkg.
        stage = m.root / "root" / "stage"
        stage.mkdir()
        shutil.copyfile(artifacts.deb, stage / artifacts.deb.name)
        shutil.copyfile(MODEL, stage / MODEL.name)
        shutil.copyfile(LLAMA.resolve(), m.root / LLAMA_PATH.lstrip("/"))
        (m.root / LLAMA_PATH.lstrip("/")).chmod(0o755)
        t0 = time.monotonic()
        try:
            m.boot()
        except nspawn.NspawnError as e:
            pytest.fail(f"cannot boot the container here: {e}", pytrace=False)
        timings["boot_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        out = m.run("dpkg", "-i", f"/root/stage/{artifacts.deb.name}", timeout=300)
        # postinst warns (and goes on) when /usr/bin/llmd cannot run as llm-api.
        assert "warning" not in out.stderr.lower(), out.stdout + out.stderr
        timings["dpkg_s"] = time.monotonic() - t0
        m.sh('mv "$1" "$2" && chown root:llm-api "$2" && chmod 0640 "$2"', f"/root/stage/{MODEL.name}", MODEL_PATH)
        b = Box(m, free_port(), timings)
        b.write_config(config_doc(b.port))
        try:
            yield b
        finally:
            print(f"\nnspawn timings: {json.dumps({k: round(v, 1) for k, v in b.timings.items()})}")


def test_start_reaches_active_with_the_replica_in_the_units_cgroup(box: Box) -> None:
    m = box.m
    # The package enables the unit but does not start it (ops edit the config first).
    assert m.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "enabled"
    assert box.show("ActiveState")["ActiveState"] == "inactive"
    t0 = time.monotonic()
    box.systemctl("start", UNIT)  # Type=notify: returns once llmd has sent READY=1
    box.timings["start_s"] = time.monotonic() - t0
    props = box.show("ActiveState", "SubState", "MainPID", "ControlGroup", "User")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    body = box.wait_ready()
    box.timings["ready_s"] = time.monotonic() - t0
    assert body["models"][NAME]["replicas"] == [{"replica": f"{NAME}/0", "state": "ready"}], body

    main = int(props["MainPID"])
    (replica,) = box.replicas()
    pid = int(replica["pid"])
    procs = box.cgroup_procs(props["ControlGroup"])
    assert props["ControlGroup"] == f"/system.slice/{UNIT}"
    assert procs is not None and main in procs and pid in procs, (props, replica, procs)
    ps = {p["pid"]: p for p in m.processes()}
    assert ps[pid]["argv"][0] == LLAMA_PATH and ps[pid]["ppid"] == main, ps[pid]
    assert ps[main]["argv"][:2] == ["/usr/bin/python3", "/usr/bin/llmd"], ps[main]


def test_chat_completion_through_llmd_in_the_container(box: Box) -> None:
    box.serving()
    assert NAME in box.model_ids()
    r = box.chat()
    assert isinstance(r["choices"][0]["message"]["content"], str)
    assert r["usage"]["completion_tokens"] > 0, r


def test_reload_applies_a_changed_config_without_a_restart(box: Box) -> None:
    box.serving()
    main, (replica,) = box.main_pid(), box.replicas()
    assert "gemma-reloaded" not in box.model_ids()
    box.write_config(config_doc(box.port, aliases=["gemma-reloaded"]))
    # ExecReload must succeed on an image without procps (no /bin/kill): exit 0 or this fails.
    box.systemctl("reload", UNIT)
    box.wait("the new alias in /v1/models", lambda: "gemma-reloaded" in box.model_ids(), 30)
    assert box.chat("gemma-reloaded")["usage"]["completion_tokens"] > 0
    props = box.show("ActiveState", "SubState", "MainPID")
    assert (props["ActiveState"], props["SubState"], int(props["MainPID"])) == ("active", "running", main), props
    # Only an alias changed: the replica process is kept.
    assert box.replicas()[0]["pid"] == replica["pid"]


def test_invalid_config_on_reload_keeps_the_old_one_serving(box: Box) -> None:
    box.serving()
    box.write_config(config_doc(box.port, aliases=["gemma-kept"]))
    box.systemctl("reload", UNIT)
    box.wait("alias gemma-kept", lambda: "gemma-kept" in box.model_ids(), 30)
    main = box.main_pid()
    refusals = box.m.journal(UNIT, 1000).count("reload refused")
    try:
        bad = config_doc(box.port, aliases=["gemma-bad"])
        bad["models"][NAME]["replicas"] = 0
        box.write_config(bad)
        box.systemctl("reload", UNIT)  # the signal is delivered; llmd itself refuses the file
        box.wait("'reload refused' in the journal",
                 lambda: box.m.journal(UNIT, 1000).count("reload refused") > refusals, 30)
        props = box.show("ActiveState", "SubState", "MainPID")
        assert (props["ActiveState"], props["SubState"], int(props["MainPID"])) == ("active", "running", main), props
        ids = box.model_ids()
        assert "gemma-kept" in ids and "gemma-bad" not in ids, ids
        assert box.chat("gemma-kept")["usage"]["completion_tokens"] > 0
    finally:
        box.write_config(config_doc(box.port))


def _assert_no_orphans(box: Box, old_main: int, old_replica: int) -> None:
    """Every llama-server is the new llmd's child; the old llmd and its replica are gone."""
    new_main = box.main_pid()
    procs = box.m.processes()
    pids = {p["pid"] for p in procs}
    assert old_main not in pids and old_replica not in pids, procs
    strays = [p for p in box.llama_servers() if p["ppid"] != new_main]
    assert not strays, (new_main, strays)


def test_kill_9_of_llmd_is_restarted_without_orphans(box: Box) -> None:
    box.serving()
    main, restarts = box.main_pid(), int(box.show("NRestarts")["NRestarts"])
    (replica,) = box.replicas()
    t0 = time.monotonic()
    box.m.sh(f"kill -9 {main}")
    new = box.wait("a new MainPID, active", lambda: (p := box.show("MainPID", "ActiveState"))["ActiveState"] == "active"
                   and int(p["MainPID"]) not in (0, main) and int(p["MainPID"]), RESTART_TIMEOUT_S)
    box.timings["kill9_restart_s"] = time.monotonic() - t0
    assert int(box.show("NRestarts")["NRestarts"]) == restarts + 1
    _assert_no_orphans(box, main, int(replica["pid"]))
    box.wait_ready()
    assert [p["ppid"] for p in box.llama_servers()] == [new]


def test_watchdog_restarts_a_stopped_llmd(box: Box) -> None:
    # Test only: a 4 s watchdog instead of the unit's 30 s, so the test waits seconds, not half a
    # minute; TimeoutAbortSec bounds how long systemd waits for the aborted llmd before SIGKILL.
    watchdog_s = 4
    dropin = "/etc/systemd/system/llm-api.service.d/zz-test-watchdog.conf"
    box.m.run("mkdir", "-p", dropin.rsplit("/", 1)[0])
    box.m.write(dropin, f"[Service]\nWatchdogSec={watchdog_s}\nTimeoutAbortSec=10\n")
    try:
        box.systemctl("daemon-reload")
        box.systemctl("reset-failed", UNIT)
        box.systemctl("restart", UNIT)  # WATCHDOG_USEC is read at start
        box.wait_ready()
        assert box.show("WatchdogUSec")["WatchdogUSec"] == f"{watchdog_s}s"
        main, restarts = box.main_pid(), int(box.show("NRestarts")["NRestarts"])
        (replica,) = box.replicas()
        t0 = time.monotonic()
        # Frozen, not dead: only the missing WATCHDOG=1 pings can reveal it.
        box.m.sh(f"kill -STOP {main}")
        box.wait("a new MainPID after the watchdog fired",
                 lambda: (p := box.show("MainPID", "ActiveState"))["ActiveState"] == "active"
                 and int(p["MainPID"]) not in (0, main), watchdog_s + 10 + RESTART_TIMEOUT_S)
        box.timings["watchdog_restart_s"] = time.monotonic() - t0
        journal = box.m.journal(UNIT, 200)
        assert f"Watchdog timeout (limit {watchdog_s}s)" in journal, journal
        assert int(box.show("NRestarts")["NRestarts"]) == restarts + 1
        _assert_no_orphans(box, main, int(replica["pid"]))
        box.wait_ready()
    finally:
        box.m.run("rm", "-f", dropin)
        box.m.run("systemctl", "daemon-reload")


def test_stop_drains_and_leaves_no_child(box: Box) -> None:
    box.serving()
    cgroup = box.show("ControlGroup")["ControlGroup"]
    first_chunk, stop_sent = threading.Event(), [0.0]
    chunks: list[tuple[float, str]] = []
    errors: list[BaseException] = []

    def stream() -> None:
        req = urllib.request.Request(box.url + "/v1/chat/completions", method="POST", data=json.dumps({
            "model": NAME, "stream": True, "max_tokens": 48, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to fifty"}],
        }).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                for line in r:
                    if line.startswith(b"data: "):
                        chunks.append((time.monotonic(), line[6:].decode().strip()))
                        first_chunk.set()
        except BaseException as e:  # reported by the test thread
            errors.append(e)
            first_chunk.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert first_chunk.wait(60) and not errors, errors
    stop_sent[0] = time.monotonic()
    box.systemctl("stop", UNIT)  # returns when the unit is down: llmd exited, cgroup empty
    box.timings["stop_s"] = time.monotonic() - stop_sent[0]
    t.join(30)
    assert not t.is_alive() and not errors, errors
    # Drained: the stream went on after SIGTERM and ended properly.
    assert chunks[-1][1] == "[DONE]", chunks[-3:]
    assert any(ts > stop_sent[0] for ts, _ in chunks), "the stream had ended before the stop"
    props = box.show("ActiveState", "Result", "ExecMainStatus", "MainPID")
    assert (props["ActiveState"], props["Result"], props["ExecMainStatus"]) == ("inactive", "success", "0"), props
    assert not box.llama_servers(), box.m.processes()
    assert not [p for p in box.m.processes() if "/usr/bin/llmd" in p["argv"]], box.m.processes()
    assert box.cgroup_procs(cgroup) is None  # systemd removed the unit's cgroup: nothing was left in it


def test_security_exposure_online(box: Box) -> None:
    out = box.m.run("systemd-analyze", "security", "--no-pager", UNIT)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    score = float(match.group(1))
    print(f"\nsystemd-analyze security {UNIT} (online, in the container): {score}")
    assert score <= MAX_EXPOSURE, out.stdout
