"""The pipeline stage on a real broker: at-least-once, poison messages, failing closed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaProducer
from topic_reading import read_values

from hdx_shared.embedded_broker import BrokerEndpoint
from hdx_shared.messaging import (
    Inbound,
    Outgoing,
    Unavailable,
    add_stage,
    ensure_topics,
    make_broker,
    start_broker,
)
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics, TopicSpec

pytestmark = [pytest.mark.broker]


async def _run_stage(kafka: BrokerEndpoint, handler, values: list[bytes], partitions: int = 1):  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex[:8]
    topics = Topics(prefix=f"t{tag}.")
    src, dst = f"t{tag}.in", f"t{tag}.out"
    settings = HdxSettings(
        **kafka.client_settings,
        max_delivery_attempts=3,
        service_name="stage-test",
    )
    await ensure_topics(
        settings,
        [TopicSpec(src, partitions), TopicSpec(dst, 1), TopicSpec(topics.deadletter, 1)],
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    for i, v in enumerate(values):
        await producer.send_and_wait(
            src, v, partition=i % partitions, headers=[("ce_id", v), ("ce_source", b"test")]
        )
    await producer.stop()
    broker = make_broker(settings)
    health = add_stage(
        broker,
        name="t",
        topic=src,
        group_id=f"g{tag}",
        handler=lambda batch: handler(batch, dst),
        settings=settings,
        topics=topics,
    )
    await start_broker(broker)
    return broker, health, dst, topics


async def test_a_failed_batch_is_redelivered_and_its_output_sent_once(
    kafka: BrokerEndpoint,
) -> None:
    failures = {"left": 1}

    async def flaky(batch: Sequence[Inbound], dst: str) -> list[Outgoing]:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("transient")
        return [Outgoing(dst, m.value) for m in batch]

    values = [f"m{i}".encode() for i in range(20)]
    broker, health, dst, _ = await _run_stage(kafka, flaky, values)
    try:
        got = await read_values(kafka.bootstrap_servers, dst, len(values))
        assert sorted(got) == sorted(values)
        assert health.dead_lettered == 0
    finally:
        await broker.stop()


async def test_a_poison_message_is_dead_lettered_and_the_partition_moves_on(
    kafka: BrokerEndpoint,
) -> None:
    async def poisoned(batch: Sequence[Inbound], dst: str) -> list[Outgoing]:
        if any(m.value == b"poison" for m in batch):
            raise ValueError("cannot digest this")
        return [Outgoing(dst, m.value) for m in batch]

    # Across partitions: a redelivered batch may start on another partition, and the
    # poison must still be counted and dead-lettered.
    values = [b"a", b"b", b"poison", b"c", b"d", b"e", b"f"]
    broker, health, dst, topics = await _run_stage(kafka, poisoned, values, partitions=3)
    try:
        got = await read_values(kafka.bootstrap_servers, dst, 6)
        assert sorted(got) == [b"a", b"b", b"c", b"d", b"e", b"f"]
        dead = await read_values(kafka.bootstrap_servers, topics.deadletter, 1)
        assert dead == [b"poison"]
        assert health.dead_lettered == 1
    finally:
        await broker.stop()


async def test_unavailable_state_waits_and_never_dead_letters(kafka: BrokerEndpoint) -> None:
    down = {"until": time.monotonic() + 2.0}

    async def needs_state(batch: Sequence[Inbound], dst: str) -> list[Outgoing]:
        if time.monotonic() < down["until"]:
            raise Unavailable("database down")
        return [Outgoing(dst, m.value) for m in batch]

    values = [b"x", b"y", b"z"]
    broker, health, dst, _ = await _run_stage(kafka, needs_state, values)
    try:
        await asyncio.sleep(0.5)
        got = await read_values(kafka.bootstrap_servers, dst, 3)
        assert sorted(got) == sorted(values)
        assert health.dead_lettered == 0
        assert health.ready
    finally:
        await broker.stop()
