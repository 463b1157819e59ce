"""Fixtures for flow tests: all three services running on the session's real broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint as Broker


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
        # Every test client asks for tokens from 127.0.0.1: one address, many clients.
        "HDX_AUTH_TOKEN_RATE_LIMIT": "100/second",
        "HDX_AUTH_REVOCATION_REFRESH_SECONDS": "0.5",
        "HDX_REST_HOOK_BACKOFF_BASE_SECONDS": "0.1",
        "HDX_REST_HOOK_BACKOFF_MAX_SECONDS": "0.5",
        "HDX_REST_HOOK_MAX_ATTEMPTS": "4",
        "HDX_REST_HOOK_TIMEOUT_SECONDS": "2",
    }
    s = LocalStack(data_dir=Path(data), bootstrap_servers=kafka.bootstrap_servers, extra_env=env)
    s.start(ready_timeout=90)
    try:
        yield s
    finally:
        s.stop()
