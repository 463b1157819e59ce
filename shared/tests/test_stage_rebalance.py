"""A rebalance waits for the batch in hand to publish and commit (FinishBatchBeforeRebalance),
so another replica joining or a new publisher topic does not send a batch through twice."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from topic_reading import committed_offset, read_values

from hdx_shared import messaging
from hdx_shared.embedded_broker import BrokerEndpoint
from hdx_shared.messaging import (
    FinishBatchBeforeRebalance,
    Inbound,
    Outgoing,
    StageHealth,
    add_stage,
    ensure_topics,
    make_broker,
    start_broker,
)
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics, TopicSpec


async def test_the_revocation_waits_for_the_batch_in_hand() -> None:
    health = StageHealth("ingress")
    listener = FinishBatchBeforeRebalance(health)
    health.idle.clear()  # a batch is being handled
    revoking = asyncio.create_task(listener.on_partitions_revoked(set()))
    await asyncio.sleep(0.05)
    assert not revoking.done(), "the partitions went before the batch was committed"
    assert health.revoking, "a batch fetched now must not start"
    health.idle.set()  # the batch published and committed
    await asyncio.wait_for(revoking, 1)
    await listener.on_partitions_assigned(set())
    assert not health.revoking


async def test_an_idle_stage_gives_its_partitions_up_at_once() -> None:
    health = StageHealth("router")
    health.idle.set()
    await asyncio.wait_for(FinishBatchBeforeRebalance(health).on_partitions_revoked(set()), 0.5)


async def test_a_batch_that_does_not_finish_does_not_hold_the_group_forever(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(messaging, "REVOKE_WAIT_SECONDS", 0.05)
    health = StageHealth("delivery")
    health.idle.clear()
    with caplog.at_level("WARNING"):
        await asyncio.wait_for(FinishBatchBeforeRebalance(health).on_partitions_revoked(set()), 1)
    assert "did not finish" in caplog.text


async def test_a_new_assignment_clears_a_commit_the_old_group_refused() -> None:
    """A broker restart can refuse the commit of the batch in hand (the member is gone), and
    the restarted broker may have nothing left to redeliver: the stage must not stay
    not-ready for want of a later successful commit."""
    health = StageHealth("ingress")
    health.failed("commit", RuntimeError("CommitFailedError"))
    await FinishBatchBeforeRebalance(health).on_partitions_assigned(set())
    assert health.failing is None
    health.failed("publish", RuntimeError("KafkaTimeoutError"))
    await FinishBatchBeforeRebalance(health).on_partitions_assigned(set())
    assert health.failing is not None, "a failing publish is not the group's business"


@pytest.mark.broker
async def test_a_new_topic_for_a_pattern_stage_does_not_send_the_batch_in_hand_twice(
    kafka: BrokerEndpoint,
) -> None:
    """Seen in the benchmark (≈ 500 duplicate deliveries a run): a publisher registered while
    the ingress handles a batch. aiokafka drops a pattern subscription's assignment as soon
    as its metadata shows the new topic, before the rebalance; the batch's commit was then
    refused, and the batch — already published — came through again."""
    tag = uuid.uuid4().hex[:8]
    topics = Topics(prefix=f"p{tag}.")
    first, later, dst = f"p{tag}.in.a", f"p{tag}.in.b", f"p{tag}.out"
    settings = HdxSettings(
        **kafka.client_settings,
        kafka_metadata_max_age_ms=300,  # the pattern finds the new topic quickly
        service_name="pattern-test",
    )
    await ensure_topics(settings, [TopicSpec(first, 1), TopicSpec(dst, 1)])
    values = [f"m{i}".encode() for i in range(10)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    try:
        for v in values:
            await producer.send_and_wait(first, v, headers=[("ce_id", v), ("ce_source", b"t")])
    finally:
        await producer.stop()

    broker = make_broker(settings)
    batches: list[int] = []

    async def handler(batch: Sequence[Inbound]) -> list[Outgoing]:
        batches.append(len(batch))
        if len(batches) == 1:
            # A new publisher topic appears while this batch is in hand; hold the batch
            # until the consumer has seen it and dropped its assignment.
            await ensure_topics(settings, [TopicSpec(later, 1)])
            consumer = health.subscriber.consumer  # type: ignore[union-attr]
            for _ in range(200):
                if consumer._subscription.subscription.assignment is None:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the consumer never saw the new topic")
        return [Outgoing(dst, m.value) for m in batch]

    health = add_stage(
        broker,
        name="ingress",
        pattern=rf"p{tag}\.in\..*",
        group_id=f"g{tag}",
        handler=handler,
        settings=settings,
        topics=topics,
    )
    await start_broker(broker)
    try:
        got = await read_values(kafka.bootstrap_servers, dst, len(values))
        # Once the group holds the batch's offsets, a batch sent twice would already be out
        # (publishing comes before committing).
        assert await committed_offset(kafka.bootstrap_servers, f"g{tag}", first) == len(values)
        await asyncio.wait_for(health.idle.wait(), 10)
        got = await read_values(kafka.bootstrap_servers, dst, len(values) + 1, wait_s=1)
        assert sorted(got) == sorted(values), f"batches handled: {batches}"
        assert health.failing is None
    finally:
        await broker.stop()


@pytest.mark.broker
async def test_a_stage_joins_with_the_session_timeout_it_is_given(kafka: BrokerEndpoint) -> None:
    """The embedded Tansu answers a JoinGroup only after half the session timeout, so the
    dev stack gives a short one (`EMBEDDED_CLIENT_SETTINGS`); heartbeats go at 3/10 of it, and a
    rebalance still waits for the batch in hand (`REVOKE_WAIT_SECONDS`). The stage's
    assignment is on /metrics (`hdx_stage_partitions`)."""
    tag = uuid.uuid4().hex[:8]
    src = f"s{tag}.in"
    given = {**kafka.client_settings, "consumer_session_timeout_ms": 2_000}
    settings = HdxSettings(**given, service_name="session-test")
    await ensure_topics(settings, [TopicSpec(src, 3)])

    async def handler(batch: Sequence[Inbound]) -> list[Outgoing]:
        return []

    broker = make_broker(settings)
    health = add_stage(
        broker,
        name=f"sessions-{tag}",
        topic=src,
        group_id=f"g{tag}",
        handler=handler,
        settings=settings,
        topics=Topics(prefix=f"s{tag}."),
    )
    await start_broker(broker)
    try:
        consumer = health.subscriber.consumer  # type: ignore[union-attr]
        assert consumer._session_timeout_ms == 2_000
        assert consumer._heartbeat_interval_ms == 600
        assert consumer._rebalance_timeout_ms == messaging.REVOKE_WAIT_SECONDS * 2_000
        partitions = None
        for _ in range(200):
            partitions = REGISTRY.get_sample_value(
                "hdx_stage_partitions", {"stage": f"sessions-{tag}"}
            )
            if partitions:
                break
            await asyncio.sleep(0.05)
        assert partitions == 3
    finally:
        await broker.stop()
