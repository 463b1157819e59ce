"""What the exchange's tests share: its store on the test database, and a subscription in it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hdx_exchange.models import SubscriptionRow
from hdx_exchange.store import ExchangeStore
from hdx_shared.db import make_engine
from hdx_shared.settings import HdxSettings

Subscribe = Callable[[ExchangeStore, str], None]


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[ExchangeStore]:
    """The exchange's store, migrated, on SQLite or PostgreSQL (root conftest's database_url)."""
    s = ExchangeStore(make_engine(HdxSettings(data_dir=tmp_path, database_url=database_url)))
    s.create_schema()
    yield s
    s.engine.dispose()


def _subscribe(store: ExchangeStore, sid: str) -> None:
    store.save_subscription(
        SubscriptionRow(
            id=sid,
            subscriber="home",
            recipient="Organization/home",
            purpose="TREAT",
            criteria="Observation",
            channel="kafka",
            resource=b"{}",
        )
    )


@pytest.fixture
def subscribe() -> Subscribe:
    """Saves a care home's Subscription to every Observation, as the API stores one."""
    return _subscribe
