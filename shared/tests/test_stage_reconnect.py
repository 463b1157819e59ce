"""A broker that restarts without its data (the embedded Tansu) must not make a stage skip
the records publishers re-send into the re-created topics.

Seen about once in ten runs of tests/reliability/test_broker_restart.py: after the restart
the ingress fetched from its old positions (valid again once the re-sent records had filled
the partitions up to them), handled what lay beyond, and its commit — refused for the
forgotten member, then sent again by faststream with no member at all — was stored. The
group then read on from there, and the re-sent records below were never read.

This test makes that order certain: the stage's heartbeats are far apart, the broker
restarts just after one, and the partition is paused until the records are re-sent."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from topic_reading import committed_offset, read_values

from hdx_shared.embedded_broker import EmbeddedBroker, free_port
from hdx_shared.messaging import (
    Inbound,
    Outgoing,
    ResumeAfterReconnect,
    RewindFailed,
    add_stage,
    ensure_topics,
    make_broker,
    rewind_to_beginning,
    start_broker,
)
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics, TopicSpec

pytestmark = pytest.mark.broker

# Tansu holds a join for half the session timeout, so the session is kept as short as the
# heartbeat allows.
HEARTBEAT_MS = 8_000
# As many partitions as Tansu gives a topic it creates on a client's request: the restarted
# broker may re-create the topic before this test does, and a changed partition count would
# make the group rejoin at once (the order this test needs would be gone).
PARTITIONS = 4


async def _send(bootstrap: str, topic: str, values: Sequence[bytes]) -> None:
    """To partition 0: the re-sent records fill it up to where the stage was."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for v in values:
            headers = [("ce_id", v), ("ce_source", b"t")]
            await producer.send_and_wait(topic, v, partition=0, headers=headers)
    finally:
        await producer.stop()


async def _just_after_a_heartbeat(coordinator: Any, beats: list[float]) -> None:
    """Wait for the next successful heartbeat (recorded by the wrapper the test installed)."""
    seen = len(beats)
    deadline = time.monotonic() + HEARTBEAT_MS / 1000 + 10
    while len(beats) == seen:
        assert time.monotonic() < deadline, "no heartbeat"
        await asyncio.sleep(0.05)


async def test_a_stage_reads_records_resent_after_the_broker_restarted_empty(
    tmp_path: Path,
) -> None:
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "broker.log").start()
    tag = uuid.uuid4().hex[:8]
    src, dst, group = f"r{tag}.in", f"r{tag}.out", f"g{tag}"
    settings = HdxSettings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        kafka_idempotence=False,
        service_name="reconnect-test",
    )
    specs = [TopicSpec(src, PARTITIONS), TopicSpec(dst, 1)]
    first = [f"m{i}".encode() for i in range(6)]
    later = [b"n0", b"n1"]
    stage_broker = None
    try:
        await ensure_topics(settings, specs)
        await _send(broker.bootstrap_servers, src, first)
        stage_broker = make_broker(settings)

        async def forward(batch: Sequence[Inbound]) -> list[Outgoing]:
            return [Outgoing(dst, m.value) for m in batch]

        health = add_stage(
            stage_broker,
            name="forward",
            topic=src,
            group_id=group,
            handler=forward,
            settings=settings,
            topics=Topics(prefix=f"r{tag}."),
        )
        # Heartbeats far apart, so the restart and the re-sending fit between two of them
        # (the member is found gone only at the next).
        health.subscriber._connection_args.update(  # type: ignore[union-attr]
            heartbeat_interval_ms=HEARTBEAT_MS, session_timeout_ms=2 * HEARTBEAT_MS
        )
        await start_broker(stage_broker)
        consumer: Any = health.subscriber.consumer  # type: ignore[union-attr]
        coordinator = consumer._coordinator
        beats: list[float] = []
        heartbeat = coordinator._do_heartbeat

        async def recorded_heartbeat() -> bool:
            ok = bool(await heartbeat())
            if ok:
                beats.append(time.monotonic())
            return ok

        coordinator._do_heartbeat = recorded_heartbeat

        assert sorted(await read_values(broker.bootstrap_servers, dst, len(first))) == first
        assert await committed_offset(broker.bootstrap_servers, group, src) == len(first)

        await _just_after_a_heartbeat(coordinator, beats)
        tps = [TopicPartition(src, p) for p in range(PARTITIONS)]
        consumer.pause(*tps)  # no fetch until the publisher has re-sent
        broker.stop()
        broker.start()
        await ensure_topics(settings, specs)
        await _send(broker.bootstrap_servers, src, first + later)
        assert not beats or time.monotonic() - beats[-1] < HEARTBEAT_MS / 1000 - 2, (
            "the restart took too long to fit between two heartbeats"
        )
        consumer.resume(*tps)

        want = set(first + later)
        got = await read_values(broker.bootstrap_servers, dst, len(want), wait_s=60)
        assert want <= set(got), f"never handled after the restart: {sorted(want - set(got))}"
    finally:
        if stage_broker is not None:
            await stage_broker.stop()
        broker.stop()


async def test_without_a_lost_connection_the_stage_reads_on() -> None:
    resume = ResumeAfterReconnect("router")
    a, b = object(), object()
    assert not await resume.rewound(None, frozenset({a}))
    assert not await resume.rewound(None, frozenset({a, b})), "a new connection is no loss"
    assert not await resume.rewound(None, None), "a consumer that cannot tell is read on"


async def test_after_a_lost_connection_the_batch_is_not_handled_and_the_stage_rewinds() -> None:
    class Consumer:
        def __init__(self) -> None:
            self.sought: dict[TopicPartition, int] = {}
            self.to_beginning: list[TopicPartition] = []

        def assignment(self) -> set[TopicPartition]:
            return {TopicPartition("t", 0), TopicPartition("t", 1)}

        async def committed(self, tp: TopicPartition) -> int | None:
            return 7 if tp.partition == 0 else None

        def seek(self, tp: TopicPartition, offset: int) -> None:
            self.sought[tp] = offset

        async def seek_to_beginning(self, *tps: TopicPartition) -> None:
            self.to_beginning.extend(tps)

    resume = ResumeAfterReconnect("ingress")
    old, new = object(), object()
    consumer = Consumer()
    assert not await resume.rewound(consumer, frozenset({old}))
    assert await resume.rewound(consumer, frozenset({new}))
    assert consumer.sought == {TopicPartition("t", 0): 7}
    assert consumer.to_beginning == [TopicPartition("t", 1)], "no commit: from the beginning"
    assert not await resume.rewound(consumer, frozenset({new})), "once per lost connection"


async def test_a_rewind_that_fails_is_tried_again_and_nothing_is_handled_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Away:
        def assignment(self) -> set[TopicPartition]:
            return {TopicPartition("t", 0)}

        async def committed(self, tp: TopicPartition) -> int | None:
            raise ConnectionError("the broker is still away")

    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    resume = ResumeAfterReconnect("delivery")
    old, new = object(), object()
    assert not await resume.rewound(Away(), frozenset({old}))
    for _ in range(2):  # the batch comes back: the rewind is tried again
        with pytest.raises(RewindFailed):
            await resume.rewound(Away(), frozenset({new}))


async def _no_sleep(_seconds: float) -> None:
    return None


async def test_a_reader_without_a_group_rewinds_to_the_beginning() -> None:
    """A change feed every replica reads whole keeps no offsets: after a lost connection it
    reads its partitions again from the start."""

    class Consumer:
        def __init__(self) -> None:
            self.to_beginning: list[TopicPartition] = []

        def assignment(self) -> set[TopicPartition]:
            return {TopicPartition("consents", 0)}

        async def committed(self, tp: TopicPartition) -> int | None:
            raise AssertionError("a reader without a group has no committed offsets")

        async def seek_to_beginning(self, *tps: TopicPartition) -> None:
            self.to_beginning.extend(tps)

    resume = ResumeAfterReconnect("consent-changes", rewind=rewind_to_beginning)
    consumer = Consumer()
    assert not await resume.rewound(consumer, frozenset({object()}))
    assert await resume.rewound(consumer, frozenset({object()}))
    assert consumer.to_beginning == [TopicPartition("consents", 0)]
