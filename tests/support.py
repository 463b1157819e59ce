"""Helpers for tests that talk to a real broker: publish like a hospital, read topics, and
call the services' HTTP APIs with an access token got the way an integrator gets one."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from hdx_shared.auth import ClientCredentials, clients_file_entry
from hdx_shared.devstack import LocalStack, admin_auth_for, key_file

NHS = "https://fhir.nhs.uk/Id/nhs-number"
PERSON_SYSTEM = "urn:hdx:person"


def nhs_number(rng: random.Random | None = None) -> str:
    """A random NHS number with a valid modulus-11 check digit."""
    rng = rng or random.Random()
    while True:
        digits = [rng.randint(0, 9) for _ in range(9)]
        check = 11 - sum(d * (10 - i) for i, d in enumerate(digits)) % 11
        check = 0 if check == 11 else check
        if check != 10:
            return "".join(map(str, digits)) + str(check)


def patient(
    local_id: str,
    nhs: str,
    family: str = "Testperson",
    given: str = "Alex",
    birth_date: str = "1970-01-01",
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": local_id,
        "identifier": [{"system": NHS, "value": nhs}],
        "name": [{"family": family, "given": [given]}],
        "gender": "female",
        "birthDate": birth_date,
    }


def observation(local_id: str, patient_id: str, value: float = 5.4) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": local_id,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "valueQuantity": {"value": value, "unit": "mmol/L"},
    }


class Publisher:
    """A hospital integrator's plain confluent-kafka producer, with CloudEvents headers."""

    def __init__(self, bootstrap: str, *, idempotence: bool) -> None:
        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": idempotence,
                "linger.ms": 1,
            }
        )

    def publish(
        self,
        source: str,
        resource: dict[str, Any] | bytes,
        *,
        key: str | None = None,
        event_id: str | None = None,
        topic: str = "hdx.inbound",
        send_source: bool = True,
    ) -> str:
        event_id = event_id or str(uuid.uuid4())
        value = resource if isinstance(resource, bytes) else orjson.dumps(resource)
        if key is None and isinstance(resource, dict):
            ref = (
                resource.get("subject", {}).get("reference", "")
                if resource.get("resourceType") != "Patient"
                else f"Patient/{resource['id']}"
            )
            key = f"{source}|{ref.removeprefix('Patient/')}"
        headers = [
            ("ce_id", event_id),
            *([("ce_source", source)] if send_source else []),
            ("ce_type", "update"),
            ("ce_specversion", "1.0"),
            ("content-type", "application/fhir+json"),
        ]
        self.producer.produce(topic, value=value, key=key, headers=headers)
        if self.producer.flush(10) != 0:
            raise AssertionError("the broker did not acknowledge the published message")
        return event_id


@dataclass
class Record:
    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return orjson.loads(self.value)


class TopicReader:
    """Reads topics from the beginning without a consumer group (no rebalance waits)."""

    def __init__(self, bootstrap: str, topics: Iterable[str]) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"test-reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
            }
        )
        self.topics = list(topics)
        self.records: list[Record] = []
        self._assign()

    def _assign(self) -> None:
        parts = []
        for topic in self.topics:
            md = self.consumer.list_topics(topic, timeout=10).topics[topic]
            parts += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions]
        self.consumer.assign(parts)

    def poll(self, seconds: float = 0.2) -> None:
        for msg in self.consumer.consume(num_messages=500, timeout=seconds):
            if msg.error():
                continue
            headers = {k: (v or b"").decode(errors="replace") for k, v in (msg.headers() or [])}
            self.records.append(Record(msg.topic(), msg.key(), msg.value() or b"", headers))

    def wait_for(
        self,
        predicate: Callable[[Record], bool],
        timeout: float = 30.0,
        what: str = "a matching record",
    ) -> Record:
        deadline = time.monotonic() + timeout
        while True:
            for r in self.records:
                if predicate(r):
                    return r
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}; "
                    f"saw {len(self.records)} records on {self.topics}"
                )
            self.poll()

    def matching(self, predicate: Callable[[Record], bool]) -> list[Record]:
        self.poll(0.5)
        return [r for r in self.records if predicate(r)]

    def close(self) -> None:
        self.consumer.close()


RECIPIENT_EXT = "https://hdx.example.org/fhir/StructureDefinition/recipient"
PURPOSE_EXT = "https://hdx.example.org/fhir/StructureDefinition/purpose-of-use"


def subscription_resource(
    recipient: str,
    criteria: str = "Observation",
    *,
    endpoint: str | None = None,
    purpose: str = "TREAT",
    headers: list[str] | None = None,
) -> dict[str, Any]:
    """A Subscription as a care provider writes it: Kafka feed, or rest-hook to endpoint."""
    channel: dict[str, Any] = (
        {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json"}
        if endpoint
        else {"type": "message", "payload": "application/fhir+json"}
    )
    if headers:
        channel["header"] = headers
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "test",
        "criteria": criteria,
        "extension": [
            {"url": RECIPIENT_EXT, "valueReference": {"reference": recipient}},
            {
                "url": PURPOSE_EXT,
                "valueCoding": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                    "code": purpose,
                },
            },
        ],
        "channel": channel,
    }


_CLIENTS: dict[tuple[str, str], httpx.Client] = {}


def api(target: LocalStack | str) -> httpx.Client:
    """An HTTP client authenticated as the admin client of a stack (or of an exchange this
    test run started, given its address), its tokens got as an integrator gets them."""
    exchange = target.url("exchange") if isinstance(target, LocalStack) else target
    auth = admin_auth_for(exchange)
    assert auth is not None, f"no exchange of this test run is at {exchange}"
    key = (exchange, str(auth.key.kid))
    if key not in _CLIENTS:
        _CLIENTS[key] = httpx.Client(timeout=10, auth=auth)
    return _CLIENTS[key]


def admin_headers(target: LocalStack | str) -> dict[str, str]:
    """An Authorization header with the stack's admin token (for clients other than httpx)."""
    auth = api(target).auth
    assert isinstance(auth, ClientCredentials)
    return auth.headers()


def register_client(
    stack: LocalStack,
    client_id: str,
    scope: str,
    *,
    source: str | None = None,
    subscriber: str | None = None,
) -> ClientCredentials:
    """Register a client through the admin API with a key made for it; its credentials."""
    key = key_file(stack.client_key_path(client_id))
    entry = clients_file_entry(client_id, key, scope, source=source, subscriber=subscriber)
    r = api(stack).put(f"{stack.url('exchange')}/admin/clients/{client_id}", json=entry)
    assert r.status_code == 200, r.text
    return stack.client_auth(client_id)


def register_publisher(
    exchange_url: str, source: str, topic_name: str | None = None
) -> dict[str, Any]:
    """Register a publisher; the exchange's answer (with its `inbound_topic`)."""
    r = api(exchange_url).post(
        f"{exchange_url}/admin/publishers",
        timeout=10,
        json={
            "source": source,
            "name": source,
            "patient_identifier_system": f"{source}/patient-id",
            **({"topic_name": topic_name} if topic_name else {}),
        },
    )
    assert r.status_code == 201, r.text
    registered: dict[str, Any] = r.json()
    return registered


def consent_denying(nhs: str, recipient: str) -> dict[str, Any]:
    """An active patient-privacy Consent: the patient (by NHS number) denies a recipient."""
    from hdx_consent.examples import consent, provision

    return consent(
        provision("deny", actor=[recipient], role="IRCP"), patient=None, identifier=(NHS, nhs)
    )
