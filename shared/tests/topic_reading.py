"""Reading what a stage wrote, from the beginning of a topic, without a consumer group."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer


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
