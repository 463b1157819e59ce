"""Helpers for the reliability tests: their own HDX stacks, bulk publishing, reading topics
to their end, proving the pipeline drained, and writing the figures measured.

Every wait here polls with a deadline; nothing sleeps a fixed time as proof of anything.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer
from confluent_kafka import TopicPartition as TP

from hdx_consent.examples import consent, provision
from hdx_shared.devstack import (
    SERVICES,
    LocalStack,
    ServiceProcess,
    exchange_auth_env,
    remember_exchange,
)
from hdx_shared.embedded_broker import free_port
from hdx_shared.envelope import derive_event_id
from hdx_shared.topics import Topics
from tests.support import NHS, api, subscription_resource

FHIR_JSON = {"content-type": "application/fhir+json"}
REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "bench" / "results"
# One results file per test session: bench/results/reliability-<timestamp>.json.
SESSION_STAMP = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def tag() -> str:
    return uuid.uuid4().hex[:8]


def env_int(name: str, default: int) -> int:
    """A count the run may scale (HDX_RELIABILITY_*), never below 1."""
    raw = os.environ.get(name, "").strip()
    return max(int(raw), 1) if raw else default


def record_figures(test: str, figures: Mapping[str, Any]) -> Path:
    """Print the figures and merge them into this session's results file."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"reliability-{SESSION_STAMP}.json"
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    doc[test] = {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"\n[reliability] {test}: {json.dumps(dict(figures), sort_keys=True)}\n  -> {path}")
    return path


# ---- stacks ------------------------------------------------------------------------------


def stack_env(prefix: str, *, idempotence: bool, **more: str) -> dict[str, str]:
    return {
        "HDX_TOPIC_PREFIX": prefix,
        "HDX_KAFKA_IDEMPOTENCE": str(idempotence).lower(),
        "HDX_ENVIRONMENT": "test",
        "HDX_LOG_JSON": "true",
        "HDX_REGISTRY_REFRESH_SECONDS": "0.5",
        **more,
    }


def pids(stack: LocalStack) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, proc in stack.services.items():
        assert proc.process is not None, f"{name} is not running"
        out[name] = proc.process.pid
    return out


def assert_alive(stack: LocalStack, expected_pids: Mapping[str, int]) -> None:
    """Every service still runs as the same process and answers /healthz."""
    assert pids(stack) == dict(expected_pids), "a service was restarted"
    for name, proc in stack.services.items():
        assert proc.process is not None and proc.process.poll() is None, (
            f"{name} exited: {proc.tail()}"
        )
        r = httpx.get(f"{proc.url}/healthz", timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok", (name, r.text)


def readyz(stack: LocalStack, service: str) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"{stack.url(service)}/readyz", timeout=5)
    return r.status_code, dict(r.json())


@dataclass(frozen=True)
class Subscriber:
    recipient: str  # Organization/<org>
    subscription: str
    feed: str
    criteria: str


def subscribe(stack: LocalStack, topics: Topics, org: str, criteria: str) -> Subscriber:
    recipient = f"Organization/{org}"
    r = api(stack).post(
        f"{stack.url('exchange')}/fhir/Subscription",
        content=orjson.dumps(subscription_resource(recipient, criteria)),
        headers=FHIR_JSON,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return Subscriber(recipient, str(r.json()["id"]), topics.feed(org), criteria)


def deny_recipient(stack: LocalStack, nhs: str, recipient: str) -> str:
    """A patient-privacy Consent, filed under the NHS number, denying one recipient."""
    doc = consent(provision("deny", actor=[recipient]), patient=None, identifier=(NHS, nhs))
    r = api(stack).post(
        f"{stack.url('consent')}/fhir/Consent",
        content=orjson.dumps(doc),
        headers=FHIR_JSON,
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


# ---- publishing ------------------------------------------------------------------------


def ce_headers(source: str, ce_id: str, ce_type: str = "update") -> list[tuple[str, bytes]]:
    return [
        ("ce_id", ce_id.encode()),
        ("ce_source", source.encode()),
        ("ce_type", ce_type.encode()),
        ("ce_specversion", b"1.0"),
        ("content-type", b"application/fhir+json"),
    ]


def key_of(source: str, resource: Mapping[str, Any]) -> str:
    """`<ce_source>|<local patient id>`, as tests.support.Publisher keys a record."""
    if resource.get("resourceType") == "Patient":
        return f"{source}|{resource['id']}"
    ref = str(resource.get("subject", {}).get("reference", ""))
    return f"{source}|{ref.removeprefix('Patient/')}"


class BulkPublisher:
    """A hospital's confluent-kafka producer that does not wait per record: produce(),
    then flush() to wait for every acknowledgement (any failed delivery is an error)."""

    def __init__(self, bootstrap: str, *, idempotence: bool, topic: str) -> None:
        self.topic = topic
        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": idempotence,
                "linger.ms": 5,
                # One request in flight: a retried request cannot overtake the next one,
                # so one patient's records keep their order even without idempotence.
                "max.in.flight.requests.per.connection": 1,
                "message.timeout.ms": 60_000,
            }
        )
        self.sent = 0
        self.failed: list[str] = []

    def _report(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.failed.append(str(err))

    def send(
        self,
        value: bytes,
        *,
        key: str | bytes | None,
        headers: Sequence[tuple[str, bytes]],
        topic: str | None = None,
        partition: int | None = None,
    ) -> None:
        while True:
            try:
                if partition is None:
                    self.producer.produce(
                        topic or self.topic,
                        value=value,
                        key=key,
                        headers=list(headers),
                        on_delivery=self._report,
                    )
                else:
                    self.producer.produce(
                        topic or self.topic,
                        value=value,
                        key=key,
                        headers=list(headers),
                        on_delivery=self._report,
                        partition=partition,
                    )
                break
            except BufferError:  # the local queue is full: let it drain
                self.producer.poll(0.05)
        self.producer.poll(0)
        self.sent += 1

    def resource(
        self,
        source: str,
        resource: Mapping[str, Any],
        ce_id: str,
        *,
        partition: int | None = None,
    ) -> str:
        """Publish a FHIR resource as `source`; the event id the exchange derives from it."""
        self.send(
            orjson.dumps(resource),
            key=key_of(source, resource),
            headers=ce_headers(source, ce_id),
            partition=partition,
        )
        return derive_event_id(source, ce_id, "0")

    def flush(self, timeout: float = 60.0) -> None:
        left = self.producer.flush(timeout)
        assert left == 0, f"{left} records not acknowledged within {timeout:.0f}s"
        assert not self.failed, f"{len(self.failed)} deliveries failed: {self.failed[:3]}"


# ---- reading -----------------------------------------------------------------------------


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return orjson.loads(self.value)


def _decoded_headers(msg: Message) -> dict[str, str]:
    raw: Any = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    out: dict[str, str] = {}
    for k, v in pairs:
        out[str(k)] = v.decode(errors="replace") if isinstance(v, bytes) else str(v or "")
    return out


def _consumer(bootstrap: str, group: str | None = None) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group or f"reliability-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    md = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if md is None or md.error is not None:
        return []
    return sorted(md.partitions)


def end_offsets(bootstrap: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """Each partition's end offset (the next offset to be written), as a fetch reports it.

    Not ListOffsets: the embedded Tansu answers it with the base offset of the partition's
    newest record batch plus one, short of the end by the rest of that batch (a reader that
    trusted it would stop early and call the batch's tail lost). A fetch's high watermark is
    right, so each partition is read from just before that offset until a fetch answered."""
    consumer = _consumer(bootstrap)
    try:
        starts: list[TP] = []
        for topic in topics:
            for p in _partitions(consumer, topic):
                low, high = consumer.get_watermark_offsets(TP(topic, p), timeout=10)
                starts.append(TP(topic, p, max(high - 1, low, 0)))
        if not starts:
            return {}
        consumer.assign(starts)
        out: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + 30
        while len(out) < len(starts):
            consumer.consume(num_messages=1000, timeout=0.1)
            for tp in starts:
                high = consumer.get_watermark_offsets(TP(tp.topic, tp.partition), cached=True)[1]
                if high >= 0:
                    out[(tp.topic, tp.partition)] = high
            missing = [
                (tp.topic, tp.partition) for tp in starts if (tp.topic, tp.partition) not in out
            ]
            assert time.monotonic() < deadline, f"no fetch answered for {missing}"
        return out
    finally:
        consumer.close()


class TopicTail:
    """Reads whole topics (every partition from the beginning, no consumer group) and keeps
    what it read; `to_end()` reads up to the end offsets as they are when it is called."""

    def __init__(self, bootstrap: str, topics: Iterable[str]) -> None:
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.consumer = _consumer(bootstrap)
        self.records: list[Rec] = []
        self._assigned: set[tuple[str, int]] = set()
        self._assigned_at = 0.0
        self._assign()

    def _assign(self) -> None:
        self._assigned_at = time.monotonic()
        parts = [
            (topic, p)
            for topic in self.topics
            for p in _partitions(self.consumer, topic)
            if (topic, p) not in self._assigned
        ]
        if parts:
            self._assigned.update(parts)
            self.consumer.incremental_assign([TP(t, p, OFFSET_BEGINNING) for t, p in parts])

    def poll(self, seconds: float = 0.2) -> int:
        if time.monotonic() - self._assigned_at > 1.0:
            # A topic created since (a feed, or one a restarted broker re-created) or
            # partitions added: read those too.
            self._assign()
        got = 0
        for msg in self.consumer.consume(num_messages=1000, timeout=seconds):
            if msg.error():
                continue
            headers = _decoded_headers(msg)
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            self.records.append(
                Rec(topic, partition, offset, msg.key(), msg.value() or b"", headers)
            )
            got += 1
        return got

    def to_end(self, timeout: float = 60.0) -> list[Rec]:
        self._assign()
        known = end_offsets(self.bootstrap, self.topics)
        ends = {tp: known.get(tp, 0) for tp in self._assigned}
        deadline = time.monotonic() + timeout
        while True:
            seen: dict[tuple[str, int], int] = {}
            for r in self.records:
                key = (r.topic, r.partition)
                seen[key] = max(seen.get(key, -1), r.offset)
            behind = {tp: end for tp, end in ends.items() if end > 0 and seen.get(tp, -1) < end - 1}
            if not behind:
                return self.records
            assert time.monotonic() < deadline, f"could not read to the end: behind on {behind}"
            self.poll()

    def wait_for(self, predicate: Callable[[Rec], bool], timeout: float, what: str) -> Rec:
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for r in self.records[checked:]:
                if predicate(r):
                    return r
            checked = len(self.records)
            assert time.monotonic() < deadline, (
                f"timed out after {timeout:.0f}s waiting for {what}; "
                f"read {len(self.records)} records from {self.topics}"
            )
            self.poll()

    def close(self) -> None:
        self.consumer.close()


# ---- the pipeline drained ------------------------------------------------------------------


def pipeline_groups(topics: Topics) -> list[tuple[str, str]]:
    """Every hop of the pipeline as (consumer group, topic it reads), in message order."""
    return [
        (topics.group("exchange-ingress"), topics.inbound),
        (topics.group("patient-index"), topics.validated),
        (topics.group("exchange-router"), topics.identified),
        (topics.group("consent"), topics.routed),
        (topics.group("exchange-delivery"), topics.decided),
    ]


def group_lag(bootstrap: str, group: str, topic: str) -> int:
    """Records on `topic` the group has not committed past (committed vs end offsets)."""
    consumer = _consumer(bootstrap, group)
    try:
        parts = [TP(topic, p) for p in _partitions(consumer, topic)]
        committed = consumer.committed(parts, timeout=10)
    finally:
        consumer.close()
    ends = end_offsets(bootstrap, [topic])
    lag = 0
    for tp in committed:
        done = tp.offset if tp.offset >= 0 else 0
        lag += max(ends.get((tp.topic, tp.partition), 0) - done, 0)
    return lag


def lags(bootstrap: str, topics: Topics) -> dict[str, int]:
    return {g: group_lag(bootstrap, g, t) for g, t in pipeline_groups(topics)}


def wait_drained(bootstrap: str, topics: Topics, timeout: float) -> dict[str, int]:
    """Poll until every hop has committed everything on its input, checked hop by hop in
    message order (a hop with no lag cannot add to the next hop's input). Returns the lags
    seen on the last check that was not drained (for the report)."""
    deadline = time.monotonic() + timeout
    last: dict[str, int] = {}
    while True:
        drained = True
        for group, topic in pipeline_groups(topics):
            lag = group_lag(bootstrap, group, topic)
            last[group] = lag
            if lag:
                drained = False
                break
        if drained:
            return last
        assert time.monotonic() < deadline, f"the pipeline did not drain in {timeout:.0f}s: {last}"
        time.sleep(0.25)  # a polling interval, not a proof: the loop checks the offsets


@dataclass
class FeedCheck:
    """What one subscription's feed holds, checked against what consent permits."""

    subscriber: Subscriber
    records: list[Rec] = field(default_factory=list)
    numbers: dict[str, int] = field(default_factory=dict)  # event id → its number
    duplicates: int = 0
    renumbered: list[tuple[str, int, int]] = field(default_factory=list)
    status_mismatch: list[str] = field(default_factory=list)

    def add(self, r: Rec) -> None:
        self.records.append(r)
        event, number = r.headers["ce_id"], int(r.headers["hdx_event_number"])
        status = r.json()["entry"][0]["resource"]
        parts = {p["name"]: p for p in status["parameter"]}
        ev_parts = {p["name"]: p for p in parts["notification-event"]["part"]}
        if ev_parts["event-number"]["valueString"] != str(number):
            self.status_mismatch.append(event)
        if event in self.numbers:
            self.duplicates += 1
            if self.numbers[event] != number:
                self.renumbered.append((event, self.numbers[event], number))
        else:
            self.numbers[event] = number

    def gaps(self) -> list[int]:
        have = sorted(self.numbers.values())
        top = have[-1] if have else 0
        return sorted(set(range(1, top + 1)) - set(have))

    def shared_numbers(self) -> list[int]:
        """Numbers given to more than one event."""
        seen: dict[int, int] = {}
        for n in self.numbers.values():
            seen[n] = seen.get(n, 0) + 1
        return sorted(n for n, c in seen.items() if c > 1)


def restart_services(stack: LocalStack, *, ready_timeout: float = 120.0) -> None:
    """Stop every service, then start them all again and wait until each is ready."""
    for proc in reversed(list(stack.services.values())):
        proc.stop()
    for proc in stack.services.values():
        proc.start()
    for proc in stack.services.values():
        proc.wait_ready(ready_timeout)


def start_exchange_only(
    bootstrap: str, data_dir: Path, prefix: str, *, idempotence: bool, **more: str
) -> ServiceProcess:
    """Only the exchange (its ingress is what some tests need), as its own process, under its
    own prefix: quicker than a whole stack, and a test that wedges it harms no other."""
    spec = next(s for s in SERVICES if s.name == "exchange")
    port = free_port()
    env = {
        **os.environ,
        "HDX_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "HDX_HTTP_PORT": str(port),
        "HDX_DATA_DIR": str(data_dir),
        "HDX_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}/fhir",
        # HDX's token signing key and an admin client, as LocalStack gives its exchange.
        **exchange_auth_env(data_dir / "auth", f"http://127.0.0.1:{port}"),
        **stack_env(prefix, idempotence=idempotence, **more),
    }
    proc = ServiceProcess(spec, port, env, data_dir / "logs" / "exchange.log")
    proc.start()
    try:
        proc.wait_ready(90)
    except BaseException:
        proc.stop()
        raise
    remember_exchange(proc.url, data_dir / "auth")
    return proc


def validated_partition(key: str, partitions: int = 6) -> int:
    """The partition the exchange's producer (aiokafka's default partitioner) gives a key."""
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(partitions))
    return int(DefaultPartitioner()(key.encode(), parts, parts))


def log_events(path: Path) -> list[str]:
    """The `event` of every JSON log line a service wrote (HDX_LOG_JSON=true)."""
    out: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(str(json.loads(line).get("event", "")))
        except ValueError:
            continue
    return out
