"""Parsing FHIR Consent into the decision model, and the in-memory index."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from hdx_consent.domain import ConsentIndex, ConsentInvalid, parse_consent
from hdx_consent.domain.consent import normalize_reference
from hdx_consent.domain.timeutil import fhir_interval
from hdx_consent.examples import consent, provision
from hdx_shared.fhir import decode_resource


def test_examples_are_valid_fhir() -> None:
    doc = consent(
        provision(
            "deny",
            period=("2024-01-01", None),
            provisions=[
                provision(
                    "permit",
                    actor=["Organization/gp"],
                    action=["access"],
                    purpose=["TREAT"],
                    cls=["Observation"],
                    code=[("http://loinc.org", "2345-7")],
                    label=["HIV"],
                    data=["Observation/o1"],
                )
            ],
        ),
        policy_rule="OPTOUT",
        identifier=("https://fhir.nhs.uk/Id/nhs-number", "9000000009"),
    )
    decode_resource(orjson.dumps(doc))
    c = parse_consent(doc, consent_id="x", version=3)
    assert (c.id, c.version, c.patient, c.patient_key) == ("x", 3, "p1", "Patient/p1")
    assert c.patient_identifier == "https://fhir.nhs.uk/Id/nhs-number|9000000009"
    assert c.policy_rule == "OPTOUT"
    nested = c.provision.provisions[0]
    assert nested.specificity == (7, 1)
    assert nested.named_labels == frozenset({"HIV"})
    assert nested.codes == frozenset({"http://loinc.org|2345-7"})
    assert [p.path for p in c.provisions] == ["provision", "provision.provision[0]"]


def _broken(**changes: Any) -> dict[str, Any]:
    doc = consent()
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


INVALID = [
    ("no scope", _broken(scope=None), "scope"),
    ("research scope", _broken(scope={"coding": [{"code": "research"}]}), "scope"),
    ("no patient", _broken(patient=None), "patient"),
    ("patient is not a Patient", _broken(patient={"reference": "Group/1"}), "patient.reference"),
    (
        "identifier without a system",
        _broken(patient={"identifier": {"value": "1"}}),
        "patient.identifier",
    ),
    ("no provision", _broken(provision=None), "provision"),
    ("provision without a type", _broken(provision={"actor": []}), "provision.type"),
    (
        "nested provision with a bad type",
        _broken(provision={"type": "deny", "provision": [{"type": "maybe"}]}),
        "provision.provision[0].type",
    ),
    (
        "dataPeriod",
        _broken(provision={"type": "deny", "dataPeriod": {"start": "2020"}}),
        "provision.dataPeriod",
    ),
    (
        "data meaning related",
        _broken(
            provision={
                "type": "deny",
                "data": [{"meaning": "related", "reference": {"reference": "Observation/1"}}],
            }
        ),
        "provision.data[0].meaning",
    ),
    (
        "class that is not a resource type",
        _broken(
            provision={
                "type": "deny",
                "class": [{"system": "urn:ietf:bcp:13", "code": "application/pdf"}],
            }
        ),
        "provision.class[0].system",
    ),
    (
        "period ending before it starts",
        _broken(provision={"type": "deny", "period": {"start": "2025-01-01", "end": "2024-01-01"}}),
        "provision.period",
    ),
    (
        "actor reference not literal",
        _broken(
            provision={
                "type": "deny",
                "actor": [
                    {
                        "role": {"coding": [{"code": "PRCP"}]},
                        "reference": {"reference": "#contained"},
                    }
                ],
            }
        ),
        "provision.actor[0].reference.reference",
    ),
    (
        "action as text only",
        _broken(provision={"type": "deny", "action": [{"text": "read"}]}),
        "provision.action[0]",
    ),
]


@pytest.mark.parametrize(
    ("doc", "where"), [(d, w) for _, d, w in INVALID], ids=[n for n, _, _ in INVALID]
)
def test_consents_hdx_cannot_evaluate_are_refused(doc: dict[str, Any], where: str) -> None:
    with pytest.raises(ConsentInvalid) as info:
        parse_consent(doc)
    assert where in [p.expression for p in info.value.problems], info.value.problems


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConsentInvalid) as info:
        parse_consent(_broken(scope=None, patient=None, provision=None))
    assert {p.expression for p in info.value.problems} >= {"scope", "patient", "provision"}


@pytest.mark.parametrize(
    ("value", "start", "end"),
    [
        ("2025", "2025-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"),
        ("2025-12", "2025-12-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"),
        ("2025-02-28", "2025-02-28T00:00:00+00:00", "2025-03-01T00:00:00+00:00"),
        (
            "2025-02-28T10:00:00+02:00",
            "2025-02-28T08:00:00+00:00",
            "2025-02-28T08:00:00.000001+00:00",
        ),
    ],
)
def test_fhir_intervals(value: str, start: str, end: str) -> None:
    assert tuple(t.isoformat() for t in fhir_interval(value)) == (start, end)


def test_datetime_without_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        fhir_interval("2025-01-01T10:00:00")


@pytest.mark.parametrize(
    ("ref", "norm"),
    [
        ("Organization/1", "Organization/1"),
        ("https://x.example/fhir/Organization/1", "Organization/1"),
        ("Organization/1/_history/4", "Organization/1"),
    ],
)
def test_normalize_reference(ref: str, norm: str) -> None:
    assert normalize_reference(ref) == norm


def test_index_keeps_the_latest_version_only() -> None:
    index = ConsentIndex()
    v1 = parse_consent(consent(patient="Patient/p1"), consent_id="c", version=1)
    v2 = parse_consent(consent(patient="Patient/p2"), consent_id="c", version=2)
    assert index.put(v2)
    assert not index.put(v1)  # an old version arriving late changes nothing
    assert not index.put(v2)  # nor does the same version again
    assert index.for_person("p1") == []
    assert index.for_person("p2") == [v2]
    v3 = parse_consent(consent(patient="Patient/p1"), consent_id="c", version=3)
    assert index.put(v3)
    assert index.for_person("p2") == []  # moved: unfiled from the old patient
    assert index.for_person("Patient/p1") == [v3]
    assert len(index) == 1 and index.get("c") is v3


def test_index_finds_each_consent_once() -> None:
    index = ConsentIndex()
    both = parse_consent(
        consent(patient="Patient/p1", identifier=("s", "1")), consent_id="b", version=1
    )
    index.replace_all([both])
    assert index.for_person("p1", ("s|1",)) == [both]


def test_in_force_uses_the_root_period() -> None:
    c = parse_consent(consent(provision("deny", period=("2025-01-01", "2025-01-31"))))
    assert c.in_force(datetime(2025, 1, 31, 23, 59, tzinfo=UTC))
    assert not c.in_force(datetime(2025, 2, 1, tzinfo=UTC))
