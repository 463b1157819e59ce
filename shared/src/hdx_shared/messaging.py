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

Logs: while a stage handles a batch, the OpenTelemetry context is that of the batch's first
message (its CONSUMER span) and `stage` is bound for structlog, so every line logged — by the
handler, the database layer or this module — carries that message's `trace_id`/`span_id`.
Work on one message of a batch runs under `handling(message)`, which makes that message's
span current and binds its `event_id` and `origin`; dead letters are logged that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import OffsetAndMetadata
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.subscriber.usecase import BatchSubscriber
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
from opentelemetry import context as otel_context
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
STAGE_PARTITIONS = Gauge(
    "hdx_stage_partitions",
    "Partitions this process's consumer of a stage is assigned (0 while it rebalances)",
    ["stage"],
)


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


@contextlib.contextmanager
def _traced_as(message: Inbound) -> Iterator[None]:
    """The message's trace context (its CONSUMER span once the stage made one; else the
    producer's, if the record carried one) is the current OpenTelemetry context."""
    extra = message.envelope.extra
    if Header.TRACEPARENT.value not in extra:
        yield
        return
    token = otel_context.attach(extract(extra))
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def handling(message: Inbound) -> Iterator[None]:
    """Work on one message of a batch: its span is current (so log lines carry its
    `trace_id`/`span_id`, and database or HTTP spans join its trace) and its `event_id` and
    `origin` (topic/partition/offset) are bound for structlog. Never payload data."""
    bound: dict[str, str] = {"origin": message.origin}
    if message.envelope.event_id:
        bound["event_id"] = message.envelope.event_id
    with _traced_as(message), structlog.contextvars.bound_contextvars(**bound):
        yield


@contextlib.contextmanager
def _batch_scope(batch: Sequence[Inbound], stage: str) -> Iterator[None]:
    """While a stage handles a batch: the first message's trace context and the stage name.
    Lines about the whole batch (waiting, retrying) carry the first message's ids."""
    with structlog.contextvars.bound_contextvars(stage=stage):
        if not batch:
            yield
            return
        with _traced_as(batch[0]):
            yield


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


class KeyPartitioner:
    """aiokafka's default partitioner — murmur2 of the key, as the Java client, so a key
    lands where any Kafka client would put it — with each key's hash remembered.

    aiokafka's murmur2 is pure Python (≈ 7 µs for a 36-byte key) and runs for every keyed
    record; HDX keys by person, so the same keys come back at every stage and hop."""

    MAX_KEYS = 200_000  # bounded: forgotten all at once, then hashed again as they come

    def __init__(self) -> None:
        self._hashes: dict[bytes, int] = {}
        self._default = DefaultPartitioner()

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            chosen: int = self._default(key, all_partitions, available)  # random, as aiokafka
            return chosen
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) >= self.MAX_KEYS:
                self._hashes.clear()
            h = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[h % len(all_partitions)]


async def record_values(message: Any) -> Any:
    """The broker's decoder: the records' values as they are.

    HDX's handlers read the consumed records themselves (`msg.raw_message`), so faststream's
    own decoding — for a batch, a message object per record again and its body decoded by
    content type — would be thrown away."""
    return message.body


_clock = time.monotonic  # PromptBatchSubscriber's clock (a test gives it another)


class PromptBatchSubscriber(BatchSubscriber):
    """faststream's batch subscriber without its idle nap.

    faststream's own `get_msg`, when a `getmany` found nothing within the batch timeout,
    sleeps for the batch timeout again before the next `getmany`; a record that arrives in
    that nap waits up to its whole length (20 ms), at every hop — at light load most of what
    HDX's stages added over a bare relay (docs/performance.md, "Light-load latency"). Here
    the next `getmany` follows at once: it waits for records itself (returning as soon as
    the fetcher has any), so an idle stage still sleeps in it, not in a loop. Only if a
    `getmany` came back empty well before its timeout (which aiokafka does not do, but a
    spinning loop must never be the price) is the rest of the timeout slept."""

    __slots__ = ()

    async def get_msg(self, consumer: Any) -> tuple[Any, ...]:
        started = _clock()
        messages = await consumer.getmany(
            timeout_ms=self.batch_timeout_ms, max_records=self.max_records
        )
        if messages:
            return tuple(r for records in messages.values() for r in records)
        rest = self.batch_timeout_ms / 1000 - (_clock() - started)
        if rest > self.batch_timeout_ms / 2000:
            await asyncio.sleep(rest)
        return ()


def prompt(subscriber: Any) -> Any:
    """The stage's faststream batch subscriber, made a `PromptBatchSubscriber` (same state,
    only `get_msg` differs); any other kind of subscriber is left as it is."""
    if type(subscriber) is BatchSubscriber:
        subscriber.__class__ = PromptBatchSubscriber
    return subscriber


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
        linger_ms=settings.producer_linger_ms,
        max_batch_size=settings.producer_max_batch_bytes,
        metadata_max_age_ms=settings.kafka_metadata_max_age_ms,
        # Per-batch "Received"/"Processed" lines are debugging detail, not operations.
        log_level=logging.DEBUG,
        client_id=settings.service_name,
        security=security,
        logger=logging.getLogger(f"hdx.{settings.service_name}.kafka"),
        partitioner=kwargs.pop("partitioner", None) or KeyPartitioner(),
        decoder=kwargs.pop("decoder", None) or record_values,
        **kwargs,
    )


async def ensure_topics(settings: HdxSettings, specs: Sequence[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet (their names); existing ones are left as
    they are."""
    admin = AIOKafkaAdminClient(**client_config(settings))
    await admin.start()
    try:
        return await _create_missing(admin, settings, specs)
    finally:
        await admin.close()


async def _create_missing(
    admin: AIOKafkaAdminClient, settings: HdxSettings, specs: Sequence[TopicSpec]
) -> list[str]:
    existing = set(await admin.list_topics())
    missing = [s for s in specs if s.name not in existing]
    if not missing:
        return []
    replicas = settings.topic_replication_factor
    # Another service may have created it in the meantime: that is fine.
    with contextlib.suppress(TopicAlreadyExistsError):
        await admin.create_topics(
            [
                NewTopic(s.name, s.partitions, replicas, topic_configs=s.topic_config())
                for s in missing
            ]
        )
    return [s.name for s in missing]


async def keep_topics(settings: HdxSettings, specs: Callable[[], Sequence[TopicSpec]]) -> None:
    """Every `topic_check_seconds`, create the topics that have gone missing.

    A broker that restarted without its data (the embedded Tansu keeps everything in
    memory) has forgotten every topic. Clients that ask for a topic's metadata get it
    created with the broker's defaults (Tansu: 4 partitions, no configuration); the ones
    nobody asked for yet are created here with HDX's partitions and policies."""
    admin: AIOKafkaAdminClient | None = None
    failing = False
    try:
        while True:
            await asyncio.sleep(settings.topic_check_seconds)
            try:
                if admin is None:
                    admin = AIOKafkaAdminClient(**client_config(settings))
                    await admin.start()
                created = await _create_missing(admin, settings, specs())
            except Exception as exc:
                if not failing:  # once per outage, not every few seconds
                    log.warning("cannot check the topics: %s: %s", type(exc).__name__, exc)
                failing = True
                if admin is not None:
                    with contextlib.suppress(Exception):
                        await admin.close()
                    admin = None
                continue
            if created:
                log.warning("re-created missing topics: %s", ", ".join(created))
            elif failing:
                log.info("the topics are there again")
            failing = False
    finally:
        if admin is not None:
            with contextlib.suppress(Exception):
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
            await _refresh_if_reconnected(producer, {o.topic for o in outgoing})
            # Straight to the broker's own aiokafka producer: the records are bytes already,
            # so faststream's per-message encoding and middleware would be pure overhead.
            futures = await _send_in_batches(producer, outgoing)
        acked = await asyncio.gather(*futures)
        if producer is not None:
            await _refuse_unread_partitions(producer, acked)
    finally:
        for span in spans:
            span.end()


async def _send_in_batches(producer: Any, outgoing: Sequence[Outgoing]) -> list[Any]:
    """Queue the records as one record batch per partition (aiokafka's `send_batch`): one
    acknowledgement to wait for per batch, not a future, a metadata check and a partitioner
    call per record (bench/publish_bench.py: 24 → 11 CPU-µs a record).

    The partition is the one `send` would choose (the producer's own partitioner over the
    topic's partitions, so a key lands where any Kafka client puts it); each partition's
    records keep their order. The batches are left open, as `send` leaves its own, so they
    linger as long as `send`'s would (`HDX_PRODUCER_LINGER_MS`; settings.py says why that
    is not 0). A record too large to send is refused before anything is queued, by `send`
    itself, with the error it always gave."""
    partitioner = getattr(producer, "_partitioner", None)
    limit = getattr(producer, "_max_request_size", None)
    cluster = getattr(getattr(producer, "client", None), "cluster", None)
    if partitioner is None or limit is None or cluster is None:
        return [
            await producer.send(o.topic, o.value, key=o.key, headers=_kafka_headers(o))
            for o in outgoing
        ]
    partitions: dict[str, tuple[list[int], list[int]]] = {}
    for topic in dict.fromkeys(o.topic for o in outgoing):
        await producer.partitions_for(topic)  # waits for the topic's metadata, as send does
        partitions[topic] = (
            list(cluster.partitions_for_topic(topic)),
            list(cluster.available_partitions_for_topic(topic)),
        )
    by_partition: dict[tuple[str, int], list[tuple[Outgoing, list[tuple[str, bytes]]]]] = {}
    for o in outgoing:
        headers = _kafka_headers(o)
        if DefaultRecordBatchBuilder.estimate_size_in_bytes(o.key, o.value, headers) > limit:
            await producer.send(o.topic, o.value, key=o.key, headers=headers)  # raises
        every, available = partitions[o.topic]
        by_partition.setdefault((o.topic, partitioner(o.key, every, available)), []).append(
            (o, headers)
        )
    futures: list[Any] = []
    for (topic, partition), records in by_partition.items():
        batch = producer.create_batch()
        for o, headers in records:
            if batch.append(timestamp=None, key=o.key, value=o.value, headers=headers) is None:
                # Full (it closed itself): queue it, and start the next with this record.
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                batch.append(timestamp=None, key=o.key, value=o.value, headers=headers)
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


def _kafka_headers(o: Outgoing) -> list[tuple[str, bytes]]:
    return [(k, v.encode()) for k, v in o.headers.items()]


class PartitionGone(Exception):
    """A record may have gone where no consumer reads it: publish it again."""


# The broker connections each producer had at its last publish. One of them gone means the
# producer lost it and reconnected (new connections beside them are just more brokers).
_known_connections: dict[int, frozenset[Any]] = {}
# When each producer last reconnected (monotonic): for a while after, the broker may still
# be re-creating topics, and every publish is checked against metadata fetched after it.
_reconnected_at: dict[int, float] = {}
RECONNECT_WATCH_SECONDS = 60.0


def _connections(producer: Any) -> frozenset[Any] | None:
    return _client_connections(getattr(producer, "client", None))


def _client_connections(client: Any) -> frozenset[Any] | None:
    """An aiokafka client's broker connections now (None if it cannot tell): a connection
    that is gone from it was lost, and the broker may have restarted meanwhile."""
    conns = getattr(client, "_conns", None)
    return frozenset(conns.values()) if isinstance(conns, dict) else None


async def _refresh_if_reconnected(producer: Any, topics: set[str]) -> None:
    """Before a publish: if the producer lost a broker connection since its last publish
    (it reconnected: the broker may have restarted), refresh its metadata first.

    A broker that restarted without its data (the embedded Tansu) acknowledges records
    for topics it no longer has, or for partitions beyond those of a topic it re-created,
    and never serves them; worse, Tansu then refuses every later record on that partition
    (its log shows `AlreadyExists`). Asking for the metadata first has the broker create
    the topic (or keep_topics has), so records go where consumers read."""
    conns = _connections(producer)
    known = _known_connections.get(id(producer))
    if conns is None or (known is not None and known <= conns):
        return
    if not await asyncio.wait_for(producer.client.force_metadata_update(), 30):
        raise PartitionGone("no fresh topic metadata after a reconnect")
    _known_connections[id(producer)] = _connections(producer) or frozenset()
    if known is not None:
        _reconnected_at[id(producer)] = time.monotonic()
        cluster = producer.client.cluster
        log.info(
            "producer reconnected: topic metadata refreshed (partitions: %s)",
            ", ".join(f"{t} {len(cluster.partitions_for_topic(t) or ())}" for t in sorted(topics)),
        )


async def _refuse_unread_partitions(producer: Any, acked: Sequence[Any]) -> None:
    """After a publish: raise PartitionGone if the producer reconnected during it (its
    metadata may have been stale), or a record went to a partition its topic lacks —
    checked against metadata fetched after the publish while a reconnect is recent (a
    restarted Tansu may re-create a topic with fewer partitions than it reported)."""
    conns = _connections(producer)
    known = _known_connections.get(id(producer))
    if conns is not None and known is not None and not known <= conns:
        _known_connections.pop(id(producer), None)  # the next publish refreshes first
        raise PartitionGone("the producer reconnected while publishing")
    if conns is not None:
        _known_connections[id(producer)] = conns
    client = getattr(producer, "client", None)
    cluster = getattr(client, "cluster", None)
    if client is None or cluster is None:
        return
    since = _reconnected_at.get(id(producer))
    if since is not None:
        if time.monotonic() - since > RECONNECT_WATCH_SECONDS:
            del _reconnected_at[id(producer)]
        elif not await asyncio.wait_for(client.force_metadata_update(), 30):
            raise PartitionGone("no fresh topic metadata to check the publish against")
    for meta in acked:
        partitions = cluster.partitions_for_topic(meta.topic)
        if partitions is None or meta.partition not in partitions:
            raise PartitionGone(f"{meta.topic} has no partition {meta.partition} now")


Handler = Callable[[Sequence[Inbound]], Awaitable[Sequence[Outgoing]]]
Publish = Callable[[Sequence[Outgoing]], Awaitable[None]]


@dataclass
class StageHealth:
    """What /readyz reports for one stage, and what it is judged on (`problem`)."""

    name: str
    ready: bool = False
    reason: str = "not started"
    batches: int = 0
    messages: int = 0
    dead_lettered: int = 0
    # How long commits, publishes or fetches may keep failing before the stage is not ready.
    failure_seconds: float = 30.0
    # What is failing now ("commit: KafkaConnectionError") and since when (monotonic).
    failing: str | None = None
    failing_since: float | None = None
    # Monotonic: a batch is being handled since; the last batch ended or the stage was seen
    # healthy (no partitions, but in its group) at.
    busy_since: float | None = None
    last_progress: float = field(default_factory=time.monotonic)
    # The faststream subscriber (its consume loop and aiokafka consumer), once subscribed.
    subscriber: Any = field(default=None, repr=False, compare=False)
    # Set while no batch is in hand; cleared while one is (see FinishBatchBeforeRebalance).
    idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)
    # True from the moment the group takes this stage's partitions back until it hands the
    # new ones out: a batch fetched then is not started (it goes back, unpublished).
    revoking: bool = False

    def failed(self, what: str, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.failing = f"{what} failing: {type(exc).__name__}"

    def recovered(self) -> None:
        self.failing = self.failing_since = None

    def problem(self) -> str | None:
        """Why this stage is not ready now, or None.

        Not ready: waiting on unavailable state; the consume loop ended; commits or
        publishes failing for longer than `failure_seconds`; or, while no batch is in hand,
        no fetch answered (or, with no partitions assigned, no group coordinator known) for
        longer than that."""
        if not self.ready and self.reason not in ("not started", "ok"):
            return self.reason
        sub = self.subscriber
        if sub is None or not getattr(sub, "running", False):
            return None
        if self.loop_stopped():
            return "consume loop stopped"
        now = time.monotonic()
        if self.failing_since is not None and now - self.failing_since > self.failure_seconds:
            return f"{self.failing} for {now - self.failing_since:.0f}s"
        if self.busy_since is not None:
            return None
        consumer = getattr(sub, "consumer", None)
        if consumer is None:
            return None
        quiet = now - self._last_fetch_or_progress(consumer, now)
        if quiet > self.failure_seconds:
            return f"no fetch answered for {quiet:.0f}s"
        return None

    def loop_stopped(self) -> bool:
        """The subscriber is meant to run but its consume loop has ended: nothing brings it
        back short of a restart, so /healthz says so too."""
        sub = self.subscriber
        if sub is None or not getattr(sub, "running", False):
            return False
        tasks = getattr(sub, "tasks", None)
        return tasks is not None and all(t.done() for t in tasks)

    def _last_fetch_or_progress(self, consumer: Any, now: float) -> float:
        """Monotonic time of the newest fetch response (any assigned partition), batch, or
        moment the consumer was seen in its group without partitions (an idle replica)."""
        try:
            assigned = consumer.assignment()
        except Exception:  # a consumer that is stopping
            return self.last_progress
        if not assigned:
            coordinator = getattr(consumer, "_coordinator", None)
            if getattr(coordinator, "coordinator_id", None) is not None:
                self.last_progress = now
            return self.last_progress
        newest_ms = 0
        for tp in assigned:
            with contextlib.suppress(Exception):
                newest_ms = max(newest_ms, consumer.last_poll_timestamp(tp) or 0)
        fetched = now - (time.time() - newest_ms / 1000) if newest_ms else 0.0
        return max(self.last_progress, fetched)


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
    if any(
        v is None or not (v.isascii() or _utf8(v)) for r in records for _k, v in (r.headers or ())
    ):
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
    group_id: str,
    handler: Handler,
    settings: HdxSettings,
    topics: Topics,
    topic: str | None = None,
    pattern: str | None = None,
) -> StageHealth:
    """Subscribe `handler` to `topic` (or to every topic matching the regex `pattern`, found
    again at each metadata refresh) as an at-least-once pipeline stage (see module doc).

    The stage acknowledges a batch itself: it commits the offsets after everything the
    batch caused was acknowledged, and rewinds them (seek) when the batch must come back,
    so a failing commit or publish is seen (`StageHealth.problem`) and logged here, with the
    batch's trace ids. faststream's NACK_ON_ERROR stays as the backstop for what fails
    before the handler is reached (parsing); a failed commit is not sent again (see
    `commit_batch`)."""
    health = StageHealth(name, failure_seconds=settings.stage_failure_seconds)
    attempts = _Attempts()
    resume = ResumeAfterReconnect(name)
    backoff = {"unavailable": 0.0, "publish": 0.0}

    async def consume(_body: list[bytes], msg: KafkaMessage) -> None:
        if health.revoking:
            # The partitions are being taken back: this batch goes back untouched, to
            # whichever member gets them.
            with contextlib.suppress(Exception):
                await msg.nack()
            await asyncio.sleep(0.05)
            return
        health.idle.clear()
        try:
            await _consume(msg)
        finally:
            health.idle.set()

    async def _consume(msg: KafkaMessage) -> None:
        raw = msg.raw_message
        records = raw if isinstance(raw, tuple) else (raw,)
        started = time.perf_counter()
        batch = [Inbound.from_record(r) for r in records]
        spans: list[Span] = []
        if tracing_enabled():
            batch, spans = _consume_spans(batch, name, group_id)
        health.busy_since = time.monotonic()
        consumer = getattr(msg, "consumer", None)
        membership = _membership(consumer)
        links = _client_connections(getattr(consumer, "_client", None))
        try:
            skip = await resume.rewound(consumer, links)
        except RewindFailed:
            skip = True
            await msg.nack()  # the batch comes again, and the rewind is tried again then
        if skip:
            # Fetched from positions that may point into a log the broker no longer has:
            # not handled; the partitions are read again from the group's committed offsets.
            if not msg.committed:
                await KafkaMessage.ack(msg)  # done for faststream, nothing committed
            for span in spans:
                span.end()
            health.busy_since = None
            health.last_progress = time.monotonic()
            return
        done = False
        try:
            with _batch_scope(batch, name):
                out = await _handle(batch)
                if out is not None:
                    done = await _publish_and_commit(batch, out, msg, membership, links)
        finally:
            if not done:
                # Rewind: nothing of this batch is committed and it comes back (also when a
                # bug or a shutdown cut it short).
                with contextlib.suppress(Exception):
                    await msg.nack()
            health.busy_since = None
            health.last_progress = time.monotonic()
            for span in spans:
                span.end()
        STAGE_BATCH_SECONDS.labels(name).observe(time.perf_counter() - started)

    async def _handle(batch: list[Inbound]) -> Sequence[Outgoing] | None:
        """What the batch causes, or None when it must come back (after a pause)."""
        try:
            try:
                return await handler(batch)
            except Unavailable:
                raise
            except Exception:
                # Counted per record: a redelivered batch may start on another partition.
                count = attempts.failed(batch)
                if count < settings.max_delivery_attempts:
                    log.exception(
                        "stage %s failed on %s (attempt %d, batch of %d)",
                        name,
                        batch[0].origin,
                        count,
                        len(batch),
                    )
                    await asyncio.sleep(min(0.1 * 2**count, 2.0))
                    return None
                out = await _isolate_poison(batch, handler, topics, health, name)
                attempts.forget(batch)
                return out
        except Unavailable as exc:
            # Fail closed: nothing is committed, the batch comes back after a pause.
            health.ready, health.reason = False, f"unavailable: {exc}"
            STAGE_WAITING.labels(name).set(1)
            delay = backoff["unavailable"] = min(max(backoff["unavailable"] * 2, 0.2), 5.0)
            log.warning("stage %s waiting %.1fs: %s", name, delay, exc)
            await asyncio.sleep(delay)
            return None

    async def _publish_and_commit(
        batch: list[Inbound],
        out: Sequence[Outgoing],
        msg: KafkaMessage,
        membership: tuple[int, str] | None,
        links: frozenset[Any] | None,
    ) -> bool:
        try:
            await publish_all(broker, out)
        except Exception as exc:
            # The broker did not take it (down, restarting, topic gone): the batch comes back.
            health.failed("publish", exc)
            delay = backoff["publish"] = min(max(backoff["publish"] * 2, 0.2), 5.0)
            log.warning(
                "stage %s could not publish %d records for a batch of %d, retrying in %.1fs: "
                "%s: %s",
                name,
                len(out),
                len(batch),
                delay,
                type(exc).__name__,
                exc,
            )
            await asyncio.sleep(delay)
            return False
        backoff["publish"] = 0.0
        if attempts.counts:
            attempts.forget(batch)
        backoff["unavailable"] = 0.0
        STAGE_WAITING.labels(name).set(0)
        health.ready, health.reason = True, "ok"
        health.batches += 1
        health.messages += len(batch)
        _record_metrics(name, batch, out, topics, getattr(msg, "consumer", None))
        try:
            await commit_batch(msg, batch, membership, links)
        except CommitRefused as exc:
            # The group or the connection changed under the batch: its offsets may belong to
            # an assignment or a log that is gone. The batch comes back under the new
            # assignment (duplicates, never losses).
            log.info("stage %s: not committed: %s", name, exc)
            return False
        except Exception as exc:
            # Everything is published; a later commit covers these offsets, or after a
            # rebalance the new owner handles the batch again (duplicates, never losses).
            # Not tried again by faststream: by then the member may be gone, and a commit
            # without a member is taken as a stranger's (see commit_batch).
            await KafkaMessage.ack(msg)
            health.failed("commit", exc)
            log.warning("stage %s could not commit: %s: %s", name, type(exc).__name__, exc)
        else:
            health.recovered()
        return True

    if (topic is None) == (pattern is None):
        raise ValueError("a stage reads one topic or one pattern")
    health.idle.set()
    health.subscriber = broker.subscriber(
        *([topic] if topic else []),
        pattern=pattern,
        listener=FinishBatchBeforeRebalance(health),
        group_id=group_id,
        batch=True,
        max_records=settings.consumer_batch_size,
        batch_timeout_ms=settings.consumer_batch_timeout_ms,
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
        session_timeout_ms=settings.consumer_session_timeout_ms,
        heartbeat_interval_ms=settings.consumer_session_timeout_ms * 3 // 10,
        # The rebalance waits for the batch in hand (REVOKE_WAIT_SECONDS): never less.
        rebalance_timeout_ms=max(
            settings.consumer_session_timeout_ms, int(REVOKE_WAIT_SECONDS * 2000)
        ),
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        parser=_tolerant_parser,
        title=name,
    )
    prompt(health.subscriber)
    health.subscriber(consume)
    return health


# How long a rebalance waits for the batch in hand (well under aiokafka's rebalance timeout).
REVOKE_WAIT_SECONDS = 5.0


class FinishBatchBeforeRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Lets the batch in hand publish and commit before the group takes its partitions
    back, so a rebalance (another replica joining, a publisher's new topic found by the
    ingress pattern) does not send it through the pipeline twice; a batch fetched during the
    rebalance goes back unpublished. Committing in the revoke callback is what aiokafka's
    coordinator keeps the member alive for."""

    def __init__(self, health: StageHealth) -> None:
        self.health = health

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.health.revoking = True
        STAGE_PARTITIONS.labels(self.health.name).set(0)
        if not self.health.idle.is_set():
            try:
                await asyncio.wait_for(self.health.idle.wait(), REVOKE_WAIT_SECONDS)
            except TimeoutError:
                log.warning(
                    "stage %s: the batch in hand did not finish within %.0fs of a rebalance; "
                    "it will come back",
                    self.health.name,
                    REVOKE_WAIT_SECONDS,
                )

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.health.revoking = False
        STAGE_PARTITIONS.labels(self.health.name).set(len(assigned))
        if (self.health.failing or "").startswith("commit"):
            # A commit refused by the group this member has just left: the new assignment
            # starts from what the group has committed, and nothing may ever come again to
            # commit (a broker that restarted empty) — it is not failing now.
            self.health.recovered()


def _membership(consumer: Any) -> tuple[int, str] | None:
    """The consumer's (generation, member id) in its group, or None if it cannot tell."""
    coordinator = getattr(consumer, "_coordinator", None)
    generation = getattr(coordinator, "generation", None)
    member = getattr(coordinator, "member_id", None)
    if not isinstance(generation, int) or not isinstance(member, str):
        return None
    return generation, member


def _record_metrics(
    stage: str, batch: Sequence[Inbound], out: Sequence[Outgoing], topics: Topics, consumer: Any
) -> None:
    STAGE_MESSAGES.labels(stage).inc(len(batch))
    now = now_ms()
    since = SINCE_INGRESS_SECONDS.labels(stage)
    for m in batch:
        if m.envelope.received_at_ms:
            since.observe(max(now - m.envelope.received_at_ms, 0) / 1000)
    # Counted per topic kind, then added once each: a labelled child per record is costly.
    outputs: dict[str, int] = {}
    for o in out:
        if o.topic == topics.deadletter:
            DEAD_LETTERS.labels(stage, o.headers.get(Header.REASON.value, "unknown")).inc()
        else:
            kind = o.topic.removeprefix(topics.prefix)
            kind = "feed" if kind.startswith("feed.") else kind
            outputs[kind] = outputs.get(kind, 0) + 1
    for kind, count in outputs.items():
        STAGE_OUTPUTS.labels(stage, kind).inc(count)
    highwater = getattr(consumer, "highwater", None)
    assigned = getattr(getattr(consumer, "_subscription", None), "is_assigned", None)
    if highwater is None or assigned is None:
        return
    for tp, offset in _last_offsets(batch).items():
        if not assigned(tp):
            continue  # taken back meanwhile: its lag is the next owner's to report
        end = highwater(tp)
        if end is not None:
            CONSUMER_LAG.labels(stage, str(tp.partition)).set(max(end - offset - 1, 0))


def _last_offsets(batch: Sequence[Inbound]) -> dict[TopicPartition, int]:
    last: dict[TopicPartition, int] = {}
    for m in batch:
        tp = TopicPartition(m.topic, m.partition)
        last[tp] = max(m.offset, last.get(tp, -1))
    return last


class CommitRefused(Exception):
    """The batch's offsets are not committed: the group or the broker changed under it."""


# How often a commit the broker cannot take for the moment (coordinator moving, a timeout)
# is sent again before the next batch's commit is left to cover it.
COMMIT_TRIES = 3


async def commit_batch(
    msg: KafkaMessage,
    batch: Sequence[Inbound],
    membership: tuple[int, str] | None = None,
    links: frozenset[Any] | None = None,
) -> None:
    """Commit the consumer's positions (this batch and everything before it) as the group
    member that fetched the batch, or raise CommitRefused.

    Refused when the member's generation is no longer the one it had when the batch arrived
    (`membership`). aiokafka's own `commit()` does not check: once a heartbeat has found the
    member gone (a rebalance, or a broker that restarted empty) it commits with no member at
    all, which the broker takes as a standalone consumer's commit — a restarted broker then
    holds offsets from its forgotten log, and the records re-sent into the re-created topics
    below them are never read. The check and the request are made under aiokafka's commit
    lock with no await between them, so no heartbeat can reset the member in between.

    Refused, too, when a broker connection the consumer had when the batch arrived (`links`,
    `_client_connections`) is gone: the broker may have restarted meanwhile, and a restarted
    Tansu accepts commits from members of groups it has forgotten.

    A pattern subscription (the ingress reads every publisher's topic) that sees a new topic
    makes aiokafka drop the current assignment at once, before the rebalance starts; then the
    batch's own offsets are committed instead of the positions, while the old generation
    lasts (`FinishBatchBeforeRebalance` holds the rebalance for it)."""
    consumer: Any = getattr(msg, "consumer", None)
    subscription = getattr(getattr(consumer, "_subscription", None), "subscription", None)
    coordinator: Any = getattr(consumer, "_coordinator", None)
    lock = getattr(coordinator, "_commit_lock", None)
    send_commit = getattr(coordinator, "_do_commit_offsets", None)
    if subscription is None or lock is None or send_commit is None or membership is None:
        await msg.ack()  # aiokafka's internals moved: its own commit, unchecked
        return
    now = _client_connections(getattr(consumer, "_client", None))
    if links is None or now is None or not links <= now:
        raise CommitRefused("a broker connection was lost since the batch arrived")
    assignment = subscription.assignment
    if assignment is not None:
        offsets = assignment.all_consumed_offsets()
    else:
        offsets = {tp: OffsetAndMetadata(o + 1, "") for tp, o in _last_offsets(batch).items()}
    for attempt in range(1, COMMIT_TRIES + 1):
        await coordinator.ensure_coordinator_known()
        async with lock:
            if _membership(consumer) != membership or membership[0] < 0 or not membership[1]:
                raise CommitRefused("the consumer group changed since the batch arrived")
            try:
                await send_commit(assignment, offsets)
            except KafkaError as exc:
                if not exc.retriable or attempt == COMMIT_TRIES:
                    raise
            else:
                break
        await asyncio.sleep(0.1 * attempt)
    await KafkaMessage.ack(msg)  # marks it done for faststream, without a second commit


class RewindFailed(Exception):
    """The partitions could not be rewound after a reconnect (the broker is still away)."""


class ResumeAfterReconnect:
    """Resumes a stage from its group's committed offsets, not from its positions in memory,
    once its consumer has lost a broker connection.

    A broker that restarted without its data (the embedded Tansu) re-creates the topics
    empty. Until a heartbeat finds the member gone and the group is joined again, aiokafka
    goes on fetching from the old positions — and once the publishers have re-sent as many
    records as a partition held before, those positions are valid again and the re-sent
    records below them would be skipped. On a broker that kept its data the committed
    offsets are where the stage was anyway (every batch commits before the next is handled),
    so the rewind costs only fetching the batch in hand again."""

    def __init__(
        self,
        stage: str,
        rewind: Callable[[Any], Awaitable[None]] | None = None,
        where: str = "the group's committed offsets",
    ) -> None:
        self.stage = stage
        # A reader without a consumer group (a change feed every replica reads whole) has no
        # committed offsets: it passes rewind_to_beginning.
        self.rewind = rewind or rewind_to_committed
        self.where = where
        self.known: frozenset[Any] | None = None

    async def rewound(self, consumer: Any, links: frozenset[Any] | None) -> bool:
        """True if the consumer lost a connection since the last batch: then the batch
        fetched now is not to be handled, and its partitions were rewound. RewindFailed if
        they could not be: the batch must come back, and its next arrival tries again."""
        if links is None:
            return False
        known = self.known
        if known is None or known <= links:
            self.known = links
            return False
        try:
            await asyncio.wait_for(self.rewind(consumer), 30)
        except Exception as exc:
            # The connections are still not the known ones: tried again when the batch comes
            # back, and nothing is handled until it has worked.
            log.warning(
                "stage %s: cannot rewind to %s after a reconnect: %s: %s",
                self.stage,
                self.where,
                type(exc).__name__,
                exc,
            )
            await asyncio.sleep(0.5)
            raise RewindFailed(str(exc)) from exc
        self.known = _client_connections(getattr(consumer, "_client", None)) or links
        log.info(
            "stage %s: the consumer lost a broker connection; reading on from %s",
            self.stage,
            self.where,
        )
        return True


def broker_connections(consumer: Any) -> frozenset[Any] | None:
    """An aiokafka consumer's broker connections now (what ResumeAfterReconnect compares)."""
    return _client_connections(getattr(consumer, "_client", None))


async def rewind_to_beginning(consumer: Any) -> None:
    """Seek every assigned partition to its beginning (a reader that keeps no offsets)."""
    partitions = list(consumer.assignment())
    if partitions:
        await consumer.seek_to_beginning(*partitions)


async def rewind_to_committed(consumer: Any) -> None:
    """Seek every assigned partition to the group's committed offset, or to its beginning
    where the group has none (every stage reads from the earliest record)."""
    uncommitted: list[TopicPartition] = []
    for tp in consumer.assignment():
        committed = await consumer.committed(tp)
        if committed is None:
            uncommitted.append(tp)
        else:
            consumer.seek(tp, committed)
    if uncommitted:
        await consumer.seek_to_beginning(*uncommitted)


async def _isolate_poison(
    batch: Sequence[Inbound], handler: Handler, topics: Topics, health: StageHealth, name: str
) -> list[Outgoing]:
    """Handle a repeatedly failing batch one message at a time; dead-letter what still fails."""
    out: list[Outgoing] = []
    for message in batch:
        with handling(message):
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
                why = f"{name} could not process this message: {type(exc).__name__}: {exc}"
                outcome = operation_outcome([Issue(why[:500], code="exception")])
                out.append(dead_letter(topics, message, "processing-failed", outcome))
    return out
