"""Fixtures for tests that need a real broker, and for flow tests of the whole exchange.

The broker is, in order of preference: HDX_TEST_KAFKA_BOOTSTRAP (an Apache Kafka you run),
testcontainers' Kafka where a Docker engine answers, or the embedded Tansu broker. If none
starts, the tests that need one fail and say why; they are never skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerStartError, EmbeddedBroker


@dataclass
class Broker:
    bootstrap_servers: str
    kind: str  # "external" | "testcontainers" | "embedded"

    @property
    def idempotence(self) -> bool:
        # Tansu cannot do InitProducerId; real Kafka can and should.
        return self.kind != "embedded"


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


@pytest.fixture(scope="session")
def stack(kafka: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """All three services, each its own process as deployed, on the session's broker."""
    data = tmp_path_factory.mktemp("hdx")
    env = {
        "HDX_KAFKA_IDEMPOTENCE": str(kafka.idempotence).lower(),
        "HDX_ENVIRONMENT": "test",
        "HDX_LOG_JSON": "true",
        # Short waits so tests of slow paths stay quick.
        "HDX_REGISTRY_REFRESH_SECONDS": "0.5",
    }
    s = LocalStack(data_dir=Path(data), bootstrap_servers=kafka.bootstrap_servers, extra_env=env)
    s.start(ready_timeout=90)
    try:
        yield s
    finally:
        s.stop()
