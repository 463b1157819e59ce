"""Fixtures every test folder may use: the databases the persistence tests run against.

SQLite always; PostgreSQL too when it is reachable (HDX_TEST_POSTGRES_URL, else
127.0.0.1:5432 database `test`). The run's header says which were used. In CI
(CI=true) an unreachable PostgreSQL is a failure, not a quiet omission.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_url() -> str | None:
    url = os.environ.get("HDX_TEST_POSTGRES_URL", DEFAULT_PG)
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=2):
            return url
    except Exception:
        return None


POSTGRES = _postgres_url()


def pytest_report_header() -> str:
    return f"hdx databases: sqlite, {'postgresql at ' + POSTGRES if POSTGRES else 'no postgresql'}"


def _backends() -> list[str]:
    if POSTGRES or os.environ.get("CI"):
        return ["sqlite", "postgresql"]
    return ["sqlite"]


@pytest.fixture(params=_backends())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL for one test (SQLite file or PostgreSQL database)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not POSTGRES:
        pytest.fail("CI needs PostgreSQL for the persistence tests and none is reachable "
                    f"at {os.environ.get('HDX_TEST_POSTGRES_URL', DEFAULT_PG)}")
    import psycopg

    name = f"hdx_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
