"""Authenticated clients confined to their own data, end to end on a real broker: each
client registered through the admin API with its own key, its tokens got from the exchange
as an integrator gets them (a signed client assertion)."""

from __future__ import annotations

import uuid

import httpx
import orjson
import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint as Broker
from tests.support import (
    TopicReader,
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
    assert [e["what"]["identifier"]["value"] for e in event["entity"]] == [theirs, mine]
    assert b"Zebedeeson" not in alert.value, "no patient data in a security alert"


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
