"""A stage's batch subscriber fetches again at once after an idle fetch (no nap between)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from faststream.kafka.subscriber.usecase import BatchSubscriber

from hdx_shared import messaging
from hdx_shared.messaging import Inbound, Outgoing, PromptBatchSubscriber, add_stage, make_broker
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics


class FakeConsumer:
    """getmany answers from a script; each call may move a fake clock on (time it waited)."""

    def __init__(self, answers: list[tuple[dict[Any, list[Any]], float]], clock: list[float]):
        self.answers = answers
        self.clock = clock
        self.calls: list[tuple[int, int | None]] = []

    async def getmany(self, timeout_ms: int, max_records: int | None = None) -> Any:
        self.calls.append((timeout_ms, max_records))
        answer, waited = self.answers.pop(0)
        self.clock[0] += waited
        return answer


def _stage_subscriber(settings: HdxSettings) -> Any:
    async def handler(batch: Sequence[Inbound]) -> Sequence[Outgoing]:
        return []

    broker = make_broker(settings)
    health = add_stage(
        broker,
        name="s",
        topic="t.in",
        group_id="g",
        handler=handler,
        settings=settings,
        topics=Topics("t."),
    )
    return health.subscriber


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(messaging, "_clock", lambda: now[0])
    return now


@pytest.fixture
def naps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return slept


def test_every_stage_gets_the_prompt_subscriber() -> None:
    sub = _stage_subscriber(HdxSettings(consumer_batch_timeout_ms=20, consumer_batch_size=7))
    assert type(sub) is PromptBatchSubscriber
    assert isinstance(sub, BatchSubscriber)
    assert (sub.batch_timeout_ms, sub.max_records) == (20, 7)


async def test_records_are_returned_as_one_batch(clock: list[float], naps: list[float]) -> None:
    sub = _stage_subscriber(HdxSettings(consumer_batch_timeout_ms=20, consumer_batch_size=500))
    consumer = FakeConsumer([({"tp0": ["a", "b"], "tp1": ["c"]}, 0.002)], clock)
    assert await sub.get_msg(consumer) == ("a", "b", "c")
    assert consumer.calls == [(20, 500)]
    assert naps == []


async def test_an_idle_fetch_is_followed_at_once_by_the_next(
    clock: list[float], naps: list[float]
) -> None:
    """faststream's own get_msg sleeps the batch timeout again after a getmany that found
    nothing; a record arriving then would wait for it. Here nothing is slept."""
    sub = _stage_subscriber(HdxSettings(consumer_batch_timeout_ms=20))
    consumer = FakeConsumer([({}, 0.020), ({"tp": ["x"]}, 0.001)], clock)
    assert await sub.get_msg(consumer) == ()
    assert naps == []
    assert await sub.get_msg(consumer) == ("x",)


async def test_a_getmany_that_returns_empty_at_once_never_makes_a_busy_loop(
    clock: list[float], naps: list[float]
) -> None:
    sub = _stage_subscriber(HdxSettings(consumer_batch_timeout_ms=20))
    consumer = FakeConsumer([({}, 0.0)], clock)
    assert await sub.get_msg(consumer) == ()
    assert naps == [pytest.approx(0.020)]
