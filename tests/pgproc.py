"""A real PostgreSQL 15 server for tests, in a temporary directory, stopped after.

Debian's ``postgresql-15`` package puts the server in /usr/lib/postgresql/15/bin (not on PATH).
initdb and postgres refuse to run as root: as root the cluster is created and run as ``nobody``
(via setpriv) in a directory it owns. The server listens on 127.0.0.1 on a free port and on a
unix socket in its own directory; trust authentication (loopback only, throw-away data).

    pg = PgServer.start(tmp_dir)      # initdb + pg_ctl start
    pg.dsn("llmd")                    # postgresql://... of a fresh database
    pg.stop(); pg.start_again()       # an outage of the test's choosing
    pg.close()                        # stop and remove
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakeproc import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@dataclass
class PgServer:
    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @classmethod
    def start(cls) -> PgServer:
        if not (PG_BIN / "initdb").exists():
            pytest.fail("PostgreSQL 15 not found: apt-get install -y postgresql", pytrace=False)
        root = Path(tempfile.mkdtemp(prefix="llmd-pg-"))
        os.chmod(root, 0o755)
        if os.geteuid() == 0:
            shutil.chown(root, "nobody", "nogroup")
        pg = cls(root, free_port())
        pg._run(PG_BIN / "initdb", "-D", str(pg.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                "--no-sync")  # fmt: skip
        pg.start_again()
        return pg

    def _run(self, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_as_server_user(), *map(str, args)], check=check, capture_output=True, text=True, cwd=self.root
        )

    def start_again(self) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        r = self._run(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-o", opts, "-w",
                      "-t", "30", "start", check=False)  # fmt: skip
        if r.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"postgres did not start: {r.stdout}{r.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop", check=False)

    def psql(self, sql: str, db: str = "postgres") -> str:
        r = self._run(PG_BIN / "psql", "-h", self.root, "-p", self.port, "-U", "postgres", "-d", db, "-At",
                      "-v", "ON_ERROR_STOP=1", "-c", sql)  # fmt: skip
        return r.stdout.strip()

    def create_db(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def dsn(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


_counter = iter(range(1, 1_000_000))


def fresh_db(pg: PgServer) -> str:
    """The DSN of a new, empty database (tests share the server, never a database)."""
    return pg.create_db(f"t{os.getpid()}_{next(_counter)}_{int(time.time() * 1000) % 100000}")
