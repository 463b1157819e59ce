"""Kafka plumbing every HDX service uses: the broker, topics, and the pipeline stage.

A *stage* consumes a batch from one topic, hands it to a service's handler, publishes what
the handler returns, waits for the broker to acknowledge all of it, and only then commits
the batch's offsets (at-least-once). If anything fails, the batch's offsets are rewound and
it is redelivered; effects downstream are idempotent by event id, so a retry is harmless.

Two kinds of failure are told apart:
- `Unavailable` (a database or state that is down or not loaded): the batch waits and is
  retried with back-off, forever — HDX fails closed rather than deciding without its state.
- anything else (a bug a particular message triggers): after `max_delivery_attempts` the
  batch is taken apart, and the one message that still fails goes to the dead-letter topic
  with the reason; the partition moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Span, SpanKind
from prometheus_client import Counter, Gauge, Histogram

from hdx_shared.envelope import Envelope, Header, now_ms
from hdx_shared.fhir import FhirError, Issue, operation_outcome
from hdx_shared.settings import HdxSettings
from hdx_shared.telemetry import tracing_enabled
from hdx_shared.topics import Topics, TopicSpec

log = logging.getLogger(__name__)
tracer = trace.get_tracer("hdx.messaging")

# What every stage reports on /metrics (no patient data in any label).
STAGE_MESSAGES = Counter("hdx_stage_messages", "Messages a stage consumed", ["stage"])
STAGE_OUTPUTS = Counter("hdx_stage_outputs", "Records a stage produced", ["stage", "topic"])
DEAD_LETTERS = Counter("hdx_dead_letters", "Messages dead-lettered", ["stage", "reason"])
STAGE_BATCH_SECONDS = Histogram(
    "hdx_stage_batch_seconds",
    "Time to handle and publish one batch",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SINCE_INGRESS_SECONDS = Histogram(
    "hdx_since_ingress_seconds",
    "Time from ingress accepting a message to a stage finishing it (end to end at delivery)",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONSUMER_LAG = Gauge(
    "hdx_consumer_lag", "Records behind the partition's end", ["stage", "partition"]
)
STAGE_WAITING = Gauge("hdx_stage_waiting", "1 while a stage waits on unavailable state", ["stage"])


def _message_attributes(topic: str, envelope: Envelope) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.destination.name": topic,
        "hdx.event_id": envelope.event_id,
        "hdx.source": envelope.source,
    }
    if envelope.resource_type:
        attrs["hdx.resource_type"] = envelope.resource_type
    return attrs


def _consume_spans(
    batch: Sequence[Inbound], stage: str, group_id: str
) -> tuple[list[Inbound], list[Span]]:
    """One CONSUMER span per message, child of the span that produced it; the message's
    trace context now points at it, so whatever the handler derives from the envelope is
    published as its child."""
    traced: list[Inbound] = []
    spans: list[Span] = []
    for m in batch:
        attrs = _message_attributes(m.topic, m.envelope) | {
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.consumer.group.name": group_id,
            "messaging.destination.partition.id": str(m.partition),
            "messaging.kafka.offset": m.offset,
            "hdx.stage": stage,
        }
        span = tracer.start_span(
            f"{m.topic} process",
            context=extract(m.envelope.extra),
            kind=SpanKind.CONSUMER,
            attributes=attrs,
        )
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(span))
        traced.append(replace(m, envelope=m.envelope.with_extra(**carrier)))
        spans.append(span)
    return traced, spans


def _publish_spans(outgoing: Sequence[Outgoing]) -> tuple[list[Outgoing], list[Span]]:
    """One PRODUCER span per record, child of the message that caused it (or of the current
    span, e.g. an HTTP request), with its context injected into the record's headers."""
    traced: list[Outgoing] = []
    spans: list[Span] = []
    for o in outgoing:
        parent = extract(o.headers) if Header.TRACEPARENT.value in o.headers else None
        env = Envelope.from_headers(o.headers)
        attrs = _message_attributes(o.topic, env) | {
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
        }
        for name in ("hdx_subscription", Header.REASON.value):
            if name in o.headers:
                attrs[f"hdx.{name.removeprefix('hdx_')}"] = o.headers[name]
        span = tracer.start_span(
            f"{o.topic} publish", context=parent, kind=SpanKind.PRODUCER, attributes=attrs
        )
        headers = dict(o.headers)
        inject(headers, context=trace.set_span_in_context(span))
        traced.append(replace(o, headers=headers))
        spans.append(span)
    return traced, spans


class Unavailable(Exception):
    """State a handler needs is not there (database down, not loaded): wait, never guess."""


@dataclass(frozen=True, slots=True)
class Inbound:
    """One consumed record: the payload bytes as published and the envelope from its headers."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    envelope: Envelope
    timestamp_ms: int = 0

    @property
    def origin(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    @classmethod
    def from_record(cls, record: Any) -> Inbound:
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value if record.value is not None else b"",
            envelope=Envelope.from_headers(record.headers or ()),
            timestamp_ms=record.timestamp or 0,
        )


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def dead_letter(
    topics: Topics, message: Inbound, reason: str, outcome: dict[str, Any] | bytes
) -> Outgoing:
    """A dead-letter record: the original bytes, and why, as headers (so it can be replayed)."""
    import orjson

    headers = dict(message.envelope.to_headers())
    # The original content type travels on: the value is exactly what was received.
    headers.pop(Header.CONTENT_TYPE.value, None)
    headers[Header.REASON.value] = reason
    headers[Header.OUTCOME.value] = (
        outcome.decode() if isinstance(outcome, bytes) else orjson.dumps(outcome).decode()
    )
    headers[Header.ORIGIN.value] = message.origin
    return Outgoing(topics.deadletter, message.value, message.key, headers)


def dead_letter_for(topics: Topics, message: Inbound, error: FhirError) -> Outgoing:
    return dead_letter(topics, message, error.reason, error.outcome())


def _ssl_context(settings: HdxSettings) -> ssl.SSLContext | None:
    # The system trust store, or SSL_CERT_FILE (e.g. a Strimzi cluster CA) when it is set.
    if settings.kafka_security_protocol in ("SASL_SSL", "SSL"):
        return ssl.create_default_context()
    return None


def client_config(settings: HdxSettings) -> dict[str, Any]:
    """aiokafka connection arguments (admin clients, bare producers) from the settings."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        "ssl_context": _ssl_context(settings),
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        config |= {
            "sasl_mechanism": (settings.kafka_sasl_mechanism or "SCRAM-SHA-512").upper(),
            "sasl_plain_username": settings.kafka_username,
            "sasl_plain_password": settings.kafka_password,
        }
    return config


def make_broker(settings: HdxSettings, **kwargs: Any) -> KafkaBroker:
    """A faststream broker set up for HDX: acks from all replicas, idempotence where it works."""
    security: Any = None
    context = _ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        mech = (settings.kafka_sasl_mechanism or "SCRAM-SHA-512").upper()
        cls = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256}.get(mech, SASLScram512)
        security = cls(
            username=settings.kafka_username or "",
            password=settings.kafka_password or "",
            use_ssl=context is not None,
            ssl_context=context,
        )
    elif context is not None:
        security = BaseSecurity(ssl_context=context, use_ssl=True)
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        linger_ms=1,
        # Per-batch "Received"/"Processed" lines are debugging detail, not operations.
        log_level=logging.DEBUG,
        client_id=settings.service_name,
        security=security,
        logger=logging.getLogger(f"hdx.{settings.service_name}.kafka"),
        **kwargs,
    )


async def ensure_topics(settings: HdxSettings, specs: Sequence[TopicSpec]) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(**client_config(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if not missing:
            return
        replicas = settings.topic_replication_factor
        # Another service may have created it in the meantime: that is fine.
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(
                [
                    NewTopic(s.name, s.partitions, replicas, topic_configs=s.topic_config())
                    for s in missing
                ]
            )
    finally:
        await admin.close()


async def start_broker(broker: KafkaBroker) -> None:
    """Start the broker with its consumers joining their groups concurrently.

    faststream starts subscribers one after another, and each start waits for its group
    join (about 5 s on Tansu, the initial rebalance delay on Kafka); a service with three
    stages would otherwise take three times as long to become ready.
    """
    await broker.connect()
    await asyncio.gather(*(sub.start() for sub in broker.subscribers))
    for pub in broker.publishers:
        await pub.start()
    broker.running = True


def _aiokafka_producer(broker: KafkaBroker) -> Any:
    """The started aiokafka producer under a faststream broker, or None if faststream no
    longer exposes it there (then publish_all goes through broker.publish)."""
    state = getattr(getattr(broker.config, "producer", None), "_producer", None)
    producer = getattr(state, "producer", None)
    return producer if hasattr(producer, "send") else None


async def publish_all(broker: KafkaBroker, outgoing: Sequence[Outgoing]) -> None:
    """Send everything, then wait until the broker acknowledged every record."""
    if not outgoing:
        return
    spans: list[Span] = []
    if tracing_enabled():
        outgoing, spans = _publish_spans(outgoing)
    try:
        producer = _aiokafka_producer(broker)
        if producer is None:
            futures = [
                await broker.publish(
                    o.value, o.topic, key=o.key, headers=o.headers, no_confirm=True
                )
                for o in outgoing
            ]
        else:
            # Straight to the broker's own aiokafka producer: the records are bytes already,
            # so faststream's per-message encoding and middleware would be pure overhead.
            futures = [
                await producer.send(
                    o.topic,
                    o.value,
                    key=o.key,
                    headers=[(k, v.encode()) for k, v in o.headers.items()],
                )
                for o in outgoing
            ]
        await asyncio.gather(*futures)
    finally:
        for span in spans:
            span.end()


Handler = Callable[[Sequence[Inbound]], Awaitable[Sequence[Outgoing]]]
Publish = Callable[[Sequence[Outgoing]], Awaitable[None]]


@dataclass
class StageHealth:
    """What /readyz reports for one stage."""

    name: str
    ready: bool = False
    reason: str = "not started"
    batches: int = 0
    messages: int = 0
    dead_lettered: int = 0


@dataclass
class _Attempts:
    """How often each record was in a failed batch."""

    counts: dict[tuple[str, int, int], int] = field(default_factory=dict)

    def failed(self, batch: Sequence[Inbound]) -> int:
        if len(self.counts) > 100_000:  # bounded: old entries are of batches long done
            self.counts.clear()
        worst = 0
        for m in batch:
            key = (m.topic, m.partition, m.offset)
            self.counts[key] = n = self.counts.get(key, 0) + 1
            worst = max(worst, n)
        return worst

    def forget(self, batch: Sequence[Inbound]) -> None:
        for m in batch:
            self.counts.pop((m.topic, m.partition, m.offset), None)


def _clean_headers(headers: Any) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for k, v in headers or ():
        value = v if isinstance(v, bytes) else b""
        try:
            value.decode()
        except UnicodeDecodeError:
            value = value.decode(errors="replace").encode()
        out.append((k, value))
    return out


async def _tolerant_parser(message: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    """faststream decodes every header value as UTF-8 before a stage sees the batch; one
    publisher's binary (or null) header value would end the subscriber. Such values are
    made readable (U+FFFD) first; the payload is untouched."""
    records = message if isinstance(message, tuple) else (message,)
    if any(v is None or not _utf8(v) for r in records for _k, v in (r.headers or ())):
        records = tuple(replace(r, headers=_clean_headers(r.headers)) for r in records)
        message = records if isinstance(message, tuple) else records[0]
    return await original(message)


def _utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def add_stage(
    broker: KafkaBroker,
    *,
    name: str,
    topic: str,
    group_id: str,
    handler: Handler,
    settings: HdxSettings,
    topics: Topics,
) -> StageHealth:
    """Subscribe `handler` to `topic` as an at-least-once pipeline stage (see module doc)."""
    health = StageHealth(name)
    attempts = _Attempts()
    unavailable_backoff = [0.0]

    async def consume(_body: list[bytes], msg: KafkaMessage) -> None:
        raw = msg.raw_message
        records = raw if isinstance(raw, tuple) else (raw,)
        started = time.perf_counter()
        batch = [Inbound.from_record(r) for r in records]
        spans: list[Span] = []
        if tracing_enabled():
            batch, spans = _consume_spans(batch, name, group_id)
        try:
            await _handle(batch, msg)
        finally:
            for span in spans:
                span.end()
        STAGE_BATCH_SECONDS.labels(name).observe(time.perf_counter() - started)

    async def _handle(batch: list[Inbound], msg: KafkaMessage) -> None:
        try:
            out = await handler(batch)
        except Unavailable as exc:
            # Fail closed: nothing is committed, the batch comes back after a pause.
            health.ready, health.reason = False, f"unavailable: {exc}"
            STAGE_WAITING.labels(name).set(1)
            delay = unavailable_backoff[0] = min(max(unavailable_backoff[0] * 2, 0.2), 5.0)
            log.warning("stage %s waiting %.1fs: %s", name, delay, exc)
            await asyncio.sleep(delay)
            raise
        except Exception:
            # Counted per record: a redelivered batch may start on another partition.
            count = attempts.failed(batch)
            if count < settings.max_delivery_attempts:
                log.exception("stage %s failed on %s (attempt %d)", name, batch[0].origin, count)
                await asyncio.sleep(min(0.1 * 2**count, 2.0))
                raise
            out = await _isolate_poison(batch, handler, topics, health, name)
            attempts.forget(batch)
        await publish_all(broker, out)
        if attempts.counts:
            attempts.forget(batch)
        unavailable_backoff[0] = 0.0
        STAGE_WAITING.labels(name).set(0)
        health.ready, health.reason = True, "ok"
        health.batches += 1
        health.messages += len(batch)
        _record_metrics(name, batch, out, topics, getattr(msg, "consumer", None))

    broker.subscriber(
        topic,
        group_id=group_id,
        batch=True,
        max_records=settings.consumer_batch_size,
        batch_timeout_ms=settings.consumer_batch_timeout_ms,
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        parser=_tolerant_parser,
        title=name,
    )(consume)
    return health


def _record_metrics(
    stage: str, batch: Sequence[Inbound], out: Sequence[Outgoing], topics: Topics, consumer: Any
) -> None:
    STAGE_MESSAGES.labels(stage).inc(len(batch))
    now = now_ms()
    since = SINCE_INGRESS_SECONDS.labels(stage)
    for m in batch:
        if m.envelope.received_at_ms:
            since.observe(max(now - m.envelope.received_at_ms, 0) / 1000)
    for o in out:
        if o.topic == topics.deadletter:
            DEAD_LETTERS.labels(stage, o.headers.get(Header.REASON.value, "unknown")).inc()
        else:
            kind = o.topic.removeprefix(topics.prefix)
            STAGE_OUTPUTS.labels(stage, "feed" if kind.startswith("feed.") else kind).inc()
    highwater = getattr(consumer, "highwater", None)
    if highwater is None:
        return
    last: dict[tuple[str, int], int] = {}
    for m in batch:
        last[(m.topic, m.partition)] = max(m.offset, last.get((m.topic, m.partition), -1))
    from aiokafka import TopicPartition

    for (topic, partition), offset in last.items():
        end = highwater(TopicPartition(topic, partition))
        if end is not None:
            CONSUMER_LAG.labels(stage, str(partition)).set(max(end - offset - 1, 0))


async def _isolate_poison(
    batch: Sequence[Inbound], handler: Handler, topics: Topics, health: StageHealth, name: str
) -> list[Outgoing]:
    """Handle a repeatedly failing batch one message at a time; dead-letter what still fails."""
    out: list[Outgoing] = []
    for message in batch:
        try:
            out.extend(await handler([message]))
        except Unavailable:
            raise
        except Exception as exc:
            # The exception type and text say why; the payload itself is never logged.
            log.error(
                "stage %s dead-letters %s after repeated failure: %s",
                name,
                message.origin,
                type(exc).__name__,
            )
            health.dead_lettered += 1
            outcome = operation_outcome(
                [
                    Issue(
                        f"{name} could not process this message: {type(exc).__name__}: {exc}"[:500],
                        code="exception",
                    )
                ]
            )
            out.append(dead_letter(topics, message, "processing-failed", outcome))
    return out
