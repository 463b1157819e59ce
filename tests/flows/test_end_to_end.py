"""One FHIR message from a hospital to a subscriber, through all three services, on a real
broker: the permit path, the deny path, and invalid input that is dead-lettered."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint as Broker
from hdx_shared.envelope import derive_event_id
from tests.support import (
    NHS,
    PERSON_SYSTEM,
    Publisher,
    Record,
    TopicReader,
    api,
    consent_denying,
    nhs_number,
    observation,
    patient,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@dataclass
class Exchange:
    """A fresh publisher and subscriber for one test module, on the running stack."""

    stack: LocalStack
    publisher: Publisher
    source: str
    recipient: str
    feed: str

    def consent_denying_recipient(self, nhs: str) -> None:
        consent = consent_denying(nhs, self.recipient)
        r = api(self.stack).post(
            f"{self.stack.url('consent')}/fhir/Consent",
            content=orjson.dumps(consent),
            headers={"content-type": "application/fhir+json"},
            timeout=10,
        )
        assert r.status_code == 201, r.text

    def person_of(self, nhs: str) -> str:
        r = api(self.stack).get(
            f"{self.stack.url('patient-index')}/fhir/Patient",
            params={"identifier": f"{NHS}|{nhs}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        entries = r.json().get("entry", [])
        assert len(entries) == 1, r.text
        return str(entries[0]["resource"]["id"])


@pytest.fixture(scope="module")
def exchange(stack: LocalStack, kafka: Broker) -> Exchange:
    tag = uuid.uuid4().hex[:8]
    source = f"urn:hdx:org:test-hospital-{tag}"
    recipient = f"Organization/test-care-home-{tag}"
    ex = stack.url("exchange")
    r = api(stack).post(
        f"{ex}/admin/publishers",
        timeout=10,
        json={
            "source": source,
            "name": f"Test hospital {tag}",
            "patient_identifier_system": f"https://test-{tag}.example.org/patient",
        },
    )
    assert r.status_code == 201, r.text
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "flow test",
        "criteria": "Observation",
        "extension": [
            {
                "url": "https://hdx.example.org/fhir/StructureDefinition/recipient",
                "valueReference": {"reference": recipient},
            },
            {
                "url": "https://hdx.example.org/fhir/StructureDefinition/purpose-of-use",
                "valueCoding": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                    "code": "TREAT",
                },
            },
        ],
        "channel": {"type": "message", "payload": "application/fhir+json"},
    }
    r = api(stack).post(
        f"{ex}/fhir/Subscription",
        content=orjson.dumps(subscription),
        headers={"content-type": "application/fhir+json"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    feed = f"hdx.feed.test-care-home-{tag}"
    return Exchange(
        stack,
        Publisher(kafka.bootstrap_servers, idempotence=kafka.idempotence),
        source,
        recipient,
        feed,
    )


def _observation_in(record: Record) -> dict[str, Any] | None:
    bundle = record.json()
    for entry in bundle.get("entry", []):
        res = entry.get("resource", {})
        if res.get("resourceType") == "Observation":
            return dict(res)
    return None


def test_permitted_observation_reaches_the_feed_with_the_enterprise_id(
    exchange: Exchange, kafka: Broker
) -> None:
    nhs = nhs_number()
    pid, oid = f"p-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    feed = TopicReader(kafka.bootstrap_servers, [exchange.feed])
    try:
        exchange.publisher.publish(exchange.source, patient(pid, nhs))
        exchange.publisher.publish(exchange.source, observation(oid, pid))

        record = feed.wait_for(
            lambda r: (_observation_in(r) or {}).get("id") == oid,
            timeout=60,
            what=f"Observation {oid} in {exchange.feed}",
        )
    finally:
        feed.close()
    bundle = record.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "history"
    status = bundle["entry"][0]["resource"]
    assert status["resourceType"] == "Parameters"
    params = {p["name"]: p for p in status["parameter"]}
    assert params["type"]["valueCode"] == "event-notification"
    obs = _observation_in(record)
    assert obs is not None
    subject = obs["subject"]
    assert subject["reference"] == f"Patient/{pid}"
    assert subject["identifier"]["system"] == PERSON_SYSTEM
    assert subject["identifier"]["value"] == exchange.person_of(nhs)
    assert record.headers["ce_source"] == exchange.source
    assert "hdx_person_identifiers" not in record.headers, "internal headers stay inside HDX"
    assert "hdx_candidates" not in record.headers
    assert record.key == subject["identifier"]["value"].encode()


def test_denied_observation_never_reaches_the_feed_and_the_deny_is_audited(
    exchange: Exchange, kafka: Broker
) -> None:
    denied_nhs, other_nhs = nhs_number(), nhs_number()
    exchange.consent_denying_recipient(denied_nhs)
    pid, oid = f"p-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    feed = TopicReader(kafka.bootstrap_servers, [exchange.feed])
    audit = TopicReader(kafka.bootstrap_servers, ["hdx.audit"])
    try:
        exchange.publisher.publish(
            exchange.source, patient(pid, denied_nhs, family="Quixlewhistle", given="Ottoline")
        )
        published_id = exchange.publisher.publish(exchange.source, observation(oid, pid))
        # The exchange derives the event id from the publisher's (source, ce_id, entry).
        event_id = derive_event_id(exchange.source, published_id, "0")

        def is_deny_for_this_observation(r: Record) -> bool:
            ev = r.json()
            return (
                r.headers.get("hdx_subject_event") == event_id
                and ev.get("resourceType") == "AuditEvent"
                and exchange.recipient in r.value.decode()
                and ev.get("outcome") != "0"
            )

        deny = audit.wait_for(
            is_deny_for_this_observation,
            timeout=60,
            what=f"a deny AuditEvent for Observation {oid}",
        )
        text = deny.value.decode()
        assert "Quixlewhistle" not in text, "an AuditEvent must not carry names"
        assert "Ottoline" not in text
        assert denied_nhs not in text, "nor the NHS number"
        assert denied_nhs not in str(deny.headers), "not even in its headers"

        # A permitted message published after the denied one shows the pipeline has moved
        # past it; the denied Observation must not be in the feed.
        pid2, oid2 = f"p-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
        exchange.publisher.publish(exchange.source, patient(pid2, other_nhs))
        exchange.publisher.publish(exchange.source, observation(oid2, pid2))
        feed.wait_for(
            lambda r: (_observation_in(r) or {}).get("id") == oid2,
            timeout=60,
            what=f"the permitted Observation {oid2}",
        )
        leaked = feed.matching(lambda r: (_observation_in(r) or {}).get("id") == oid)
        assert leaked == [], "a denied Observation reached the subscriber's feed"
    finally:
        feed.close()
        audit.close()


def test_invalid_fhir_is_dead_lettered_with_an_outcome_and_valid_traffic_flows_on(
    exchange: Exchange, kafka: Broker
) -> None:
    pid = f"p-{uuid.uuid4().hex[:8]}"
    bad = {
        "resourceType": "Observation",
        "id": f"bad-{pid}",
        "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
    }  # Observation.code is required
    dlq = TopicReader(kafka.bootstrap_servers, ["hdx.deadletter"])
    feed = TopicReader(kafka.bootstrap_servers, [exchange.feed])
    try:
        bad_id = exchange.publisher.publish(exchange.source, bad)
        not_json_id = exchange.publisher.publish(
            exchange.source, b"{this is not json", key=f"{exchange.source}|{pid}"
        )
        dead = dlq.wait_for(
            lambda r: r.headers.get("ce_id") == bad_id,
            timeout=60,
            what="the invalid Observation on the dead-letter topic",
        )
        outcome = orjson.loads(dead.headers["hdx_outcome"])
        assert outcome["resourceType"] == "OperationOutcome"
        assert any("code" in (i.get("expression") or [""])[0] for i in outcome["issue"]), outcome
        assert dead.headers["hdx_reason"] == "invalid-resource"
        assert dead.headers["ce_source"] == exchange.source
        assert dead.value == orjson.dumps(bad), "the original bytes are kept for replay"
        junk = dlq.wait_for(
            lambda r: r.headers.get("ce_id") == not_json_id,
            timeout=30,
            what="the non-JSON message on the dead-letter topic",
        )
        assert junk.headers["hdx_reason"] == "invalid-json"

        # The services kept running: the next valid message goes through.
        oid = f"o-{uuid.uuid4().hex[:8]}"
        exchange.publisher.publish(exchange.source, patient(pid, nhs_number()))
        exchange.publisher.publish(exchange.source, observation(oid, pid))
        feed.wait_for(
            lambda r: (_observation_in(r) or {}).get("id") == oid,
            timeout=60,
            what=f"the valid Observation {oid} after the invalid ones",
        )
    finally:
        dlq.close()
        feed.close()


def test_unknown_publisher_is_dead_lettered(exchange: Exchange, kafka: Broker) -> None:
    dlq = TopicReader(kafka.bootstrap_servers, ["hdx.deadletter"])
    try:
        stranger = f"urn:hdx:org:unknown-{uuid.uuid4().hex[:6]}"
        event_id = exchange.publisher.publish(stranger, patient("x1", nhs_number()))
        dead = dlq.wait_for(
            lambda r: r.headers.get("ce_id") == event_id,
            timeout=60,
            what="the unknown publisher's message on the dead-letter topic",
        )
        assert dead.headers["hdx_reason"] == "unknown-publisher"
    finally:
        dlq.close()
