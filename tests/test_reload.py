"""`llmd serve` as a real process, driven by signals: SIGHUP reload, SIGTERM drain, sd_notify.

Every test starts `python -m llmd serve -c CONFIG` (tests/conftest.py ``llmd_process``) with
supervised llama-server replicas whose command is the fake llama-server, sends signals with
os.kill, and watches from outside: HTTP, /admin/status, /metrics, the JSON log on stderr,
/proc, and a datagram socket standing in for systemd's $NOTIFY_SOCKET. Ports are free ones
and every file lives in tmp_path, so the tests run in parallel; llmd is always SIGKILLed and
reaped at the end (its replicas die with it: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import LlmdProc, base_config, llmd_process, wait_for, write_config
from tests.fakeproc import FAKE_LLAMA

SECRET_OPS = "sk-test-ops-0123456789abcdef0123456789abcdef01"
SECRET_ALICE = "sk-test-alice-0123456789abcdef0123456789abcdef"
SECRET_BOB = "sk-test-bob-0123456789abcdef0123456789abcdef012"
SECRET_STREAM = "sk-test-stream-0123456789abcdef0123456789abcde"
MSG = [{"role": "user", "content": "hello there"}]


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def launchers() -> dict[str, Any]:
    """The fake llama-server as `launchers.llama-server.command`, with short timeouts."""
    return {
        "llama-server": {
            "command": [sys.executable, str(FAKE_LLAMA)], "start_timeout_s": 15, "stop_timeout_s": 2,
            "health_interval_s": 0.2, "health_failures": 2, "restart_delay_s": 0.2, "restart_max_delay_s": 2,
        }
    }  # fmt: skip


def supervised(tmp_path: Path, *args: str) -> dict[str, Any]:
    """One supervised replica; its `-m` path (unique to the test) finds its process in /proc."""
    return {"backend": "llama-server", "model": str(tmp_path / "fake.gguf"),
            "args": ["-np", "4", "--load-delay-s", "0.1", *args]}  # fmt: skip


def config_doc(tmp_path: Path, models: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return base_config(tmp_path, models, launchers=launchers(), **sections)


def write_atomic(path: Path, doc: dict[str, Any] | str) -> Path:
    """Replace the config in one rename, as an editor or config management would."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(doc, str):
        tmp.write_text(doc)
    else:
        write_config(tmp, doc)
    os.replace(tmp, path)
    return path


# --- looking from outside ----------------------------------------------------------------------


def auth(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


async def chat(session: aiohttp.ClientSession, llmd: LlmdProc, model: str, secret: str | None = None,
               max_tokens: int = 1) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": MSG, "max_tokens": max_tokens}
    async with session.post(llmd.url + "/v1/chat/completions", json=body, headers=auth(secret)) as resp:
        return resp.status, await resp.json()


async def admin_status(session: aiohttp.ClientSession, llmd: LlmdProc, secret: str | None = None) -> dict[str, Any]:
    async with session.get(llmd.url + "/admin/status", headers=auth(secret)) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def reloads(session: aiohttp.ClientSession, llmd: LlmdProc) -> dict[str, float]:
    """llmd_config_reloads_total by result, from /metrics (absent = 0)."""
    async with session.get(llmd.url + "/metrics") as resp:
        text = await resp.text()
    found = dict(re.findall(r'^llmd_config_reloads_total\{result="(\w+)"\} (\S+)$', text, re.MULTILINE))
    return {result: float(found.get(result, 0)) for result in ("ok", "error")}


async def wait_reloads(session: aiohttp.ClientSession, llmd: LlmdProc, result: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while (await reloads(session, llmd))[result] < n:
        assert time.monotonic() < deadline, f"no {result} reload #{n}:\n" + "\n".join(llmd.lines)
        await asyncio.sleep(0.02)


async def wait_ready(session: aiohttp.ClientSession, llmd: LlmdProc, timeout_s: float = 15) -> None:
    """/readyz 200: every configured model has a READY replica."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with session.get(llmd.url + "/readyz") as resp:
            if resp.status == 200:
                return
            body = await resp.text()
        assert time.monotonic() < deadline, body + "\n" + "\n".join(llmd.lines)
        await asyncio.sleep(0.05)


def serving_pids(status: dict[str, Any]) -> dict[str, int]:
    """Replica name -> pid of the replicas in rotation (not draining)."""
    return {r["replica"]: r["pid"] for r in status["replicas"] if not r["draining"]}


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def processes_with(marker: str) -> set[int]:
    """Live processes whose command line contains ``marker`` (e.g. this test's model path)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and alive(int(entry.name)):
            pids.add(int(entry.name))
    return pids


class Stream:
    """A streamed chat read event by event: contents in order, [DONE] seen, arrival times."""

    def __init__(self) -> None:
        self.contents: list[str] = []
        self.times: list[float] = []
        self.done = False
        self.first = asyncio.Event()

    async def run(self, session: aiohttp.ClientSession, llmd: LlmdProc, model: str, secret: str | None,
                  tokens: int, token_delay_ms: int) -> Stream:
        body = {"model": model, "messages": MSG, "max_tokens": tokens, "stream": True,
                "fake": {"token_delay_ms": token_delay_ms}}
        async with session.post(llmd.url + "/v1/chat/completions", json=body, headers=auth(secret)) as resp:
            assert resp.status == 200, await resp.text()
            async for raw in resp.content:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    for choice in json.loads(line[6:]).get("choices", []):
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            self.contents.append(content)
                            self.times.append(time.monotonic())
                            self.first.set()
        return self


def expected_tokens(n: int) -> list[str]:
    return ["t0", *(f" t{i}" for i in range(1, n))]


# --- SIGHUP ------------------------------------------------------------------------------------


async def test_sighup_applies_keys_tiers_and_models_without_dropping_a_stream(tmp_path: Path) -> None:
    """A reload changes keys, a tier and the model set while a stream is in flight.

    1. Start llmd: models a and b (one supervised fake replica each), keys ops (admin), alice
       (tier std: 10 requests/minute) and streamer; bob is not configured yet.
    2. Before: bob gets 401, model c 404; alice makes 3 requests (200); note the replica pids.
    3. Start a slow stream on a (30 tokens, 100 ms apart); once its first token is in, write
       the new config (key bob added, std lowered to 4 requests/minute, model c added, model b
       removed) and send SIGHUP.
    4. After the reload (llmd_config_reloads_total{result="ok"} = 1), while the stream still
       runs: bob gets 200; alice gets one more 200 and then 429 (her 3 earlier requests still
       count against the new limit of 4); b is 404 model_not_found; c's new replica starts
       and serves; a's replica kept its pid; b's replica process is gone.
    5. The stream that was in flight across the reload completes: all 30 tokens, then [DONE].
    """
    keys = [
        {"id": "ops", "sha256": sha(SECRET_OPS), "admin": True},
        {"id": "alice", "tier": "std", "sha256": sha(SECRET_ALICE)},
        {"id": "streamer", "sha256": sha(SECRET_STREAM)},
    ]
    before = config_doc(tmp_path, {"a": supervised(tmp_path), "b": supervised(tmp_path)},
                        tiers={"std": {"requests_per_minute": 10}}, keys=keys)
    path = write_atomic(tmp_path / "config.yaml", before)
    async with llmd_process(path) as llmd, aiohttp.ClientSession() as s:
        # 1-2. The starting point.
        await wait_ready(s, llmd)
        assert (await chat(s, llmd, "a", SECRET_BOB))[0] == 401
        status, body = await chat(s, llmd, "c", SECRET_ALICE)
        assert (status, body["error"]["code"]) == (404, "model_not_found")
        for _ in range(3):
            assert (await chat(s, llmd, "a", SECRET_ALICE))[0] == 200
        pids = serving_pids(await admin_status(s, llmd, SECRET_OPS))
        assert set(pids) == {"a/0", "b/0"} and all(alive(p) for p in pids.values())

        # 3. A slow stream, then SIGHUP with the new config while it runs.
        stream = Stream()
        stream_task = asyncio.create_task(stream.run(s, llmd, "a", SECRET_STREAM, 30, 100))
        await asyncio.wait_for(stream.first.wait(), 10)
        after = config_doc(
            tmp_path, {"a": supervised(tmp_path), "c": supervised(tmp_path)},
            tiers={"std": {"requests_per_minute": 4}},
            keys=[*keys, {"id": "bob", "tier": "std", "sha256": sha(SECRET_BOB)}],
        )
        write_atomic(path, after)
        tokens_at_sighup = len(stream.contents)
        os.kill(llmd.pid, signal.SIGHUP)

        # 4. The new config serves; the stream is still in flight.
        await wait_reloads(s, llmd, "ok", 1)
        assert not stream_task.done(), "the stream ended before the reload: nothing was proven"
        assert 0 < tokens_at_sighup < 30
        assert (await chat(s, llmd, "a", SECRET_BOB))[0] == 200
        assert (await chat(s, llmd, "a", SECRET_ALICE))[0] == 200  # her 4th this minute
        status, body = await chat(s, llmd, "a", SECRET_ALICE)
        assert status == 429, body
        assert "requests_per_minute=4" in body["error"]["message"]
        status, body = await chat(s, llmd, "b", SECRET_BOB)
        assert (status, body["error"]["code"]) == (404, "model_not_found")
        await wait_ready(s, llmd)  # c's replica is READY
        assert (await chat(s, llmd, "c", SECRET_BOB))[0] == 200
        new_pids = serving_pids(await admin_status(s, llmd, SECRET_OPS))
        assert set(new_pids) == {"a/0", "c/0"}
        assert new_pids["a/0"] == pids["a/0"], "an unchanged replica was restarted"
        assert alive(new_pids["c/0"]) and new_pids["c/0"] not in pids.values()
        await wait_for(lambda: not alive(pids["b/0"]), timeout_s=10)

        # 5. The stream completes in full.
        await asyncio.wait_for(stream_task, 10)
        assert stream.contents == expected_tokens(30)
        assert stream.done
        assert await reloads(s, llmd) == {"ok": 1, "error": 0}
        assert processes_with(str(tmp_path / "fake.gguf")) == {new_pids["a/0"], new_pids["c/0"]}


async def test_three_sighups_in_a_row(tmp_path: Path) -> None:
    """Reloads in quick succession are serialized and leave no duplicate processes.

    1. Start llmd with models a and b (one supervised replica each, no keys: open).
    2. While a client sends requests to a and b in a loop, write three configs in a row, each
       changing a's arguments (so a's replica is replaced each time), with a SIGHUP after
       each, no pause between them.
    3. Every request succeeded; 1 to 3 reloads were counted as ok (signals arriving while
       one is pending coalesce), none as errors.
    4. Once settled: exactly two replica processes exist (a's from the last config, b's with
       its original pid), both listed by /admin/status, nothing left draining.
    5. One more SIGHUP with the same file: counted, and no process is restarted.
    """
    def doc(delay_ms: int) -> dict[str, Any]:
        return config_doc(tmp_path, {"a": supervised(tmp_path, "--token-delay-ms", str(delay_ms)),
                                     "b": supervised(tmp_path)})

    path = write_atomic(tmp_path / "config.yaml", doc(0))
    marker = str(tmp_path / "fake.gguf")
    async with llmd_process(path) as llmd, aiohttp.ClientSession() as s:
        await wait_ready(s, llmd)
        pids = serving_pids(await admin_status(s, llmd))
        statuses: list[int] = []
        stop = asyncio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                for model in ("a", "b"):
                    statuses.append((await chat(s, llmd, model))[0])

        async def served(n: int) -> None:
            """Until the client has n more answers (a count: a busy machine only slows it)."""
            target = len(statuses) + n
            async with asyncio.timeout(15):
                while len(statuses) < target:
                    await asyncio.sleep(0.01)

        client = asyncio.create_task(traffic())
        await served(2)  # traffic flows before the first reload
        # 2. Three reloads, back to back.
        for delay_ms in (1, 2, 3):
            write_atomic(path, doc(delay_ms))
            os.kill(llmd.pid, signal.SIGHUP)

        # 3-4. Settled: a replaced by its last version, b untouched, nothing extra.
        async def settled() -> bool:
            st = await admin_status(s, llmd)
            reps = {r["replica"]: r for r in st["replicas"]}
            if len(st["replicas"]) != 2 or set(reps) != {"a/0", "b/0"}:
                return False
            if any(r["state"] != "ready" or r["draining"] for r in reps.values()):
                return False
            async with s.get(f"http://127.0.0.1:{reps['a/0']['port']}/fake/stats") as resp:
                argv = (await resp.json())["argv"]
            return argv[argv.index("--token-delay-ms") + 1] == "3"

        deadline = time.monotonic() + 15
        while not await settled():
            assert time.monotonic() < deadline, json.dumps(await admin_status(s, llmd)) + "\n".join(llmd.lines)
            await asyncio.sleep(0.05)
        await served(4)  # a few more requests on the settled replicas
        stop.set()
        await asyncio.wait_for(client, 10)
        assert statuses and set(statuses) == {200}, statuses
        counted = await reloads(s, llmd)
        assert 1 <= counted["ok"] <= 3 and counted["error"] == 0, counted
        final = serving_pids(await admin_status(s, llmd))
        assert final["b/0"] == pids["b/0"]
        assert final["a/0"] != pids["a/0"] and not alive(pids["a/0"])
        assert processes_with(marker) == set(final.values())

        # 5. A no-op reload.
        os.kill(llmd.pid, signal.SIGHUP)
        await wait_reloads(s, llmd, "ok", counted["ok"] + 1)
        assert serving_pids(await admin_status(s, llmd)) == final
        assert processes_with(marker) == set(final.values())


async def test_invalid_config_on_sighup_keeps_the_old_one(tmp_path: Path) -> None:
    """A broken config on SIGHUP is refused, every error logged with its YAML path.

    1. Start llmd with model a (supervised) and key alice (admin).
    2. Write a config with four mistakes (server.drain_seconds < 0, models.a.replicas 0, an
       unknown key routing.stratgy, tiers.std.requests_per_minute not a number); SIGHUP.
    3. llmd_config_reloads_total{result="error"} becomes 1; an error log line names each
       mistake by its YAML path; alice still gets 200 from a, with the same replica pid; a
       key that is only in the broken file gets 401.
    4. Write a file that is not YAML at all; SIGHUP: error count 2, logged with its line and
       column; still serving.
    5. Write a valid config again (adding bob); SIGHUP: counted ok, bob gets 200.
    """
    keys = [{"id": "alice", "sha256": sha(SECRET_ALICE), "admin": True}]
    good = config_doc(tmp_path, {"a": supervised(tmp_path)}, keys=keys)
    path = write_atomic(tmp_path / "config.yaml", good)
    async with llmd_process(path) as llmd, aiohttp.ClientSession() as s:
        await wait_ready(s, llmd)
        pid = serving_pids(await admin_status(s, llmd, SECRET_ALICE))["a/0"]

        # 2. Four mistakes at once.
        broken = config_doc(tmp_path, {"a": {**supervised(tmp_path), "replicas": 0}},
                            keys=[*keys, {"id": "bob", "sha256": sha(SECRET_BOB)}],
                            tiers={"std": {"requests_per_minute": "ten"}})
        broken["server"]["drain_seconds"] = -1
        broken["routing"]["stratgy"] = "round-robin"
        write_atomic(path, broken)
        os.kill(llmd.pid, signal.SIGHUP)

        # 3. Refused, explained, still serving the old config.
        await wait_reloads(s, llmd, "error", 1)
        for yaml_path in ("server.drain_seconds", "models.a.replicas", "routing.stratgy",
                          "tiers.std.requests_per_minute"):
            line = await llmd.wait_log(lambda d, p=yaml_path: d.get("level") == "error"
                                       and d["msg"].startswith(f"reload refused: {p}: "))
            assert line["config"] == str(path)
        assert (await chat(s, llmd, "a", SECRET_ALICE))[0] == 200
        assert (await chat(s, llmd, "a", SECRET_BOB))[0] == 401
        assert serving_pids(await admin_status(s, llmd, SECRET_ALICE)) == {"a/0": pid}

        # 4. Not YAML.
        write_atomic(path, "models: [unclosed\n  a: {\n")
        os.kill(llmd.pid, signal.SIGHUP)
        await wait_reloads(s, llmd, "error", 2)
        await llmd.wait_log(lambda d: d.get("level") == "error" and "invalid YAML" in d["msg"]
                            and re.search(r"line \d+, column \d+", d["msg"]) is not None)
        assert (await chat(s, llmd, "a", SECRET_ALICE))[0] == 200
        assert await reloads(s, llmd) == {"ok": 0, "error": 2}

        # 5. Fixed.
        write_atomic(path, config_doc(tmp_path, {"a": supervised(tmp_path)},
                                      keys=[*keys, {"id": "bob", "sha256": sha(SECRET_BOB)}]))
        os.kill(llmd.pid, signal.SIGHUP)
        await wait_reloads(s, llmd, "ok", 1)
        assert (await chat(s, llmd, "a", SECRET_BOB))[0] == 200
        assert serving_pids(await admin_status(s, llmd, SECRET_ALICE)) == {"a/0": pid}


# --- systemd's notify protocol -------------------------------------------------------------------


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET.

    Records (arrival time, sender pid, fields) of every datagram; the sender's pid comes from
    SCM_CREDENTIALS, as systemd checks it against NotifyAccess=main.
    """

    def __init__(self, path: Path) -> None:
        assert len(os.fsencode(path)) < 100, path  # sun_path is 108 bytes
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.fspath(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, int, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ucred = struct.Struct("3i")
        while not self._stop.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(ucred.size))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = ucred.unpack(value[: ucred.size])[0]
            self.messages.append((time.monotonic(), pid, data.decode().split("\n")))

    def index(self, first_field: str, after: int = 0) -> int | None:
        for i, (_, _, fields) in enumerate(self.messages[after:], start=after):
            if fields[0].startswith(first_field):
                return i
        return None

    async def wait(self, first_field: str, after: int = 0, timeout_s: float = 10) -> int:
        """Index of the first message from ``after`` on whose first field starts so."""
        deadline = time.monotonic() + timeout_s
        while (i := self.index(first_field, after)) is None:
            assert time.monotonic() < deadline, (first_field, self.messages[after:])
            await asyncio.sleep(0.01)
        return i

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


async def test_sd_notify(tmp_path: Path) -> None:
    """llmd speaks sd_notify(3) to $NOTIFY_SOCKET as a Type=notify service with WatchdogSec=0.4.

    1. Bind a datagram socket in tmp_path; start llmd with NOTIFY_SOCKET pointing at it,
       WATCHDOG_USEC=400000 and no WATCHDOG_PID (one supervised replica).
    2. The first message is READY=1, sent once llmd is listening (/health answers); then
       STATUS="N/1 replicas ready, K in flight".
    3. WATCHDOG=1 arrives about every 0.2 s (half of WatchdogSec).
    4. SIGHUP: RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC, between our clock readings
       around the signal), then READY=1, then STATUS="1/1 replicas ready, 0 in flight".
    5. The replica (a fake llama-server) has none of NOTIFY_SOCKET, WATCHDOG_USEC,
       WATCHDOG_PID in its environment, and every datagram came from llmd's own pid.
    6. SIGTERM: STOPPING=1, and llmd exits 0.
    """
    notify = NotifySocket(tmp_path / "notify")
    path = write_atomic(tmp_path / "config.yaml", config_doc(tmp_path, {"a": supervised(tmp_path)}))
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    try:
        async with llmd_process(path, env=env) as llmd, aiohttp.ClientSession() as s:
            # 2. READY=1 first, once listening; then a STATUS line.
            ready = await notify.wait("READY=1")
            assert ready == 0, notify.messages
            async with s.get(llmd.url + "/health") as resp:
                assert resp.status == 200
            status_i = await notify.wait("STATUS=")
            assert re.fullmatch(r"STATUS=[01]/1 replicas ready, \d+ in flight", notify.messages[status_i][2][0])

            # 3. The watchdog's cadence in steady state: pings keep coming (6 of them, however
            # long a busy machine makes that), never faster than one per 0.2 s on average (the
            # exact interval is test_notify's unit test; gaps are not timed here, a loaded
            # 2-core machine stretches them).
            await wait_ready(s, llmd)
            start = len(notify.messages)

            def pings() -> list[float]:
                return [t for t, _, f in notify.messages[start:] if f == ["WATCHDOG=1"]]

            async with asyncio.timeout(15):
                while len(pings()) < 6:
                    await asyncio.sleep(0.02)
            seen = pings()
            assert len(seen) - 1 <= (seen[-1] - seen[0]) / 0.2 + 1, seen

            # 4. Reload.
            mark = len(notify.messages)
            before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            os.kill(llmd.pid, signal.SIGHUP)
            reloading = await notify.wait("RELOADING=1", mark)
            after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            fields = notify.messages[reloading][2]
            assert len(fields) == 2 and fields[1].startswith("MONOTONIC_USEC="), fields
            assert before_usec <= int(fields[1].partition("=")[2]) <= after_usec
            ready_again = await notify.wait("READY=1", reloading)
            status_i = await notify.wait("STATUS=", ready_again)
            assert notify.messages[status_i][2] == ["STATUS=1/1 replicas ready, 0 in flight"]

            # 5. Children do not inherit the notify variables; only llmd talks to "systemd".
            replica_pid = serving_pids(await admin_status(s, llmd))["a/0"]
            environ = Path(f"/proc/{replica_pid}/environ").read_bytes().split(b"\0")
            names = {e.partition(b"=")[0].decode() for e in environ if e}
            assert "PATH" in names  # the environment was readable
            assert not names & {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}, names

            # 6. Stop.
            mark = len(notify.messages)
            os.kill(llmd.pid, signal.SIGTERM)
            await notify.wait("STOPPING=1", mark)
            assert await asyncio.wait_for(llmd.proc.wait(), 10) == 0
            assert {pid for _, pid, _ in notify.messages} == {llmd.pid}
    finally:
        notify.close()


# --- SIGTERM -------------------------------------------------------------------------------------


async def test_sigterm_drains_a_stream_then_exits_0(tmp_path: Path) -> None:
    """SIGTERM: stop accepting, finish the stream in flight, flush the ledger, stop children.

    1. Start llmd (drain_seconds 5) with model a (one supervised replica); wait until ready.
    2. Start a slow stream (15 tokens, 100 ms apart); after its first token, send SIGTERM.
    3. Once llmd logs that it is draining, a new connection is refused while the stream is
       still being relayed.
    4. The stream completes: all 15 tokens, then [DONE].
    5. llmd exits 0 within drain_seconds of the signal; the replica process is gone and no
       process of this test's model is left; the stream's usage row is in the ledger.
    """
    drain_s = 5
    doc = config_doc(tmp_path, {"a": supervised(tmp_path)}, server={"drain_seconds": drain_s})
    path = write_atomic(tmp_path / "config.yaml", doc)
    async with llmd_process(path) as llmd, aiohttp.ClientSession() as s:
        await wait_ready(s, llmd)
        replica_pid = serving_pids(await admin_status(s, llmd))["a/0"]

        # 2. SIGTERM mid-stream.
        stream = Stream()
        stream_task = asyncio.create_task(stream.run(s, llmd, "a", None, 15, 100))
        await asyncio.wait_for(stream.first.wait(), 10)
        os.kill(llmd.pid, signal.SIGTERM)
        signalled = time.monotonic()

        # 3. No new connections.
        await llmd.wait_log(lambda d: d.get("msg") == "stopping: draining in-flight requests")
        deadline = time.monotonic() + 2
        while True:  # the listening socket closes right after the log line
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", llmd.port)
            except ConnectionRefusedError:
                break
            writer.close()
            assert time.monotonic() < deadline, "llmd still accepts connections while draining"
            await asyncio.sleep(0.02)
        assert not stream_task.done(), "the stream ended before the check: nothing was proven"

        # 4. The stream completes.
        await asyncio.wait_for(stream_task, 10)
        assert stream.contents == expected_tokens(15)
        assert stream.done

        # 5. Exit 0 in time; no child left; the row was flushed.
        code = await asyncio.wait_for(llmd.proc.wait(), drain_s + 5)
        assert code == 0, "\n".join(llmd.lines)
        assert time.monotonic() - signalled < drain_s
        assert not alive(replica_pid)
        assert processes_with(str(tmp_path / "fake.gguf")) == set()
        with sqlite3.connect(tmp_path / "usage.sqlite3") as db:
            rows = db.execute("SELECT model, stream, status, outcome, completion_tokens FROM requests").fetchall()
        assert (("a", 1, 200, "ok", 15)) in rows, rows
