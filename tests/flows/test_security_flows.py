"""Authenticated clients confined to their own data, end to end on a real broker: each
client registered through the admin API with its own key, its tokens got from the exchange
as an integrator gets them (a signed client assertion)."""

from __future__ import annotations

import time
import uuid

import httpx
import orjson
import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint as Broker
from tests.support import (
    Publisher,
    TopicReader,
    api,
    nhs_number,
    observation,
    patient,
    register_client,
    register_publisher,
    subscription_resource,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]
FHIR = {"content-type": "application/fhir+json"}
PUBLISHER_SCOPE = "system/Patient.cud system/Observation.cud"
SUBSCRIBER_SCOPE = "system/Subscription.crus"


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def test_a_publisher_publishing_as_another_source_is_refused_and_audited(
    stack: LocalStack, kafka: Broker
) -> None:
    tag = _tag()
    mine, theirs = f"urn:hdx:org:sec-own-{tag}", f"urn:hdx:org:sec-other-{tag}"
    for source in (mine, theirs):
        register_publisher(stack.url("exchange"), source)
    auth = register_client(stack, f"sec-pub-{tag}", PUBLISHER_SCOPE, source=mine)
    url = f"{stack.url('exchange')}/fhir/Patient"
    audit = TopicReader(kafka.bootstrap_servers, ["hdx.audit"])
    try:
        with httpx.Client(auth=auth, timeout=10) as http:
            body = orjson.dumps(patient(f"p-{tag}", nhs_number(), family="Zebedeeson"))
            r = http.post(url, content=body, headers={**FHIR, "ce-source": theirs})
            assert r.status_code == 403, r.text
            assert r.json()["resourceType"] == "OperationOutcome"
            r = http.post(url, content=body, headers=FHIR)  # as itself: accepted
            assert r.status_code == 202, r.text

        alert = audit.wait_for(
            lambda rec: (
                b"publish-as-other-source" in rec.value and f"sec-pub-{tag}".encode() in rec.value
            ),
            timeout=60,
            what="the security alert for the refused publish",
        )
    finally:
        audit.close()
    event = alert.json()
    assert event["resourceType"] == "AuditEvent" and event["outcome"] == "8"
    assert [
        e["what"]["identifier"]["value"] for e in event["entity"] if "identifier" in e["what"]
    ] == [theirs, mine]
    assert b"Zebedeeson" not in alert.value, "no patient data in a security alert"


def test_a_kafka_publisher_is_bound_to_the_source_of_its_own_topic(
    stack: LocalStack, kafka: Broker
) -> None:
    """What arrives on hdx.inbound.<name> is that publisher's: without ce_source it is taken
    as its own; claiming another source is dead-lettered and audited; a topic no publisher
    is registered for is refused. (The Kafka ACL granting Write on that topic alone is what
    makes this binding: deploy/kafka-acls.sh, tests/deploy.)"""
    tag = _tag()
    mine, theirs = f"urn:hdx:org:kafka-own-{tag}", f"urn:hdx:org:kafka-other-{tag}"
    registered = register_publisher(stack.url("exchange"), mine, topic_name=f"own-{tag}")
    register_publisher(stack.url("exchange"), theirs)
    topic = registered["inbound_topic"]
    assert topic == f"hdx.inbound.own-{tag}"
    unregistered = f"hdx.inbound.nobody-{tag}"

    readers = {
        name: TopicReader(kafka.bootstrap_servers, [name])
        for name in ("hdx.validated", "hdx.deadletter", "hdx.audit")
    }
    producer = Publisher(kafka.bootstrap_servers, idempotence=kafka.idempotence)
    try:
        producer.publish(mine, patient(f"own-{tag}", nhs_number()), topic=topic, send_source=False)
        forged = producer.publish(
            theirs, patient(f"forged-{tag}", nhs_number(), family="Zebedeeson"), topic=topic
        )
        stray = producer.publish(mine, patient(f"stray-{tag}", nhs_number()), topic=unregistered)

        accepted = readers["hdx.validated"].wait_for(
            lambda rec: f'"own-{tag}"'.encode() in rec.value,
            timeout=90,
            what="the message on the publisher's own topic, validated",
        )
        refused = readers["hdx.deadletter"].wait_for(
            lambda rec: rec.headers.get("ce_id") == forged,
            timeout=60,
            what="the forged message dead-lettered",
        )
        alert = readers["hdx.audit"].wait_for(
            lambda rec: b"publish-as-other-source" in rec.value and topic.encode() in rec.value,
            timeout=60,
            what="the security alert for the forged source",
        )
        nobody = readers["hdx.deadletter"].wait_for(
            lambda rec: rec.headers.get("ce_id") == stray,
            timeout=90,
            what="the message on an unregistered publisher topic dead-lettered",
        )
        validated_ids = {
            r.headers.get("ce_source") for r in readers["hdx.validated"].matching(lambda r: True)
        }
    finally:
        for reader in readers.values():
            reader.close()
    assert accepted.headers["ce_source"] == mine, "the source comes from the topic"
    assert refused.headers["hdx_reason"] == "source-not-bound"
    assert nobody.headers["hdx_reason"] == "unknown-publisher-topic"
    assert theirs not in validated_ids, "nothing claimed as another source got through"
    event = alert.json()
    assert event["outcome"] == "8"
    assert event["agent"][0]["who"]["identifier"]["value"] == topic
    assert [
        e["what"]["identifier"]["value"] for e in event["entity"] if "identifier" in e["what"]
    ] == [theirs, mine]
    assert b"Zebedeeson" not in alert.value, "no patient data in a security alert"


def test_every_service_audits_what_it_refuses(stack: LocalStack, kafka: Broker) -> None:
    """A request without a token, to each service, is a security alert on hdx.audit that
    names the service that refused it (and, chained by the exchange, is in the audit log)."""
    tag = _tag()
    audit = TopicReader(kafka.bootstrap_servers, ["hdx.audit"])
    paths = {
        "exchange": f"/fhir/Subscription?marker={tag}",
        "consent": "/fhir/Consent",
        "patient-index": "/fhir/Patient",
    }
    try:
        for service, path in paths.items():
            r = httpx.get(stack.url(service) + path, timeout=10)
            assert r.status_code == 401, (service, r.text)
        for service, path in paths.items():
            audit.wait_for(
                lambda rec, service=service, path=path: (
                    b"unauthenticated" in rec.value
                    and f'"value":"{service}"'.encode() in rec.value
                    and f"GET {path.split('?')[0]}".encode() in rec.value
                ),
                timeout=60,
                what=f"the security alert of {service}",
            )
    finally:
        audit.close()


def test_a_deactivated_clients_token_is_refused_by_every_service(stack: LocalStack) -> None:
    """Revocation reaches the services that check tokens on their own (consent, the patient
    index) within HDX_AUTH_REVOCATION_REFRESH_SECONDS, not at the token's expiry."""
    tag = _tag()
    client = register_client(stack, f"sec-revoked-{tag}", "system/Consent.rs system/Patient.rs")
    held = client.headers()
    reads = {
        "consent": "/fhir/Consent?patient=Patient/nobody",
        "patient-index": "/fhir/Patient?identifier=urn:nobody|0",
    }
    for service, path in reads.items():
        r = httpx.get(stack.url(service) + path, headers=held, timeout=10)
        assert r.status_code == 200, (service, r.text)
    r = api(stack).delete(f"{stack.url('exchange')}/admin/clients/sec-revoked-{tag}")
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    refused: dict[str, str] = {}
    while len(refused) < len(reads) and time.monotonic() < deadline:
        for service, path in reads.items():
            r = httpx.get(stack.url(service) + path, headers=held, timeout=10)
            if r.status_code == 401:
                refused[service] = r.json()["issue"][0]["diagnostics"]
        time.sleep(0.2)
    assert set(refused) == set(reads), f"still accepted by {set(reads) - set(refused)}"
    assert all("revoked" in why for why in refused.values()), refused


def test_a_subscriber_reads_only_its_own_subscriptions_and_events(stack: LocalStack) -> None:
    tag = _tag()
    ex = stack.url("exchange")
    clients = {}
    ids = {}
    for name in ("oak", "elm"):
        org = f"Organization/sec-{name}-{tag}"
        clients[name] = register_client(
            stack, f"sec-{name}-{tag}", SUBSCRIBER_SCOPE, subscriber=org
        )
        with httpx.Client(auth=clients[name], timeout=30) as http:
            r = http.post(
                f"{ex}/fhir/Subscription",
                content=orjson.dumps(subscription_resource(org)),
                headers=FHIR,
            )
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
    with httpx.Client(auth=clients["oak"], timeout=10) as oak:
        assert oak.get(f"{ex}/fhir/Subscription/{ids['oak']}/$events").status_code == 200
        for path in ("", "/$status", "/$events"):
            r = oak.get(f"{ex}/fhir/Subscription/{ids['elm']}{path}")
            assert r.status_code == 403, (path, r.text)
            assert r.json()["issue"][0]["code"] == "forbidden"
        found = oak.get(f"{ex}/fhir/Subscription").json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [ids["oak"]]
        # ...nor subscribe for another organization.
        r = oak.post(
            f"{ex}/fhir/Subscription",
            content=orjson.dumps(subscription_resource(f"Organization/sec-elm-{tag}")),
            headers=FHIR,
        )
        assert r.status_code == 403


def test_bound_clients_publish_and_subscribe_end_to_end_with_tokens(
    stack: LocalStack, kafka: Broker
) -> None:
    tag = _tag()
    source, org = f"urn:hdx:org:sec-hospital-{tag}", f"sec-home-{tag}"
    register_publisher(stack.url("exchange"), source)
    publisher = register_client(stack, f"sec-hosp-{tag}", PUBLISHER_SCOPE, source=source)
    subscriber = register_client(
        stack, f"sec-home-{tag}", SUBSCRIBER_SCOPE, subscriber=f"Organization/{org}"
    )
    ex = stack.url("exchange")
    with httpx.Client(auth=subscriber, timeout=30) as http:
        r = http.post(
            f"{ex}/fhir/Subscription",
            content=orjson.dumps(subscription_resource(f"Organization/{org}")),
            headers=FHIR,
        )
        assert r.status_code == 201, r.text
    feed = TopicReader(kafka.bootstrap_servers, [f"hdx.feed.{org}"])
    pid, oid = f"p-{tag}", f"o-{tag}"
    try:
        with httpx.Client(auth=publisher, timeout=10) as http:
            for resource in (patient(pid, nhs_number()), observation(oid, pid)):
                r = http.post(
                    f"{ex}/fhir/{resource['resourceType']}",
                    content=orjson.dumps(resource),
                    headers=FHIR,
                )
                assert r.status_code == 202, r.text
        record = feed.wait_for(
            lambda rec: oid.encode() in rec.value,
            timeout=60,
            what=f"Observation {oid} in the subscriber's feed",
        )
    finally:
        feed.close()
    assert record.headers["ce_source"] == source


def test_every_service_refuses_an_oversized_body_before_reading_it(stack: LocalStack) -> None:
    too_big = b"x" * (5 * 1024 * 1024 + 1)  # HDX_MAX_REQUEST_BYTES' default, plus one
    for service, path in (
        ("exchange", "/fhir/Patient"),
        ("consent", "/fhir/Consent"),
        ("patient-index", "/fhir/Patient/$match"),
    ):
        r = httpx.post(f"{stack.url(service)}{path}", content=too_big, headers=FHIR, timeout=30)
        assert r.status_code == 413, (service, r.status_code)
        assert r.json()["issue"][0]["code"] == "too-costly"
