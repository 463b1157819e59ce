"""Fixtures every test folder may use: a real broker, and the databases persistence tests
run against.

The broker is, in order of preference: HDX_TEST_KAFKA_BOOTSTRAP (an Apache Kafka you run),
testcontainers' Kafka where a Docker engine answers, or the embedded Tansu broker. If none
starts, the tests that need one fail and say why; they are never skipped.

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

from hdx_shared.embedded_broker import BrokerEndpoint as Broker
from hdx_shared.embedded_broker import BrokerStartError, EmbeddedBroker

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
        pytest.fail(
            "CI needs PostgreSQL for the persistence tests and none is reachable "
            f"at {os.environ.get('HDX_TEST_POSTGRES_URL', DEFAULT_PG)}"
        )
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


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    external = os.environ.get("HDX_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield Broker(external, "external")
        return
    if _docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:3.9.1").with_kraft() as container:
            yield Broker(container.get_bootstrap_server(), "testcontainers")
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    try:
        broker = EmbeddedBroker(log_path=log).start()
    except BrokerStartError as exc:
        pytest.fail(
            f"no Kafka broker for the tests: no HDX_TEST_KAFKA_BOOTSTRAP, no Docker "
            f"engine, and the embedded broker failed: {exc}"
        )
    try:
        yield Broker(broker.bootstrap_servers, "embedded")
    finally:
        broker.stop()
