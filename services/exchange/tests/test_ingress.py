from __future__ import annotations

import orjson
import pytest

from hdx_exchange.domain.ingress import Publisher, accept_message, bind_to_topic, topic_name_for
from hdx_shared.envelope import ChangeType, Envelope
from hdx_shared.fhir import FhirError, Limits

SRC = "urn:hdx:org:st-marys"
PUBLISHERS = {SRC: Publisher(SRC, "St Mary's", "https://st-marys.example.org/patient")}
PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female"}
OBS = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"text": "glucose"},
    "subject": {"reference": "Patient/p1"},
}


def accept(doc: object, source: str = SRC, event_id: str = "e1") -> list:  # type: ignore[type-arg]
    raw = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return accept_message(raw, Envelope(event_id, source), PUBLISHERS, Limits(), "t/0/1")


def test_a_single_resource_is_forwarded_as_published() -> None:
    raw = orjson.dumps(OBS)
    [out] = accept_message(raw, Envelope("e1", SRC), PUBLISHERS, Limits(), "t/0/1")
    assert out.value is raw  # bytes forwarded, never re-serialised
    assert out.envelope.resource_type == "Observation"
    assert out.envelope.patient_ref == "p1"
    assert out.key == f"{SRC}|p1".encode()
    assert out.envelope.received_at_ms


def test_event_ids_are_derived_stably_per_entry() -> None:
    first = accept(OBS)[0].envelope.event_id
    assert accept(OBS)[0].envelope.event_id == first
    assert accept(OBS, event_id="e2")[0].envelope.event_id != first


def test_a_transaction_bundle_is_split_into_events() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": PATIENT, "request": {"method": "PUT", "url": "Patient/p1"}},
            {"resource": OBS, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    out = accept(bundle)
    assert [o.envelope.resource_type for o in out] == ["Patient", "Observation"]
    assert [o.envelope.change for o in out] == [ChangeType.UPDATE, ChangeType.CREATE]
    assert len({o.envelope.event_id for o in out}) == 2
    assert orjson.loads(out[1].value) == OBS


@pytest.mark.parametrize(
    ("doc", "source", "reason"),
    [
        (OBS, "urn:hdx:org:stranger", "unknown-publisher"),
        (OBS, "", "unknown-publisher"),
        ({**OBS, "subject": {"reference": "Group/g1"}}, SRC, "broken-reference"),
        ({k: v for k, v in OBS.items() if k != "subject"}, SRC, "broken-reference"),
        ({k: v for k, v in PATIENT.items() if k != "id"}, SRC, "no-patient-id"),
        ({"resourceType": "Organization", "name": "x"}, SRC, "not-patient-data"),
        ({"resourceType": "Bundle", "type": "searchset"}, SRC, "unsupported-bundle"),
        (
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": {**OBS, "subject": {"reference": "Device/d"}}}],
            },
            SRC,
            "invalid-bundle-entry",
        ),
        (b"\x00\x01", SRC, "invalid-json"),
        (
            {
                **PATIENT,
                "identifier": [{"system": "https://st-marys.example.org/patient", "value": "p2"}],
            },
            SRC,
            "mismatched-source",
        ),
    ],
)
def test_what_is_refused_and_why(doc: object, source: str, reason: str) -> None:
    with pytest.raises(FhirError) as info:
        accept(doc, source=source)
    assert info.value.reason == reason
    assert info.value.outcome()["issue"]


def test_accepted_resources_remember_their_patient_for_later_deletes() -> None:
    [out] = accept(OBS)
    assert out.owner == (SRC, "Observation", "o1", "p1")


def test_a_tombstone_keeps_only_identity_and_patient() -> None:
    from hdx_exchange.domain.ingress import tombstone

    assert tombstone("Observation", "o1", "p1") == {
        "resourceType": "Observation",
        "id": "o1",
        "subject": {"reference": "Patient/p1"},
    }
    assert tombstone("Immunization", "i1", "p1")["patient"] == {"reference": "Patient/p1"}
    assert tombstone("Patient", "p1", "p1") == {"resourceType": "Patient", "id": "p1"}


def test_a_publisher_cannot_set_hdx_headers() -> None:
    forged = Envelope.from_headers(
        {
            "ce_id": "e1",
            "ce_source": SRC,
            "hdx_person": "someone-else",
            "hdx_permitted": '[{"subscription": "s"}]',
            "hdx_identity": "certain",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        }
    )
    [out] = accept_message(orjson.dumps(OBS), forged, PUBLISHERS, Limits(), "t/0/1")
    headers = out.envelope.to_headers()
    assert out.envelope.person is None
    assert not any(k in headers for k in ("hdx_person", "hdx_permitted", "hdx_identity"))
    assert "traceparent" in headers


def test_a_source_gets_a_topic_name_made_of_its_letters_and_digits() -> None:
    assert topic_name_for("urn:hdx:source:st-marys") == "urn-hdx-source-st-marys"
    assert topic_name_for("https://gp.example/fhir/") == "https-gp-example-fhir"
    assert Publisher("urn:a", "A", "urn:a/id").topic_name == "urn-a"
    assert Publisher("urn:a", "A", "urn:a/id", topic_name="a-hospital").topic_name == "a-hospital"


def test_a_message_on_a_publishers_topic_is_bound_to_its_source() -> None:
    owner = Publisher("urn:a", "A", "urn:a/id", topic_name="a")
    unnamed = Envelope("e1", "", ChangeType.UPDATE)
    assert bind_to_topic(unnamed, owner, "hdx.inbound.a").source == "urn:a"
    named = Envelope("e2", "urn:a", ChangeType.UPDATE)
    assert bind_to_topic(named, owner, "hdx.inbound.a") == named
    with pytest.raises(FhirError) as refused:
        bind_to_topic(Envelope("e3", "urn:b", ChangeType.UPDATE), owner, "hdx.inbound.a")
    assert refused.value.reason == "source-not-bound" and refused.value.http_status == 403
    with pytest.raises(FhirError) as unknown:
        bind_to_topic(named, None, "hdx.inbound.nobody")
    assert unknown.value.reason == "unknown-publisher-topic"
    inactive = Publisher("urn:a", "A", "urn:a/id", active=False, topic_name="a")
    with pytest.raises(FhirError):
        bind_to_topic(named, inactive, "hdx.inbound.a")
