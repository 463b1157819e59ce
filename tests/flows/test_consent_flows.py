"""Consent on the real broker, through all three services: a permit is delivered, a deny is
not (and is audited), a revoked consent stops the next message, the opt-out register
blocks secondary use, and a consent store that goes away stops everything until it is back
— then every message is delivered exactly once.

The opt-out register is read at start-up and the store-down case takes a database away, so
those two run their own stack on the same broker under their own topic prefix.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from hdx_consent.examples import consent, provision
from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint as Broker
from hdx_shared.envelope import derive_event_id
from hdx_shared.topics import Topics
from tests.support import (
    NHS,
    Publisher,
    Record,
    TopicReader,
    api,
    nhs_number,
    observation,
    patient,
    register_publisher,
    subscription_resource,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FHIR_JSON = {"content-type": "application/fhir+json"}
SUBJECT_EVENT = "hdx_subject_event"
SUBSCRIPTION = "hdx_subscription"


def _tag() -> str:
    return uuid.uuid4().hex[:8]


# ---- helpers -----------------------------------------------------------------------------


@dataclass
class Subscriber:
    """A care provider's Kafka-feed Subscription on the exchange."""

    recipient: str  # Organization/<id>
    subscription: str  # the Subscription's id
    feed: str  # <prefix>feed.<id>


@dataclass
class Tenant:
    """One hospital publishing into one HDX stack, and the subscribers of a test."""

    stack: LocalStack
    kafka: Broker
    topics: Topics
    source: str
    publisher: Publisher
    readers: list[TopicReader] = field(default_factory=list)

    @classmethod
    def on(cls, stack: LocalStack, kafka: Broker, prefix: str = "hdx.") -> Tenant:
        source = f"urn:hdx:org:consent-flow-{_tag()}"
        register_publisher(stack.url("exchange"), source)
        return cls(
            stack,
            kafka,
            Topics(prefix),
            source,
            Publisher(kafka.bootstrap_servers, idempotence=kafka.idempotence),
        )

    def subscribe(self, name: str, purpose: str = "TREAT") -> Subscriber:
        org = f"{name}-{_tag()}"
        recipient = f"Organization/{org}"
        r = api(self.stack).post(
            f"{self.stack.url('exchange')}/fhir/Subscription",
            content=orjson.dumps(subscription_resource(recipient, "Observation", purpose=purpose)),
            headers=FHIR_JSON,
            timeout=10,
        )
        assert r.status_code == 201, r.text
        return Subscriber(recipient, str(r.json()["id"]), self.topics.feed(org))

    def reader(self, *topics: str) -> TopicReader:
        reader = TopicReader(self.kafka.bootstrap_servers, topics)
        self.readers.append(reader)
        return reader

    def publish(self, resource: dict[str, Any]) -> str:
        """Publish like the hospital; the id of the event the exchange derives from it."""
        ce_id = self.publisher.publish(self.source, resource, topic=self.topics.inbound)
        return derive_event_id(self.source, ce_id, "0")

    def new_patient(self, nhs: str | None = None) -> tuple[str, str]:
        """Publish a Patient; its local id and NHS number."""
        nhs = nhs or nhs_number()
        pid = f"p-{_tag()}"
        self.publish(patient(pid, nhs))
        return pid, nhs

    def write_consent(
        self, doc: dict[str, Any], *, consent_id: str | None = None, version: int | None = None
    ) -> dict[str, Any]:
        base = f"{self.stack.url('consent')}/fhir/Consent"
        if consent_id is None:
            r = api(self.stack).post(base, content=orjson.dumps(doc), headers=FHIR_JSON, timeout=10)
            assert r.status_code == 201, r.text
        else:
            headers = {**FHIR_JSON, "if-match": f'W/"{version}"'} if version else FHIR_JSON
            r = api(self.stack).put(
                f"{base}/{consent_id}",
                content=orjson.dumps({**doc, "id": consent_id}),
                headers=headers,
                timeout=10,
            )
            assert r.status_code in (200, 201), r.text
        return dict(r.json())

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


@pytest.fixture
def tenant(stack: LocalStack, kafka: Broker) -> Iterator[Tenant]:
    t = Tenant.on(stack, kafka)
    try:
        yield t
    finally:
        t.close()


def by_nhs(nhs: str, prov: dict[str, Any]) -> dict[str, Any]:
    """A patient-privacy Consent filed under the patient's NHS number."""
    return consent(prov, patient=None, identifier=(NHS, nhs))


def event_in(reader: TopicReader, event_id: str, what: str, timeout: float = 60) -> Record:
    return reader.wait_for(lambda r: r.headers.get("ce_id") == event_id, timeout, what)


def audit_for(
    reader: TopicReader, event_id: str, sub: Subscriber, timeout: float = 60
) -> dict[str, Any]:
    """The AuditEvent of the decision about this event for this subscription."""
    record = reader.wait_for(
        lambda r: (
            r.headers.get(SUBJECT_EVENT) == event_id
            and r.headers.get(SUBSCRIPTION) == sub.subscription
        ),
        timeout,
        f"the AuditEvent for event {event_id} and {sub.recipient}",
    )
    event = dict(record.json())
    assert event["resourceType"] == "AuditEvent"
    assert record.headers["hdx_resource_type"] == "AuditEvent"
    return event


def details(event: dict[str, Any]) -> dict[str, list[str]]:
    """The decider entity's details: decision, basis, reasons, provision."""
    decider = event["entity"][-1]
    out: dict[str, list[str]] = {}
    for d in decider.get("detail", []):
        out.setdefault(d["type"], []).append(d["valueString"])
    return out


def decider_ref(event: dict[str, Any]) -> str:
    return str(event["entity"][-1]["what"].get("reference", ""))


def read_to_end(reader: TopicReader, timeout: float = 30) -> list[Record]:
    """Everything on the reader's topics up to their end as of now (high watermarks)."""
    consumer = reader.consumer
    parts = consumer.assignment()
    ends = {(p.topic, p.partition): consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
    deadline = time.monotonic() + timeout
    while True:
        positions = consumer.position(parts)
        behind = [
            p
            for p in positions
            if ends[(p.topic, p.partition)] > 0 and p.offset < ends[(p.topic, p.partition)]
        ]
        if not behind:
            return reader.records
        if time.monotonic() > deadline:
            raise AssertionError(f"could not read {reader.topics} to the end: behind on {behind}")
        reader.poll()


def delivered(records: list[Record], event_id: str) -> list[Record]:
    return [r for r in records if r.headers.get("ce_id") == event_id]


def observation_id(record: Record) -> str | None:
    for entry in record.json().get("entry", []):
        res = entry.get("resource", {})
        if res.get("resourceType") == "Observation":
            return str(res.get("id"))
    return None


def stack_env(kafka: Broker, prefix: str, **more: str) -> dict[str, str]:
    return {
        "HDX_KAFKA_IDEMPOTENCE": str(kafka.idempotence).lower(),
        "HDX_ENVIRONMENT": "test",
        "HDX_LOG_JSON": "true",
        "HDX_REGISTRY_REFRESH_SECONDS": "0.5",
        "HDX_TOPIC_PREFIX": prefix,
        **more,
    }


# ---- on the session's stack --------------------------------------------------------------


def test_no_consent_direct_care_is_permitted_delivered_and_audited(tenant: Tenant) -> None:
    care = tenant.subscribe("consent-permit-care")
    feed = tenant.reader(care.feed)
    audit = tenant.reader(tenant.topics.audit)

    pid, _ = tenant.new_patient()
    oid = f"o-{_tag()}"
    ev = tenant.publish(observation(oid, pid))

    record = event_in(feed, ev, f"Observation {oid} in {care.feed}")
    assert observation_id(record) == oid
    assert record.headers[SUBSCRIPTION] == care.subscription
    assert record.headers["hdx_event_number"] == "1"

    event = audit_for(audit, ev, care)
    assert event["outcome"] == "0"
    d = details(event)
    assert d["decision"] == ["permit"] and d["basis"] == ["policy-default"], d
    assert event["agent"][1]["who"]["reference"] == care.recipient


def test_consent_denying_a_recipient_stops_delivery_to_it_and_is_audited(tenant: Tenant) -> None:
    denied, witness = tenant.subscribe("consent-deny-care"), tenant.subscribe("consent-deny-gp")
    denied_feed, witness_feed = tenant.reader(denied.feed), tenant.reader(witness.feed)
    audit = tenant.reader(tenant.topics.audit)

    nhs = nhs_number()
    cid = tenant.write_consent(by_nhs(nhs, provision("deny", actor=[denied.recipient])))["id"]
    pid, _ = tenant.new_patient(nhs)
    ev = tenant.publish(observation(f"o-{_tag()}", pid))

    # The same event goes to the other recipient: once it is in that feed, delivery has
    # handled the decided record, and the denied recipient's feed must not have it.
    event_in(witness_feed, ev, f"event {ev} in the witness feed {witness.feed}")
    deny = audit_for(audit, ev, denied)
    assert deny["outcome"] == "4"
    d = details(deny)
    assert d["decision"] == ["deny"] and d["basis"] == ["consent"], d
    assert decider_ref(deny) == f"Consent/{cid}/_history/1"
    assert audit_for(audit, ev, witness)["outcome"] == "0"
    assert delivered(read_to_end(denied_feed), ev) == [], "a denied event reached the feed"


def test_revoked_consent_denies_the_next_message(tenant: Tenant) -> None:
    care, witness = tenant.subscribe("consent-revoke-care"), tenant.subscribe("consent-revoke-gp")
    care_feed, witness_feed = tenant.reader(care.feed), tenant.reader(witness.feed)
    audit = tenant.reader(tenant.topics.audit)

    nhs = nhs_number()
    permit = by_nhs(nhs, provision("permit", actor=[care.recipient]))
    written = tenant.write_consent(permit)
    cid = written["id"]
    assert written["meta"]["versionId"] == "1"
    pid, _ = tenant.new_patient(nhs)
    first = tenant.publish(observation(f"o-{_tag()}", pid))
    event_in(care_feed, first, f"the first event {first} in {care.feed}")
    assert decider_ref(audit_for(audit, first, care)) == f"Consent/{cid}/_history/1"

    revoked = tenant.write_consent(
        by_nhs(nhs, provision("deny", actor=[care.recipient])), consent_id=cid, version=1
    )
    assert revoked["meta"]["versionId"] == "2"
    second = tenant.publish(observation(f"o-{_tag()}", pid))

    event_in(witness_feed, second, f"the second event {second} in the witness feed")
    deny = audit_for(audit, second, care)
    assert deny["outcome"] == "4" and details(deny)["basis"] == ["consent"]
    assert decider_ref(deny) == f"Consent/{cid}/_history/2"
    records = read_to_end(care_feed)
    # Delivered, and any redelivery (at least once) is recognisable: the same event number.
    copies = delivered(records, first)
    assert copies and len({r.headers["hdx_event_number"] for r in copies}) == 1, copies
    assert delivered(records, second) == [], "the event after the revocation was delivered"


# ---- the opt-out register: its own stack -------------------------------------------------


def test_opt_out_register_blocks_research_but_not_direct_care(
    kafka: Broker, tmp_path: Path
) -> None:
    opted_out, control = nhs_number(), nhs_number()
    register = tmp_path / "opt-out.txt"
    register.write_text(f"# national data opt-out\n{NHS}|{opted_out}\n", encoding="utf-8")
    prefix = f"optout{_tag()}."
    stack = LocalStack(
        data_dir=tmp_path / "hdx",
        bootstrap_servers=kafka.bootstrap_servers,
        extra_env=stack_env(kafka, prefix, HDX_OPT_OUT_REGISTER=str(register)),
    )
    stack.start(ready_timeout=90)
    t = Tenant.on(stack, kafka, prefix)
    try:
        care = t.subscribe("optout-care")
        research = t.subscribe("optout-research", purpose="HRESCH")
        care_feed, research_feed = t.reader(care.feed), t.reader(research.feed)
        audit = t.reader(t.topics.audit)
        opt_in = provision("permit", purpose=["HRESCH"], actor=[research.recipient])
        for nhs in (opted_out, control):
            t.write_consent(by_nhs(nhs, opt_in))

        out_pid, _ = t.new_patient(opted_out)
        in_pid, _ = t.new_patient(control)
        ev_out = t.publish(observation(f"o-{_tag()}", out_pid))
        ev_in = t.publish(observation(f"o-{_tag()}", in_pid))

        # The control patient's research opt-in holds; direct care holds for both.
        event_in(research_feed, ev_in, "the control patient's event in the research feed")
        event_in(care_feed, ev_in, "the control patient's event in the care feed")
        event_in(care_feed, ev_out, "the opted-out patient's event in the care feed")
        deny = audit_for(audit, ev_out, research)
        assert deny["outcome"] == "4"
        d = details(deny)
        assert d["basis"] == ["opt-out-register"], d
        assert "opt-out register" in " ".join(d["reason"])
        assert audit_for(audit, ev_out, care)["outcome"] == "0"
        assert delivered(read_to_end(research_feed), ev_out) == []
    finally:
        t.close()
        stack.stop()


# ---- the consent store goes away: its own stack on PostgreSQL ----------------------------


def _postgres_admin_url() -> str | None:
    url = os.environ.get("HDX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=2):
            return url
    except Exception:
        return None


@pytest.fixture
def consent_database() -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL database for the consent service: (admin URL, its URL)."""
    admin = _postgres_admin_url()
    if admin is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs PostgreSQL for the consent store-down flow; none is reachable")
        pytest.skip("no PostgreSQL at HDX_TEST_POSTGRES_URL or 127.0.0.1:5432")
    import psycopg

    name = f"hdx_consent_flow_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin, f"{admin.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _set_database_reachable(admin: str, url: str, reachable: bool) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(reachable).lower()}')
        if not reachable:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


def _readiness(stack: LocalStack) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"{stack.url('consent')}/readyz", timeout=5)
    return r.status_code, dict(r.json())


@pytest.mark.postgres
def test_consent_store_down_delivers_nothing_then_everything_exactly_once(
    kafka: Broker, tmp_path: Path, consent_database: tuple[str, str]
) -> None:
    admin, url = consent_database
    prefix = f"pgdown{_tag()}."
    stack = LocalStack(
        data_dir=tmp_path / "hdx",
        bootstrap_servers=kafka.bootstrap_servers,
        # The periodic database check is slowed right down, so that only the gate's own
        # check before each batch can stop the messages published just after the outage.
        extra_env=stack_env(kafka, prefix, HDX_DB_CHECK_SECONDS="120", HDX_OUTBOX_SECONDS="120"),
        database_urls={"consent": url},
    )
    stack.start(ready_timeout=90)
    t = Tenant.on(stack, kafka, prefix)
    try:
        care = t.subscribe("pgdown-care")
        feed = t.reader(care.feed)
        pid, _ = t.new_patient()
        before = t.publish(observation(f"o-{_tag()}", pid))
        event_in(feed, before, "an event delivered while the consent store is up")

        _set_database_reachable(admin, url, False)
        # Published at once: not even a message that reaches the gate before its next
        # scheduled database check may be decided.
        during = [t.publish(observation(f"o-{_tag()}", pid, value=v)) for v in (1.0, 2.0, 3.0)]

        deadline = time.monotonic() + 30
        while True:
            status, body = _readiness(stack)
            gate = next(s for s in body["stages"] if s["name"] == "consent-gate")
            if status == 503 and not gate["ready"]:
                break
            assert time.monotonic() < deadline, f"consent did not report the store down: {body}"
            time.sleep(0.2)
        assert any("consent database" in r for r in body["reasons"]), body
        assert "consent database" in gate["reason"], gate
        # Negative check, bounded: the gate is holding the batch, nothing is delivered.
        hold = time.monotonic() + 3
        while time.monotonic() < hold:
            feed.poll()
        leaked = [r.headers.get("ce_id") for r in feed.records if r.headers.get("ce_id") in during]
        assert leaked == [], "delivered while the consent store was down"

        _set_database_reachable(admin, url, True)
        for ev in during:
            event_in(feed, ev, f"event {ev} after the consent store came back")
        status, body = _readiness(stack)
        assert status == 200, body
        records = read_to_end(feed)
        ids = [r.headers["ce_id"] for r in records]
        numbers = [r.headers["hdx_event_number"] for r in records]
        assert sorted(ids) == sorted([before, *during]), "each event delivered exactly once"
        assert sorted(numbers, key=int) == ["1", "2", "3", "4"], numbers
    finally:
        t.close()
        stack.stop()
