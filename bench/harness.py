"""What the benchmarks share: ports, HTTP probes, child processes (start, pin, stop), llmd with
real llama-server replicas as a subprocess, CPU time and RSS of a pid from /proc, wrk runs and
their parsing, and the pieces of a Markdown report.

Imported as ``harness`` by the scripts next to it (a script's own directory is first on
``sys.path``), so every benchmark stays runnable as ``.venv/bin/python bench/NAME.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
LLAMA = ROOT / "bin" / "llama-server"
MODEL_PATH = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
MODEL = "chat"  # the name the llama-server benchmarks serve MODEL_PATH under

# --- ports and HTTP --------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free a moment ago (for children that cannot report the port they bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(port: int, path: str, timeout_s: float = 1.0) -> int:
    """The status of ``GET path`` on a loopback port (a readiness probe; never through a proxy)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def http_post_json(url: str, doc: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        result: dict[str, Any] = json.loads(r.read())
        return result


# --- child processes -------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def child_setup(cpus: set[int] | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: runs in the child between fork and exec (the benchmarks start children
    from one thread, so that is safe)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        # If the benchmark is killed outright (SIGKILL, OOM), its children get SIGTERM instead of
        # running on as orphans that hold ports and CPU (llmd then stops its own replicas).
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus is not None:
            # Set before exec, so every thread the child ever starts (llmd's aiosqlite thread,
            # nginx's worker) inherits the affinity.
            os.sched_setaffinity(0, cpus)

    return setup


class Procs:
    """Every child a benchmark starts; ``stop_all`` runs on exit, error and Ctrl-C."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], cpus: set[int] | None, **kw: Any) -> subprocess.Popen[bytes]:
        # start_new_session: Ctrl-C in the terminal reaches only us; we stop the children in order.
        p = subprocess.Popen(argv, start_new_session=True, preexec_fn=child_setup(cpus), **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)


def wait_until(
    cond: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path | None, timeout_s: float = 20.0
) -> None:
    """Poll ``cond`` until it holds; exit the benchmark (with the log's tail) if ``proc`` dies or
    the time runs out. Connection errors count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}" + (f"; its log:\n{tail(log)}" if log else ""))
        with contextlib.suppress(OSError, http.client.HTTPException):
            if cond():
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not ready after {timeout_s:g}s" + (f"; its log:\n{tail(log)}" if log else ""))
        time.sleep(0.05)


def tail(path: Path | None, n: int = 30) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def install_sigterm() -> None:
    # SIGTERM -> SystemExit, so `finally` blocks stop llmd and its replicas as on Ctrl-C.
    def on_term(*_: object) -> None:
        print("terminated; stopping llmd and its replicas", file=sys.stderr)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)


# --- llmd with real llama-server replicas, as a subprocess -----------------------------------------


@dataclass
class Llmd:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    usage_path: Path
    admin_headers: dict[str, str] = field(default_factory=dict)
    replica_pids: list[int] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        code, body = http_get(self.url + "/admin/status", self.admin_headers)
        if code != 200:
            raise RuntimeError(f"/admin/status: {code} {body[:300]}")
        result: dict[str, Any] = json.loads(body)
        return result

    def metrics(self) -> str:
        return http_get(self.url + "/metrics")[1]


def serve_llmd(
    procs: Procs,
    config: Path,
    cpus: set[int] | None,
    log: Path,
    name: str = "llmd",
    src: Path | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """`llmd serve -c config` from ``src`` (default this checkout: ``-m llmd`` imports the
    package from the working directory), its output in ``log``; (process, port) once /readyz
    answers 200 (the port is read from its "listening" log line: configs bind port 0)."""
    src = src or ROOT
    p = procs.start(
        [PYTHON, "-m", "llmd", "serve", "-c", str(config)],
        cpus,
        cwd=src,
        env={**os.environ, "PYTHONPATH": str(src)},
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    port = 0

    def listening() -> bool:
        nonlocal port
        m = re.search(r'"msg":"listening".*?"port":(\d+)', log.read_text(errors="replace"))
        if m:
            port = int(m.group(1))
        return port != 0 and http_status(port, "/readyz") == 200

    wait_until(listening, name, p, log)
    return p, port


def llama_launcher() -> dict[str, Any]:
    # Quick health polling so that "ready" is noticed within half a second of llama-server loading.
    return {"llama-server": {"command": str(LLAMA), "start_timeout_s": 120, "health_interval_s": 0.5}}


def start_llmd(
    doc: dict[str, Any],
    workdir: Path,
    admin_headers: dict[str, str] | None = None,
    src: Path = ROOT,
    every_replica: bool = True,
) -> Llmd:
    """Write ``doc`` (server.port and usage.path are filled in), start ``python -m llmd serve`` from
    the source tree ``src`` in its own session (so Ctrl-C reaches only the benchmark, which then
    stops llmd in order), and wait for /readyz. Returns with every replica READY (or, without
    ``every_replica``, once /readyz answers 200: on-demand models are cold then)."""
    if not (LLAMA.exists() and MODEL_PATH.exists()):
        sys.exit("bin/llama-server or the model is missing: run `make setup` first")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    doc = {**doc, "server": {**doc.get("server", {}), "host": "127.0.0.1", "port": port}}
    usage_path = workdir / "usage.sqlite3"
    doc["usage"] = {"path": str(usage_path), "flush_ms": 50}
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    log = workdir / "llmd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmd", "serve", "-c", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=src,  # `-m` puts the cwd first on sys.path: this tree's llmd is the one that runs
            start_new_session=True,
            preexec_fn=child_setup(),
        )
    srv = Llmd(proc, f"http://127.0.0.1:{port}", log, usage_path, admin_headers or {})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llmd exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http_get(srv.url + "/readyz", timeout=2)[0] == 200:
                # /readyz wants one READY replica per model; the benchmarks want all of them.
                reps = srv.status()["replicas"]
                srv.replica_pids = [r["pid"] for r in reps if r.get("pid")]
                if not every_replica or all(r["state"] == "ready" for r in reps):
                    return srv
        except OSError:
            pass
        time.sleep(0.25)
    stop_llmd(srv)
    raise TimeoutError("llmd not ready in 180 s:\n" + log.read_text()[-3000:])


def stop_llmd(srv: Llmd) -> None:
    """SIGTERM (llmd drains, flushes its ledger and stops its replicas), then SIGKILL if it hangs;
    then make sure no replica it started is left (by the pids it reported, nothing broader)."""
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(10)
    for pid in srv.replica_pids:
        try:
            os.kill(pid, signal.SIGKILL)
            print(f"  note: replica pid {pid} outlived llmd; killed", file=sys.stderr)
        except ProcessLookupError:
            pass


def warm_replicas(srv: Llmd) -> None:
    """One tiny request straight to each replica (not through llmd, so the balancer's index stays
    empty): the first request after start pays for page faults of the mmapped weights."""
    for r in srv.status()["replicas"]:
        http_post_json(
            r["url"] + "/chat/completions", {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2}
        )


def counter(metrics_text: str, name: str, label: str) -> dict[str, float]:
    """``name{...label="X"...} value`` lines of a Prometheus text page -> {X: value}."""
    out: dict[str, float] = {}
    for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", metrics_text, re.M):
        lm = re.search(rf'{label}="([^"]*)"', m.group(1))
        if lm:
            out[lm.group(1)] = out.get(lm.group(1), 0.0) + float(m.group(2))
    return out


# --- CPU time and memory of a pid ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    return sum(cpu_user_sys(pid))


def cpu_user_sys(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of pid and its live descendants, plus the reaped children's
    (cutime, cstime). Descendants matter for nginx (the worker does the work, the master waits)."""
    user = system = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14..17.
        user += (int(fields[11]) + int(fields[13])) / CLK_TCK
        system += (int(fields[12]) + int(fields[14])) / CLK_TCK
    return user, system


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    vals: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine (all CPUs) since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / CLK_TCK


def own_cpu() -> float:
    """This process's CPU plus its reaped children's (wrk, once communicate() returned)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# --- wrk -------------------------------------------------------------------------------------------

# A POST with a fixed body; at the end wrk prints one BENCH_JSON line that ``wrk`` below parses.
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {secret}"
wrk.body = [[{body}]]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class Run:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    hop_cpu_s: float  # user + system
    hop_sys_s: float  # of which system (syscalls: sockets, the log file, epoll)
    mock_cpu_s: float
    foreign_cores: float  # CPU used by processes not part of the benchmark, in cores (0.1 = 10% of one)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


@dataclass
class Agg:
    """The runs of one hop x shape, one per round, in round order. Every figure is the median over
    the rounds: on a VM, throughput dips of 10-20% lasting seconds come and go with no trace in
    the guest (see README), and a median of interleaved rounds shrugs off one bad round."""

    runs: list[Run] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.runs)

    @property
    def p50(self) -> float:
        return statistics.median(r.p50_ms for r in self.runs)

    @property
    def p99(self) -> float:
        return statistics.median(r.p99_ms for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def hop_util(self) -> float:
        """Share of one core the hop used: ~100% means it is CPU-bound, its RPS is 1/CPU-per-request."""
        return statistics.median(r.hop_cpu_s / r.seconds for r in self.runs)

    def cpu_ms(self, hop: bool = True) -> float:
        """CPU milliseconds per request of the hop (or of the mock)."""
        return statistics.median(1000 * (r.hop_cpu_s if hop else r.mock_cpu_s) / max(1, r.requests) for r in self.runs)

    @property
    def sys_share(self) -> float:
        """Share of the hop's CPU spent in the kernel."""
        return statistics.median(r.hop_sys_s / r.hop_cpu_s if r.hop_cpu_s else 0.0 for r in self.runs)

    def ratio(self, other: Agg) -> float:
        """Median of the per-round RPS ratios self/other: paired, so each ratio compares runs that
        ran next to each other in time."""
        return statistics.median(a.rps / b.rps for a, b in zip(self.runs, other.runs, strict=True))


def wrk(
    wrk_exe: str,
    procs: Procs,
    cpus: set[int] | None,
    script: Path,
    port: int,
    conns: int,
    seconds: float,
    hop: subprocess.Popen[bytes] | None,
    mock: subprocess.Popen[bytes],
) -> Run:
    """One closed-loop wrk run (1 thread, ``conns`` connections) against a loopback port, with the
    CPU the hop under test, the upstream mock and everything else on the machine used meanwhile."""
    hop_cpu0, hop_sys0 = cpu_user_sys(hop.pid) if hop else (0.0, 0.0)
    mock_cpu0 = cpu_seconds(mock.pid)
    ours0, busy0, wall0 = own_cpu(), machine_busy(), time.monotonic()
    argv = [
        wrk_exe,
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/v1/chat/completions",
    ]
    p = procs.start(argv, cpus, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate()
    procs.procs.remove(p)
    hop_user, hop_sys = cpu_user_sys(hop.pid) if hop else (0.0, 0.0)
    hop_sys -= hop_sys0
    hop_cpu = hop_user - hop_cpu0 + hop_sys
    mock_cpu = cpu_seconds(mock.pid) - mock_cpu0
    # Whatever else ran on the machine meanwhile (another test suite, a build): busy time of all
    # CPUs minus ours (hop, mock, wrk, this script). Reported, so a noisy run is visible as such.
    foreign = (machine_busy() - busy0) - hop_cpu - mock_cpu - (own_cpu() - ours0)
    wall = time.monotonic() - wall0
    m = re.search(rb"BENCH_JSON (\{.*\})", out)
    if p.returncode != 0 or m is None:
        raise SystemExit(f"wrk failed ({p.returncode}):\n{out.decode(errors='replace')}")
    r = json.loads(m.group(1))
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return Run(
        r["requests"],
        r["duration_us"] / 1e6,
        r["p50_us"] / 1000,
        r["p99_us"] / 1000,
        errors,
        hop_cpu,
        hop_sys,
        mock_cpu,
        max(0.0, foreign) / wall,
    )


# --- reports ---------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples, report a real sample)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    """A Markdown table's lines. ``align`` has one letter per column, ``l`` or ``r`` (numbers);
    columns beyond it are left-aligned."""
    seps = ["---:" if i < len(align) and align[i] == "r" else "---" for i in range(len(header))]
    return [f"| {' | '.join(header)} |", f"|{'|'.join(seps)}|", *(f"| {' | '.join(r)} |" for r in rows)]
