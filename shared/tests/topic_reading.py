"""Reading what a stage wrote (from the beginning of a topic, without a consumer group) and
what its group committed."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition


async def read_values(bootstrap: str, topic: str, count: int, wait_s: float = 30) -> list[bytes]:
    """The topic's record values, until `count` arrived or `wait_s` passed."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[bytes] = []
    deadline = time.monotonic() + wait_s
    try:
        while len(out) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(r.value for r in records)
    finally:
        await consumer.stop()
    return out


async def committed_offset(bootstrap: str, group: str, topic: str, wait_s: float = 30) -> int:
    """The group's committed offset on the topic's partition 0, once it has one (else -1)."""
    # A consumer of the group that never subscribes: it only asks the coordinator.
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await reader.start()
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            found = await reader.committed(TopicPartition(topic, 0))
            if found is not None:
                return int(found)
            await asyncio.sleep(0.2)
        return -1
    finally:
        await reader.stop()
