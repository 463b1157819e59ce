from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hdx_exchange.models import SubscriptionRow
from hdx_exchange.store import ExchangeStore
from hdx_shared.db import make_engine
from hdx_shared.settings import HdxSettings


@pytest.fixture
def st(database_url: str, tmp_path: Path) -> Iterator[ExchangeStore]:
    s = ExchangeStore(make_engine(HdxSettings(data_dir=tmp_path, database_url=database_url)))
    s.create_schema()
    for sid in ("s1", "s2"):
        s.save_subscription(
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
    yield s
    s.engine.dispose()


def test_event_numbers_are_gapless_per_subscription_and_stable_on_redelivery(
    st: ExchangeStore,
) -> None:
    first = st.number_events(
        [("s1", "e1", "Observation"), ("s1", "e2", "Observation"), ("s2", "e1", "Observation")]
    )
    assert first == {("s1", "e1"): 1, ("s1", "e2"): 2, ("s2", "e1"): 1}
    # A redelivered batch, with one new event: old numbers kept, the new one is next.
    again = st.number_events([("s1", "e2", "Observation"), ("s1", "e3", "Observation")])
    assert again == {("s1", "e2"): 2, ("s1", "e3"): 3}
    assert [d.event_number for d in st.deliveries("s1")] == [1, 2, 3]
    row = st.subscription_row("s1")
    assert row is not None and row.event_count == 3


def test_the_same_event_twice_in_one_batch_gets_one_number(st: ExchangeStore) -> None:
    assert st.number_events([("s1", "e1", "Observation"), ("s1", "e1", "Observation")]) == {
        ("s1", "e1"): 1
    }
