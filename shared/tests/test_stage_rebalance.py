"""A rebalance waits for the batch in hand to publish and commit (FinishBatchBeforeRebalance),
so another replica joining or a new publisher topic does not send a batch through twice."""

from __future__ import annotations

import asyncio

import pytest

from hdx_shared import messaging
from hdx_shared.messaging import FinishBatchBeforeRebalance, StageHealth


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
