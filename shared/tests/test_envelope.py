from __future__ import annotations

import random
import uuid
from dataclasses import fields

import pytest

from hdx_shared.envelope import ChangeType, Envelope, Header, derive_event_id, uuid5_str

FULL = Envelope(
    event_id="e1",
    source="urn:hdx:org:a",
    change=ChangeType.CREATE,
    resource_type="Observation",
    patient_ref="p1",
    person="P-9",
    person_identifiers=("https://fhir.nhs.uk/Id/nhs-number|9434765919",),
    received_at_ms=1234,
    extra={"traceparent": "00-abc-def-01"},
)


def test_round_trip_through_kafka_headers() -> None:
    env = FULL
    headers = env.to_headers()
    assert headers["ce_specversion"] == "1.0"
    assert headers["content-type"] == "application/fhir+json"
    # What a Kafka client hands back: a list of (str, bytes).
    back = Envelope.from_headers([(k, v.encode()) for k, v in headers.items()])
    assert back == env


def test_header_keys_are_plain_strings_for_kafka_clients() -> None:
    headers = Envelope("e", "s").with_extra(**{Header.CANDIDATES: "[]"}).to_headers()
    assert all(type(k) is str for k in headers)


def test_missing_and_unknown_type_are_tolerated_but_remembered() -> None:
    env = Envelope.from_headers({"ce_source": "s", "ce_type": "org.hl7.fhir.delete"})
    assert env.change is ChangeType.DELETE and env.event_id == ""
    odd = Envelope.from_headers({"ce_type": "explode"})
    assert odd.change is ChangeType.UPDATE
    assert "hdx_invalid_type" not in odd.to_headers()


def test_copies_keep_every_field_but_the_changed_one() -> None:
    other = Envelope("e2", "s2", ChangeType.DELETE, "Patient", "p2", "P-2", ("x|y",), 5, {"a": "b"})
    for f in fields(Envelope):
        assert getattr(FULL, f.name) != getattr(other, f.name)  # every field is set apart
        changed = FULL.evolve(**{f.name: getattr(other, f.name)})
        for g in fields(Envelope):
            want = other if g.name == f.name else FULL
            assert getattr(changed, g.name) == getattr(want, g.name), (f.name, g.name)
    assert FULL.with_extra(b="c").extra == {"traceparent": "00-abc-def-01", "b": "c"}
    assert FULL.without_extra("traceparent").extra == {}
    assert FULL.extra == {"traceparent": "00-abc-def-01"}  # the original is untouched
    with pytest.raises(TypeError):
        FULL.evolve(nonsense=1)


def test_derived_ids_are_the_standard_uuid5() -> None:
    rng = random.Random(7)
    alphabet = "abcXYZ019|-_:/ é✓𝄞"
    for _ in range(2000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        namespace = uuid.UUID(int=rng.getrandbits(128))
        assert uuid5_str(namespace, name) == str(uuid.uuid5(namespace, name))


def test_derived_event_ids_are_stable() -> None:
    assert derive_event_id("s", "1", "0") == derive_event_id("s", "1", "0")
    assert derive_event_id("s", "1", "0") != derive_event_id("s", "1", "1")
    assert derive_event_id("s", "1", "0") != derive_event_id("t", "1", "0")


def test_key_by_person_prefers_the_enterprise_id() -> None:
    assert Envelope("e", "s", patient_ref="p", person="P").key_by_person() == b"P"
    assert Envelope("e", "s", patient_ref="p").key_by_person() == b"p"
