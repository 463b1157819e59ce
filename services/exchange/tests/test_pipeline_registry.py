"""The ingress stage and the registry it shares with other replicas (through the database)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from hdx_exchange import pipeline as pipeline_module
from hdx_exchange.domain.ingress import Publisher
from hdx_exchange.pipeline import ExchangePipeline, Registry
from hdx_exchange.store import ExchangeStore
from hdx_shared.db import make_engine
from hdx_shared.envelope import ChangeType, Envelope
from hdx_shared.fhir import Limits
from hdx_shared.messaging import Inbound
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics

TOPICS = Topics("hdx.")
PATIENT = orjson.dumps({"resourceType": "Patient", "id": "p1", "gender": "female"})


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[ExchangeStore]:
    s = ExchangeStore(make_engine(HdxSettings(data_dir=tmp_path, database_url=database_url)))
    s.create_schema()
    yield s
    s.engine.dispose()


def replica(store: ExchangeStore) -> ExchangePipeline:
    registry = Registry(store)
    registry.refresh()
    return ExchangePipeline(registry, store, TOPICS, Limits(), "http://hdx.test/fhir")


def on_topic(topic: str, source: str, event_id: str) -> Inbound:
    envelope = Envelope(event_id, source, ChangeType.UPDATE)
    return Inbound(topic, 0, 0, None, PATIENT, envelope)


async def test_a_publisher_registered_on_another_replica_is_not_dead_lettered(
    store: ExchangeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_module, "CATCH_UP_SECONDS", 0.0)
    this = replica(store)  # its registry was read before the publisher existed
    new = Publisher("urn:hdx:org:new", "New", "urn:hdx:org:new/id", topic_name="new")
    store.put_publisher(new)  # by another replica's admin API, moments ago

    out = await this.ingress(
        [
            on_topic(TOPICS.publisher_inbound("new"), "", "e1"),  # its own topic
            on_topic(TOPICS.inbound, new.source, "e2"),  # the shared one
        ]
    )
    assert [o.topic for o in out] == [TOPICS.validated] * 2


async def test_an_unknown_sender_still_is_dead_lettered_and_rereads_at_most_once_a_second(
    store: ExchangeStore,
) -> None:
    this = replica(store)
    reads = 0
    real = store.publishers

    def counting() -> dict[str, Publisher]:
        nonlocal reads
        reads += 1
        return real()

    store.publishers = counting  # type: ignore[method-assign]
    for i in range(3):
        out = await this.ingress([on_topic(TOPICS.inbound, "urn:hdx:org:nobody", f"e{i}")])
        assert [o.topic for o in out] == [TOPICS.deadletter]
    assert reads == 0, "read moments ago: no second read within CATCH_UP_SECONDS"
    this.registry.refreshed_at -= pipeline_module.CATCH_UP_SECONDS
    await this.ingress([on_topic(TOPICS.inbound, "urn:hdx:org:nobody", "e9")])
    assert reads == 1
