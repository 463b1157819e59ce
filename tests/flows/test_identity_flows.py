"""Identity uncertainty never weakens consent — through all three services on a real broker.

- A twin whose record is only a *possible* match of a patient who denied the subscriber:
  nothing of the twin's is delivered while the match awaits review (both persons'
  consents apply, deny wins, and the audit says identity was uncertain). A reviewer
  resolves it as a different person: the twin's messages are re-evaluated and delivered,
  exactly once, with their original event ids — and the identity change reaches a
  subscriber of Patients.
- A merge of a permitting and a denying patient: deny. The unmerge: each patient's own
  consent again (what was denied only because of the merge is delivered now), and the
  review list names the messages emitted in between.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

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
    register_publisher,
    subscription_resource,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FHIR_JSON = {"content-type": "application/fhir+json"}
IDENTITY_CHANGE = "https://hdx.example.org/fhir/StructureDefinition/identity-change"
TIMEOUT = 90


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _letters(tag: str) -> str:
    """A name nobody else in the session has (hex digits as letters)."""
    return tag.translate(str.maketrans("0123456789", "ghijklmnop")).capitalize()


def _birth_date(tag: str) -> str:
    n = int(tag, 16)
    return f"{1931 + n % 60}-{1 + n % 12:02d}-{1 + n % 28:02d}"


def a_patient(
    local_id: str,
    family: str,
    given: str,
    birth_date: str,
    *,
    nhs: str | None = None,
    postcode: str | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resourceType": "Patient",
        "id": local_id,
        "name": [{"family": family, "given": [given]}],
        "gender": "female",
        "birthDate": birth_date,
    }
    if nhs:
        doc["identifier"] = [{"system": NHS, "value": nhs}]
    if postcode:
        doc["address"] = [{"postalCode": postcode}]
    return doc


@dataclass
class Subscriber:
    recipient: str
    subscription: str
    feed: str


@dataclass
class Hospital:
    """One publisher on the session's stack, with its subscribers and topic readers."""

    stack: LocalStack
    kafka: Broker
    source: str
    publisher: Publisher
    topics: Topics = field(default_factory=Topics)
    readers: list[TopicReader] = field(default_factory=list)

    @property
    def pix(self) -> str:
        return self.stack.url("patient-index")

    def subscribe(self, name: str, criteria: str = "Observation") -> Subscriber:
        org = f"{name}-{_tag()}"
        recipient = f"Organization/{org}"
        r = api(self.stack).post(
            f"{self.stack.url('exchange')}/fhir/Subscription",
            content=orjson.dumps(subscription_resource(recipient, criteria)),
            headers=FHIR_JSON,
            timeout=10,
        )
        assert r.status_code == 201, r.text
        return Subscriber(recipient, str(r.json()["id"]), self.topics.feed(org))

    def deny(self, nhs: str, recipient: str) -> None:
        doc = consent(provision("deny", actor=[recipient]), patient=None, identifier=(NHS, nhs))
        r = api(self.stack).post(
            f"{self.stack.url('consent')}/fhir/Consent",
            content=orjson.dumps(doc),
            headers=FHIR_JSON,
            timeout=10,
        )
        assert r.status_code == 201, r.text

    def reader(self, *topics: str) -> TopicReader:
        reader = TopicReader(self.kafka.bootstrap_servers, topics)
        self.readers.append(reader)
        return reader

    def publish(self, resource: dict[str, Any]) -> str:
        """Publish like the hospital; the event id the exchange derives (entry 0)."""
        ce_id = self.publisher.publish(self.source, resource, topic=self.topics.inbound)
        return derive_event_id(self.source, ce_id, "0")

    def person(self, identifier: str, timeout: float = TIMEOUT) -> str:
        """The enterprise person of ``system|value`` (or ``source|local id``), once indexed."""
        deadline = time.monotonic() + timeout
        while True:
            r = api(self.stack).get(
                f"{self.pix}/fhir/Patient", params={"identifier": identifier}, timeout=10
            )
            assert r.status_code == 200, r.text
            entries = r.json().get("entry", [])
            if len(entries) == 1:
                return str(entries[0]["resource"]["id"])
            assert len(entries) < 2, f"{identifier} names {len(entries)} persons"
            if time.monotonic() > deadline:
                raise AssertionError(f"{identifier} was not indexed within {timeout:.0f}s")
            time.sleep(0.3)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = api(self.stack).post(f"{self.pix}{path}", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


@pytest.fixture
def hospital(stack: LocalStack, kafka: Broker) -> Iterator[Hospital]:
    source = f"urn:hdx:org:identity-flow-{_tag()}"
    register_publisher(stack.url("exchange"), source)
    h = Hospital(
        stack, kafka, source, Publisher(kafka.bootstrap_servers, idempotence=kafka.idempotence)
    )
    try:
        yield h
    finally:
        h.close()


def resources_in(record: Record, resource_type: str) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for e in record.json().get("entry", [])
        if e.get("resource", {}).get("resourceType") == resource_type
    ]


def carries(resource_type: str, rid: str) -> Callable[[Record], bool]:
    return lambda r: any(x.get("id") == rid for x in resources_in(r, resource_type))


def audit_of(reader: TopicReader, event_id: str, sub: Subscriber) -> dict[str, Any]:
    record = reader.wait_for(
        lambda r: (
            r.headers.get("hdx_subject_event") == event_id
            and r.headers.get("hdx_subscription") == sub.subscription
            and r.json().get("resourceType") == "AuditEvent"
        ),
        TIMEOUT,
        f"the AuditEvent of {event_id} for {sub.recipient}",
    )
    return dict(record.json())


def details(event: dict[str, Any], kind: str) -> list[str]:
    return [d["valueString"] for d in event["entity"][-1].get("detail", []) if d["type"] == kind]


def subtypes(event: dict[str, Any]) -> list[str]:
    return [c["code"] for c in event["subtype"]]


def test_a_possible_match_of_a_denying_patient_delivers_nothing_until_resolved(
    hospital: Hospital,
) -> None:
    tag = _tag()
    family, born = _letters(tag), _birth_date(tag)
    care_home = hospital.subscribe("identity-care-home")
    registry = hospital.subscribe("identity-registry", criteria="Patient")
    feed = hospital.reader(care_home.feed)
    patients = hospital.reader(registry.feed)
    audit = hospital.reader(hospital.topics.audit)

    # Ada, with an NHS number, denies the care home.
    ada_nhs = nhs_number()
    hospital.deny(ada_nhs, care_home.recipient)
    hospital.publish(
        a_patient(f"ada-{tag}", family, "Adaline", born, nhs=ada_nhs, postcode="ZZ9 9ZZ")
    )
    ada = hospital.person(f"{NHS}|{ada_nhs}")

    # Her twin: the same name, birth date and gender, nothing else — a possible match.
    twin_local = f"twin-{tag}"
    hospital.publish(a_patient(twin_local, family, "Adaline", born))
    obs_id = f"obs-{tag}"
    event_id = hospital.publish(observation(obs_id, twin_local))
    twin = hospital.person(f"{hospital.source}|{twin_local}")
    assert twin != ada

    deny = audit_of(audit, event_id, care_home)
    assert deny["outcome"] == "4"
    assert "identity-uncertain" in subtypes(deny)
    assert details(deny, "identity") == ["identity-uncertain"]
    assert details(deny, "candidatePerson") == [f"Patient/{ada}"]
    assert any(r.startswith("identity-uncertain") for r in details(deny, "reason"))
    assert deny["entity"][0]["what"] == {"reference": f"Patient/{twin}"}
    assert ada_nhs not in orjson.dumps(deny).decode()
    assert feed.matching(carries("Observation", obs_id)) == []

    # A reviewer: different persons. The twin's Observation is re-evaluated and delivered.
    [task] = (
        api(hospital.stack)
        .get(f"{hospital.pix}/review-tasks", params={"person": twin}, timeout=10)
        .json()
    )
    assert (task["reason"], task["candidate_person_id"]) == ("possible-match", ada)
    result = hospital.post(
        f"/review-tasks/{task['id']}/$resolve",
        {"resolution": "different-person", "reviewer": "flow-reviewer"},
    )
    assert event_id in result["reemitted"]

    delivered = feed.wait_for(
        carries("Observation", obs_id), TIMEOUT, f"the twin's Observation {obs_id}"
    )
    assert delivered.headers["ce_id"] == event_id  # its original event id
    assert delivered.headers.get("hdx_reevaluation") == "1"
    [obs] = resources_in(delivered, "Observation")
    assert obs["subject"]["identifier"]["value"] == twin
    reevaluated = audit.wait_for(
        lambda r: (
            r.headers.get("hdx_subject_event") == event_id
            and r.headers.get("hdx_subscription") == care_home.subscription
            and r.json().get("outcome") == "0"
        ),
        TIMEOUT,
        "the re-evaluation's permit",
    ).json()
    assert "reevaluation" in subtypes(reevaluated)  # recorded beside the first deny

    # Exactly once: a later Observation of the twin (same person, same partition, after
    # the re-emission) arrives, and the first one has still arrived only once.
    later_id = f"obs2-{tag}"
    hospital.publish(observation(later_id, twin_local))
    feed.wait_for(carries("Observation", later_id), TIMEOUT, "the twin's next Observation")
    assert len(feed.matching(carries("Observation", obs_id))) == 1

    # The identity change reaches a subscriber of Patients: who, what, how strong.
    change = patients.wait_for(
        lambda r: any(
            p.get("id") == twin
            and any(e.get("url") == IDENTITY_CHANGE for e in p.get("extension", []))
            for p in resources_in(r, "Patient")
        ),
        TIMEOUT,
        "the twin's identity event",
    )
    [patient_doc] = [p for p in resources_in(change, "Patient") if p.get("id") == twin]
    ext = next(e for e in patient_doc["extension"] if e["url"] == IDENTITY_CHANGE)["extension"]
    values = {e["url"]: next(v for k, v in e.items() if k.startswith("value")) for e in ext}
    assert values["action"] == "separate" and values["by"] == "manual"
    assert values["grade"] == "possible" and values["weight"] > 0
    assert {e["valueString"] for e in ext if e["url"] == "agreed"} >= {"family", "birth_date"}
    assert values["record"] == {"system": hospital.source, "value": twin_local}


def test_merge_of_a_permitting_and_a_denying_patient_denies_and_unmerge_restores(
    hospital: Hospital,
) -> None:
    tag = _tag()
    care_home = hospital.subscribe("merge-care-home")  # Dora denies it
    gp = hospital.subscribe("merge-gp")  # nobody denies it
    feed, gp_feed = hospital.reader(care_home.feed), hospital.reader(gp.feed)
    audit = hospital.reader(hospital.topics.audit)

    pat_nhs, dora_nhs = nhs_number(), nhs_number()
    hospital.deny(dora_nhs, care_home.recipient)
    pat_local, dora_local = f"pat-{tag}", f"dora-{tag}"
    hospital.publish(
        a_patient(pat_local, f"P{_letters(tag)}", "Patricia", "1950-02-03", nhs=pat_nhs)
    )
    hospital.publish(a_patient(dora_local, f"D{_letters(tag)}", "Dora", "1961-04-05", nhs=dora_nhs))
    pat = hospital.person(f"{NHS}|{pat_nhs}")
    dora = hospital.person(f"{NHS}|{dora_nhs}")

    merged = hospital.post(f"/fhir/Patient/{pat}/$merge", {"merged": dora, "reviewer": "flow"})
    merge_id = merged["merge"]

    # While merged (and not reviewed): Dora's deny applies to Patricia's data too.
    during_id = f"obs-during-{tag}"
    during = hospital.publish(observation(during_id, pat_local))
    deny = audit_of(audit, during, care_home)
    assert deny["outcome"] == "4" and "identity-uncertain" in subtypes(deny)
    assert f"Patient/{dora}" in details(deny, "candidatePerson")
    # The GP, whom nobody denies, gets it: delivered under the merged identity.
    gp_feed.wait_for(carries("Observation", during_id), TIMEOUT, "the GP's copy")
    assert feed.matching(carries("Observation", during_id)) == []

    # Unmerge: the review list names what was emitted in between.
    unmerged = hospital.post(f"/fhir/Patient/{pat}/$unmerge", {"reviewer": "flow"})
    assert during in [e["event_id"] for e in unmerged["events"]]
    listed = api(hospital.stack).get(f"{hospital.pix}/merges/{merge_id}/events", timeout=10).json()
    assert during in [e["event_id"] for e in listed["events"]]
    assert listed["status"] == "unmerged"

    # Patricia's own consent again: what was denied only because of the merge arrives …
    arrived = feed.wait_for(
        carries("Observation", during_id), TIMEOUT, "Patricia's Observation, re-evaluated"
    )
    assert arrived.headers["ce_id"] == during
    [obs] = resources_in(arrived, "Observation")
    assert obs["subject"]["identifier"]["value"] == pat
    # … and so does her next one; Dora's is denied by her own consent, not by a merge.
    pat_next, dora_next = f"obs-pat-{tag}", f"obs-dora-{tag}"
    hospital.publish(observation(pat_next, pat_local))
    dora_event = hospital.publish(observation(dora_next, dora_local))
    feed.wait_for(carries("Observation", pat_next), TIMEOUT, "Patricia's next Observation")
    dora_deny = audit_of(audit, dora_event, care_home)
    assert dora_deny["outcome"] == "4"
    assert "identity-uncertain" not in subtypes(dora_deny)
    assert dora_deny["entity"][0]["what"] == {"reference": f"Patient/{dora}"}
    gp_copy = gp_feed.wait_for(carries("Observation", dora_next), TIMEOUT, "Dora's to the GP")
    [dora_obs] = resources_in(gp_copy, "Observation")
    assert dora_obs["subject"]["identifier"]["value"] == dora
    assert feed.matching(carries("Observation", dora_next)) == []
    # Delivered once to the care home; the GP's copy of the re-evaluated event, if sent
    # again, keeps its notification number.
    assert len(feed.matching(carries("Observation", during_id))) == 1
    numbers = {
        r.headers["hdx_event_number"] for r in gp_feed.matching(carries("Observation", during_id))
    }
    assert len(numbers) == 1
