"""Log lines a stage writes while handling a message carry that message's trace ids.

The stage runs on the real broker with the JSON logging every service sets up
(`setup_logging`); tracing is off here, so the trace context each record carries (its
producer's `traceparent`) is what the lines must carry. With tracing on, the stage's own
CONSUMER span takes its place (tests/flows/test_log_trace_ids.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaProducer

from hdx_shared.embedded_broker import BrokerEndpoint
from hdx_shared.messaging import (
    Inbound,
    Outgoing,
    add_stage,
    ensure_topics,
    handling,
    make_broker,
    start_broker,
)
from hdx_shared.settings import HdxSettings
from hdx_shared.telemetry import setup_logging, tracing_enabled
from hdx_shared.topics import Topics, TopicSpec

pytestmark = [pytest.mark.broker]

handler_log = logging.getLogger("hdx.test.handler")


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The services' JSON log output, captured: setup_logging as a service runs it."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, structlog.get_config())
    setup_logging(HdxSettings(log_json=True, log_level="INFO"))
    out = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    try:
        yield out
    finally:
        root.handlers[:], level, config = saved
        root.setLevel(level)
        structlog.configure(**config)


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    lines = []
    for raw in out.getvalue().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def _wait_for(out: io.StringIO, what: str, predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(predicate(line) for line in _lines(out)):
        assert time.monotonic() < deadline, f"no log line {what}: {_lines(out)[-10:]}"
        time.sleep(0.1)


async def test_lines_about_a_message_carry_its_trace_ids(
    kafka: BrokerEndpoint, json_logs: io.StringIO
) -> None:
    assert not tracing_enabled()  # else the stage's own spans would be what lines carry
    tag = uuid.uuid4().hex[:8]
    topics = Topics(prefix=f"l{tag}.")
    src, dst = f"l{tag}.in", f"l{tag}.out"
    settings = HdxSettings(
        **kafka.client_settings,
        max_delivery_attempts=2,
        service_name="log-test",
    )
    await ensure_topics(
        settings, [TopicSpec(src, 1), TopicSpec(dst, 1), TopicSpec(topics.deadletter, 1)]
    )
    # Each record as its publisher traced it: its own trace id and span id.
    traces = {name: (secrets.token_hex(16), secrets.token_hex(8)) for name in ("a", "poison", "b")}

    async def handler(batch: Sequence[Inbound]) -> list[Outgoing]:
        out = []
        for m in batch:
            with handling(m):
                handler_log.info("looked at %s", m.envelope.event_id)
                if m.value == b"poison":
                    raise ValueError("cannot digest this")
                out.append(Outgoing(dst, m.value))
        return out

    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    try:
        for name, (trace_id, span_id) in traces.items():
            await producer.send_and_wait(
                src,
                name.encode(),
                headers=[
                    ("ce_id", f"{name}-{tag}".encode()),
                    ("ce_source", b"test"),
                    ("traceparent", f"00-{trace_id}-{span_id}-01".encode()),
                ],
            )
    finally:
        await producer.stop()
    broker = make_broker(settings)
    add_stage(
        broker,
        name="logged",
        topic=src,
        group_id=f"g{tag}",
        handler=handler,
        settings=settings,
        topics=topics,
    )
    await start_broker(broker)
    try:
        await asyncio.to_thread(
            _wait_for,
            json_logs,
            "dead-lettering the poison",
            lambda r: "dead-letters" in r["event"],
        )
        # The lines the handler wrote after the poison was isolated: every message's own.
        await asyncio.to_thread(
            _wait_for,
            json_logs,
            "about b after the poison was isolated",
            lambda r: r["event"] == f"looked at b-{tag}" and r.get("stage") == "logged",
        )
    finally:
        await broker.stop()

    lines = _lines(json_logs)
    for name, (trace_id, span_id) in traces.items():
        about = [r for r in lines if r["event"] == f"looked at {name}-{tag}"]
        assert about, f"no line about {name}"
        for r in about:
            assert (r.get("trace_id"), r.get("span_id")) == (trace_id, span_id), r
            assert r.get("event_id") == f"{name}-{tag}" and r.get("stage") == "logged", r
    dead = [r for r in lines if "dead-letters" in r["event"]]
    assert len(dead) == 1
    assert dead[0]["trace_id"] == traces["poison"][0], dead[0]
    assert dead[0]["span_id"] == traces["poison"][1], dead[0]
    assert dead[0]["event_id"] == f"poison-{tag}", dead[0]
    # A retry is about the whole batch: it carries the trace of the first message, the
    # one it names (offsets 0, 1, 2 are a, poison, b).
    retries = [r for r in lines if str(r["event"]).startswith("stage logged failed on")]
    assert retries, "no retry line"
    by_offset = dict(enumerate(traces.values()))
    for r in retries:
        offset = int(str(r["event"]).split(" (")[0].rsplit("/", 1)[1])
        assert r["trace_id"] == by_offset[offset][0], r


def test_a_kafka_clients_repeated_errors_are_held_back(
    json_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a broker is away aiokafka repeats its errors every ~100 ms: one line per
    template per 10 s gets through, then the next says how many were held back."""
    from hdx_shared.telemetry import RepeatThrottle

    (throttle,) = [
        f for f in logging.getLogger().handlers[0].filters if isinstance(f, RepeatThrottle)
    ]
    now = [1000.0]
    monkeypatch.setattr(throttle, "clock", lambda: now[0])
    client = logging.getLogger("aiokafka.consumer.fetcher")
    ours = logging.getLogger("hdx.test.handler")
    for _ in range(50):
        client.error("Failed fetch messages from %s: %s", 111, "closed")
        ours.error("not a client line")
    now[0] += 11
    client.error("Failed fetch messages from %s: %s", 111, "closed")

    events = [str(r["event"]) for r in _lines(json_logs)]
    fetch = [e for e in events if e.startswith("Failed fetch messages")]
    assert fetch == [
        "Failed fetch messages from 111: closed",
        "Failed fetch messages from 111: closed (49 like it in the last 10s held back)",
    ]
    assert events.count("not a client line") == 50
