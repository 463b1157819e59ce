"""publish_all on a real broker: what a stage publishes lands where and as a Kafka client
would put it — keyed records in murmur2's partition, in order, headers intact — however the
producer batches them."""

from __future__ import annotations

import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import murmur2

from hdx_shared.embedded_broker import BrokerEndpoint
from hdx_shared.messaging import Outgoing, ensure_topics, make_broker, publish_all, start_broker
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import TopicSpec

pytestmark = [pytest.mark.broker]

PARTITIONS = 3


async def _read_all(bootstrap: str, topic: str, count: int) -> list[tuple[int, bytes, bytes, dict]]:  # type: ignore[type-arg]
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out = []
    deadline = time.monotonic() + 30
    try:
        while len(out) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(
                    (r.partition, r.key, r.value, {k: v.decode() for k, v in r.headers})
                    for r in records
                )
    finally:
        await consumer.stop()
    return out


def _settings(kafka: BrokerEndpoint, **overrides: int) -> HdxSettings:
    return HdxSettings(
        **kafka.client_settings,
        service_name="publish-test",
        **overrides,  # type: ignore[arg-type]
    )


async def test_records_land_in_their_keys_partitions_in_order_with_their_headers(
    kafka: BrokerEndpoint,
) -> None:
    tag = uuid.uuid4().hex[:8]
    first, second = f"p{tag}.a", f"p{tag}.b"
    # Small record batches, so one partition's records span several of them.
    settings = _settings(kafka, producer_max_batch_bytes=2048)
    await ensure_topics(settings, [TopicSpec(first, PARTITIONS), TopicSpec(second, 1)])
    keys = [f"person-{i % 7}".encode() for i in range(120)]
    outgoing = [
        Outgoing(first, f"{i:04d}".encode() * 40, k, {"ce_id": f"e{i}", "ce_source": "test"})
        for i, k in enumerate(keys)
    ] + [Outgoing(second, b"other", None, {"ce_id": "x"})]
    broker = make_broker(settings)
    await start_broker(broker)
    try:
        await publish_all(broker, outgoing)
    finally:
        await broker.stop()

    got = await _read_all(kafka.bootstrap_servers, first, len(keys))
    assert len(got) == len(keys)
    for partition, key, value, headers in got:
        assert partition == (murmur2(key) & 0x7FFFFFFF) % PARTITIONS  # as the Java client
        i = int(value[:4])
        assert key == keys[i] and headers == {"ce_id": f"e{i}", "ce_source": "test"}
    for p in range(PARTITIONS):
        order = [int(v[:4]) for part, _, v, _ in got if part == p]
        assert order == sorted(order)  # each partition in the order published
    assert [v for _, _, v, _ in await _read_all(kafka.bootstrap_servers, second, 1)] == [b"other"]


async def test_a_record_too_large_to_send_is_refused_and_nothing_of_the_batch_is_sent(
    kafka: BrokerEndpoint,
) -> None:
    tag = uuid.uuid4().hex[:8]
    topic = f"p{tag}.big"
    settings = _settings(kafka)
    await ensure_topics(settings, [TopicSpec(topic, 1)])
    broker = make_broker(settings)
    await start_broker(broker)
    try:
        with pytest.raises(MessageSizeTooLargeError):
            await publish_all(
                broker,
                [
                    Outgoing(topic, b"small", b"k", {}),
                    Outgoing(topic, b"x" * (2 * 1024 * 1024), b"k", {}),
                ],
            )
        await publish_all(broker, [Outgoing(topic, b"after", b"k", {})])
    finally:
        await broker.stop()
    assert [v for _, _, v, _ in await _read_all(kafka.bootstrap_servers, topic, 1)] == [b"after"]
