"""A stack shared by the poison and regression tests that need all three services (each
under its own publisher and subscriptions). The crash, broker-restart and hostile-input
tests run their own: they kill, restart or may wedge services."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint as Broker
from hdx_shared.topics import Topics
from tests.reliability.harness import stack_env, tag


@pytest.fixture(scope="package")
def shared_stack(
    kafka: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Topics]]:
    prefix = f"rel{tag()}."
    stack = LocalStack(
        data_dir=tmp_path_factory.mktemp("reliability"),
        bootstrap_servers=kafka.bootstrap_servers,
        extra_env=stack_env(prefix, idempotence=kafka.idempotence),
    )
    stack.start(ready_timeout=90)
    try:
        yield stack, Topics(prefix)
    finally:
        stack.stop()
