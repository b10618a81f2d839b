"""Session fixtures for the shared stores: one real PostgreSQL and one real redis-server per
test session (per xdist worker), started on first use and stopped at the end.
Registered for every test module by conftest.py's ``pytest_plugins``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pgproc import PgServer
from tests.redisproc import RedisServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    pg = PgServer.start()
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    r = RedisServer.start()
    try:
        yield r
    finally:
        r.close()
