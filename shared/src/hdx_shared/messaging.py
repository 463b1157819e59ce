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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from hdx_shared.envelope import Envelope, Header
from hdx_shared.fhir import FhirError, Issue, operation_outcome
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics, TopicSpec

log = logging.getLogger(__name__)


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


async def publish_all(broker: KafkaBroker, outgoing: Sequence[Outgoing]) -> None:
    """Send everything, then wait until the broker acknowledged every record."""
    if not outgoing:
        return
    futures = [
        await broker.publish(o.value, o.topic, key=o.key, headers=o.headers, no_confirm=True)
        for o in outgoing
    ]
    await asyncio.gather(*futures)


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
    key: tuple[tuple[str, int, int], ...] = ()
    count: int = 0


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
        batch = [Inbound.from_record(r) for r in records]
        try:
            out = await handler(batch)
        except Unavailable as exc:
            # Fail closed: nothing is committed, the batch comes back after a pause.
            health.ready, health.reason = False, f"unavailable: {exc}"
            delay = unavailable_backoff[0] = min(max(unavailable_backoff[0] * 2, 0.2), 5.0)
            log.warning("stage %s waiting %.1fs: %s", name, delay, exc)
            await asyncio.sleep(delay)
            raise
        except Exception:
            key = tuple((m.topic, m.partition, m.offset) for m in batch[:1])
            if attempts.key != key:
                attempts.key, attempts.count = key, 0
            attempts.count += 1
            if attempts.count < settings.max_delivery_attempts:
                log.exception(
                    "stage %s failed on %s (attempt %d)", name, batch[0].origin, attempts.count
                )
                await asyncio.sleep(min(0.1 * 2**attempts.count, 2.0))
                raise
            out = await _isolate_poison(batch, handler, topics, health, name)
        await publish_all(broker, out)
        unavailable_backoff[0] = 0.0
        health.ready, health.reason = True, "ok"
        health.batches += 1
        health.messages += len(batch)

    broker.subscriber(
        topic,
        group_id=group_id,
        batch=True,
        max_records=settings.consumer_batch_size,
        batch_timeout_ms=settings.consumer_batch_timeout_ms,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title=name,
    )(consume)
    return health


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
