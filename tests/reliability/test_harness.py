"""The reliability harness reads topics to their real end.

The embedded Tansu answers ListOffsets ("latest") with the base offset of a partition's
newest record batch plus one, short of the end by the rest of that batch. A reader that
stopped there would call the batch's tail lost (and a lag computed from it would call a busy
pipeline drained), so the harness takes end offsets from fetches.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer

from hdx_shared.embedded_broker import BrokerEndpoint as Broker
from tests.reliability.harness import TopicTail, end_offsets

pytestmark = [pytest.mark.broker]


def test_end_offsets_and_reads_cover_whole_record_batches(kafka: Broker) -> None:
    topic = f"harness-{uuid.uuid4().hex[:8]}"
    # Large batches: one produce request carries many records per partition.
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 200})
    producer.produce(topic, b"first", partition=0)
    producer.flush(30)
    for i in range(2500):
        producer.produce(topic, f"r{i}".encode(), partition=i % 2)
    assert producer.flush(30) == 0

    ends = end_offsets(kafka.bootstrap_servers, [topic])
    assert ends[(topic, 0)] == 1251 and ends[(topic, 1)] == 1250, ends
    tail = TopicTail(kafka.bootstrap_servers, [topic])
    try:
        assert len(tail.to_end()) == 2501
    finally:
        tail.close()
