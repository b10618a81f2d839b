"""`llmd serve` in front of the real llama-server, for the real-engine test modules: start
it from a config document, wait for /readyz, read its ledger, stop it."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import write_config

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "bin" / "llama-server"
MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


def call(url: str, body: dict[str, Any] | bytes | None, key: str | None = None, timeout: float = 120,
         **headers: str) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """(status, headers, body) of a GET (no body) or a JSON POST; HTTP errors are answers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    h = {"Content-Type": "application/json", **headers}
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=h, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class RealLlmd:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, db: Path, log: Path) -> None:
        self.proc, self.url, self.db, self.log = proc, url, db, log

    def replica(self, key: str | None = None, model: str | None = None) -> str:
        """The origin of the (only) replica of ``model``, to ask it the same question directly."""
        reps = json.loads(call(self.url + "/admin/status", None, key)[2])["replicas"]
        (rep,) = [r for r in reps if model is None or r["model"] == model]
        return str(rep["url"]).removesuffix("/v1")

    def rows(self) -> list[dict[str, Any]]:
        con = sqlite3.connect(self.db)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("select * from requests order by id")]
        except sqlite3.OperationalError:
            return []  # not created yet
        finally:
            con.close()

    def settled_count(self, key: str | None = None, timeout_s: float = 20) -> int:
        """The number of rows once everything answered so far is written (nothing pending in
        the write-behind queue): where the next request's row will be."""
        deadline = time.monotonic() + timeout_s
        while True:
            usage = json.loads(call(self.url + "/admin/status", None, key)[2])["usage"]
            if usage["pending_rows"] == 0:
                time.sleep(0.1)  # a stream's row settles just after its last byte
                again = json.loads(call(self.url + "/admin/status", None, key)[2])["usage"]
                if again["pending_rows"] == 0:
                    return len(self.rows())
            assert time.monotonic() < deadline, "the ledger did not settle"
            time.sleep(0.05)

    def row_after(self, n: int, timeout_s: float = 20) -> dict[str, Any]:
        """The (n+1)-th row, once the write-behind ledger has it."""
        deadline = time.monotonic() + timeout_s
        while len(rows := self.rows()) <= n:
            assert time.monotonic() < deadline, f"{len(rows)} rows, waited for row {n + 1}"
            time.sleep(0.05)
        return rows[n]


def _ready(url: str) -> bool:
    try:
        return call(url + "/readyz", None, timeout=2)[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def real_llmd(tmp: Path, doc: dict[str, Any], ready_timeout_s: float = 120) -> Iterator[RealLlmd]:
    """`llmd serve -c` the document (its server.port must be set) until the block ends."""
    assert LLAMA.exists() and MODEL.exists(), "run `make setup` (packaging/setup.sh) first"
    path = write_config(tmp / "config.yaml", doc)
    log = tmp / "llmd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llmd", "serve", "-c", str(path)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    srv = RealLlmd(proc, f"http://127.0.0.1:{doc['server']['port']}", Path(doc["usage"]["path"]), log)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not _ready(srv.url):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.25)
        yield srv
    finally:
        proc.terminate()
        proc.wait(30)
