"""The ingress stage and the registry it shares with other replicas (through the database)."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from hdx_exchange import pipeline as pipeline_module
from hdx_exchange.domain.ingress import Publisher
from hdx_exchange.pipeline import ExchangePipeline, Registry
from hdx_exchange.store import ExchangeStore, Numbering
from hdx_shared.envelope import ChangeType, Envelope
from hdx_shared.fhir import Limits
from hdx_shared.messaging import Inbound
from hdx_shared.topics import Topics

TOPICS = Topics("hdx.")
PATIENT = orjson.dumps({"resourceType": "Patient", "id": "p1", "gender": "female"})


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


OBSERVATION = orjson.dumps({"resourceType": "Observation", "id": "o1", "status": "final"})


def identified(event_id: str) -> Inbound:
    envelope = Envelope(event_id, "urn:hdx:org:a", resource_type="Observation", person="P1")
    return Inbound(TOPICS.identified, 0, 0, b"P1", OBSERVATION, envelope)


def test_every_change_to_the_registry_raises_its_version(
    store: ExchangeStore, subscribe: Callable[[ExchangeStore, str], None]
) -> None:
    seen = [store.registry_version()]
    subscribe(store, "s1")
    seen.append(store.registry_version())
    store.set_subscription_status("s1", "error", "HTTP 500")
    seen.append(store.registry_version())
    store.put_publisher(Publisher("urn:hdx:org:a", "A", "urn:hdx:org:a/id", topic_name="a"))
    seen.append(store.registry_version())
    store.number_events([Numbering("s1", "e1", "Observation")])  # not a registry change
    seen.append(store.registry_version())
    assert seen == [0, 1, 2, 3, 3]


async def test_a_subscription_made_through_another_process_is_routed_from_the_next_batch(
    store: ExchangeStore,
    subscribe: Callable[[ExchangeStore, str], None],
) -> None:
    this = replica(store)  # its registry was read before the subscription existed
    assert await this.route([identified("e1")]) == []
    subscribe(store, "s-new")  # another process's API, moments ago: no refresh here since

    out = await this.route([identified("e2")])
    assert [o.topic for o in out] == [TOPICS.routed]
    assert '"s-new"' in out[0].headers["hdx_candidates"]
    reads = this.registry.refreshed_at
    await this.route([identified("e3")])
    assert this.registry.refreshed_at == reads, "unchanged: the version row only, no re-read"


async def test_delivery_knows_a_subscription_another_process_routed_to(
    store: ExchangeStore,
    subscribe: Callable[[ExchangeStore, str], None],
) -> None:
    this = replica(store)
    subscribe(store, "s-new")
    candidate = {"subscription": "s-new", "subscriber": "home"}
    envelope = Envelope("e1", "urn:hdx:org:a", resource_type="Observation", person="P1")
    decided = envelope.with_extra(hdx_permitted=orjson.dumps([candidate]).decode())
    out = await this.deliver([Inbound(TOPICS.decided, 0, 0, b"P1", OBSERVATION, decided)])
    assert [o.topic for o in out] == [TOPICS.feed("home")]


async def test_the_router_keeps_its_copy_when_the_version_cannot_be_read(
    store: ExchangeStore,
    subscribe: Callable[[ExchangeStore, str], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    subscribe(store, "s1")
    this = replica(store)

    def unreachable() -> int:
        raise OSError("database away")

    store.registry_version = unreachable  # type: ignore[method-assign]
    for i in range(3):
        out = await this.route([identified(f"e{i}")])
        assert [o.topic for o in out] == [TOPICS.routed]
    assert caplog.text.count("registry version not read") == 1  # once, not per batch
