"""/readyz follows a stage's consumption: not ready when its consume loop has ended or when
its broker stopped answering for longer than HDX_STAGE_FAILURE_SECONDS, ready again once
the broker is back (on a real broker: an embedded one of the test's own, so it can be
stopped and started)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fastapi import FastAPI

from hdx_shared.embedded_broker import BrokerEndpoint, EmbeddedBroker, free_port
from hdx_shared.http import ServiceRuntime, health_router
from hdx_shared.messaging import (
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

pytestmark = [pytest.mark.broker]


async def _until(what: str, check: Callable[[], Any], within: float = 60) -> Any:
    deadline = time.monotonic() + within
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
    return value


async def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, headers=[("ce_id", value)])
    finally:
        await producer.stop()


async def _read_until(bootstrap: str, topic: str, want: bytes, within: float = 60) -> None:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + within
        while True:
            got = [r.value for rs in (await consumer.getmany(timeout_ms=500)).values() for r in rs]
            if want in got:
                return
            assert time.monotonic() < deadline, f"{want!r} never reached {topic}"
    finally:
        await consumer.stop()


class Stage:
    """One pass-through stage src → dst, its runtime and its /readyz."""

    def __init__(self, bootstrap: str, idempotence: bool, failure_seconds: float) -> None:
        tag = uuid.uuid4().hex[:8]
        self.topics = Topics(prefix=f"r{tag}.")
        self.src, self.dst = f"r{tag}.in", f"r{tag}.out"
        self.settings = HdxSettings(
            kafka_bootstrap_servers=bootstrap,
            kafka_idempotence=idempotence,
            stage_failure_seconds=failure_seconds,
            service_name="readiness-test",
        )
        self.broker = make_broker(self.settings)

        async def forward(batch: Sequence[Inbound]) -> list[Outgoing]:
            return [Outgoing(self.dst, m.value) for m in batch]

        self.health: StageHealth = add_stage(
            self.broker,
            name="forward",
            topic=self.src,
            group_id=f"g{tag}",
            handler=forward,
            settings=self.settings,
            topics=self.topics,
        )
        self.runtime = ServiceRuntime(self.settings, self.topics, self.broker, [self.health])
        app = FastAPI()
        app.include_router(health_router(self.runtime))
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")

    async def start(self) -> None:
        await ensure_topics(
            self.settings,
            [TopicSpec(self.src, 1), TopicSpec(self.dst, 1), TopicSpec(self.topics.deadletter, 1)],
        )
        await start_broker(self.broker)
        self.runtime.started = True

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        r = await self.http.get("/readyz")
        return r.status_code, r.json()

    async def healthz(self) -> tuple[int, dict[str, Any]]:
        r = await self.http.get("/healthz")
        return r.status_code, r.json()

    async def stop(self) -> None:
        await self.http.aclose()
        await self.broker.stop()


@pytest.fixture
async def own_broker(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "broker.log").start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_a_stage_whose_consume_loop_ended_is_not_ready_nor_live(
    kafka: BrokerEndpoint,
) -> None:
    stage = Stage(kafka.bootstrap_servers, kafka.idempotence, failure_seconds=30)
    await stage.start()
    try:
        await _produce(kafka.bootstrap_servers, stage.src, b"one")
        await _read_until(kafka.bootstrap_servers, stage.dst, b"one")
        assert (await stage.readyz())[0] == 200
        assert (await stage.healthz())[0] == 200
        for task in stage.health.subscriber.tasks:
            task.cancel()
        await _until(
            "the loop to end", lambda: all(t.done() for t in stage.health.subscriber.tasks)
        )
        status, body = await stage.readyz()
        assert status == 503
        assert "forward: consume loop stopped" in body["reasons"], body
        # Liveness too: only a restart brings the loop back.
        status, body = await stage.healthz()
        assert status == 503 and body["stages"] == ["forward"], body
    finally:
        await stage.stop()


async def test_readiness_follows_the_broker_going_away_and_coming_back(
    own_broker: EmbeddedBroker,
) -> None:
    bootstrap = own_broker.bootstrap_servers
    stage = Stage(bootstrap, idempotence=False, failure_seconds=2)
    await stage.start()
    try:
        await _produce(bootstrap, stage.src, b"before")
        await _read_until(bootstrap, stage.dst, b"before")
        await _until("ready", lambda: stage.health.problem() is None)
        assert (await stage.readyz())[0] == 200

        await asyncio.to_thread(own_broker.stop)  # off the loop: it may take seconds
        problem = await _until("not ready", stage.health.problem)
        status, body = await stage.readyz()
        assert status == 503 and f"forward: {problem}" in body["reasons"], body

        # The same port; it has forgotten every topic and offset.
        await asyncio.to_thread(own_broker.start)
        await _until("ready again", lambda: stage.health.problem() is None, within=90)
        await _produce(bootstrap, stage.src, b"after")
        await _read_until(bootstrap, stage.dst, b"after", within=90)
        assert (await stage.readyz())[0] == 200
    finally:
        await stage.stop()


async def test_topics_a_restarted_broker_forgot_are_created_again(
    own_broker: EmbeddedBroker,
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from hdx_shared.messaging import keep_topics

    bootstrap = own_broker.bootstrap_servers
    settings = HdxSettings(kafka_bootstrap_servers=bootstrap, topic_check_seconds=0.2)
    tag = uuid.uuid4().hex[:8]
    specs = [TopicSpec(f"k{tag}.six", 6), TopicSpec(f"k{tag}.kept", 3, compacted=True)]

    async def shapes() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            names = [s.name for s in specs if s.name in set(await admin.list_topics())]
            described = await admin.describe_topics(names) if names else []
            return {d["topic"]: len(d["partitions"]) for d in described}
        finally:
            await admin.close()

    want = {s.name: s.partitions for s in specs}
    keeper = asyncio.create_task(keep_topics(settings, lambda: specs))
    try:
        deadline = time.monotonic() + 60
        while await shapes() != want:
            assert time.monotonic() < deadline, await shapes()
            await asyncio.sleep(0.2)
        await asyncio.to_thread(own_broker.stop)
        await asyncio.to_thread(own_broker.start)
        deadline = time.monotonic() + 60
        while await shapes() != want:  # gone with the restart, then back in HDX's shape
            assert time.monotonic() < deadline, await shapes()
            await asyncio.sleep(0.2)
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
