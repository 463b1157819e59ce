from __future__ import annotations

import orjson
import pytest

from hdx_shared.fhir import FhirError, Limits, Reference, decode_resource, parse_json

OBS = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "subject": {"reference": "Patient/p1"},
}


def test_a_valid_resource_decodes() -> None:
    assert decode_resource(orjson.dumps(OBS))["id"] == "o1"


@pytest.mark.parametrize(
    ("raw", "reason", "says"),
    [
        (b"{nope", "invalid-json", "not valid JSON"),
        (b"[1, 2]", "invalid-json", "JSON object"),
        (b'{"resourceType": "Patient", "id": "a", "id": "b"}', "invalid-json", "duplicate"),
        (b'{"resourceType": "Patient", "gender": null}', "invalid-json", "null"),
        (b'{"resourceType": "Patient", "name": []}', "invalid-json", "empty"),
        (b'{"resourceType": "Patient", "id": ""}', "invalid-json", "empty"),
        (b'{"resourceType": "Patient", "gender": "UN"}', "invalid-resource", "gender"),
        (b'{"resourceType": "Spaceship"}', "unknown-resource-type", "Spaceship"),
        (b'{"id": "x"}', "not-fhir", "resourceType"),
        (b'{"resourceType": "Observation", "status": "final"}', "invalid-resource", "code"),
        (b'{"resourceType": "Bundle", "type": "nonsense"}', "invalid-resource", "Bundle.type"),
        # fhir.resources alone coerces these; FHIR JSON does not allow them.
        (b'{"resourceType": "Patient", "active": "true"}', "invalid-resource", "JSON boolean"),
        (
            b'{"resourceType": "Patient", "multipleBirthInteger": "2"}',
            "invalid-resource",
            "JSON integer",
        ),
        (b'{"resourceType": "Patient", "name": {"family": "X"}}', "invalid-resource", "array"),
        (
            b'{"resourceType": "Bundle", "type": "collection", "entry": '
            b'[{"resource": {"id": "x"}}]}',
            "invalid-resource",
            "resourceType is missing",
        ),
        (
            b'{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": '
            b'{"resourceType": "Nope"}}]}',
            "invalid-resource",
            "Nope",
        ),
    ],
)
def test_invalid_input_gets_an_outcome_that_names_the_problem(
    raw: bytes, reason: str, says: str
) -> None:
    with pytest.raises(FhirError) as info:
        decode_resource(raw)
    assert info.value.reason == reason
    outcome = info.value.outcome()
    assert outcome["resourceType"] == "OperationOutcome"
    assert says in orjson.dumps(outcome).decode()


def test_bundle_entries_are_validated_with_their_path() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": OBS, "request": {"method": "PUT", "url": "Observation/o1"}},
            {
                "resource": {"resourceType": "Observation", "status": "final"},
                "request": {"method": "YEET", "url": "Observation"},
            },
        ],
    }
    with pytest.raises(FhirError) as info:
        decode_resource(orjson.dumps(bundle))
    text = orjson.dumps(info.value.outcome()).decode()
    assert "entry[1].request.method" in text
    assert "entry[1].resource.code" in text


def test_limits_are_enforced_before_parsing() -> None:
    with pytest.raises(FhirError) as info:
        parse_json(b" " * 2048, Limits(max_bytes=1024))
    assert info.value.reason == "too-large" and info.value.http_status == 413
    deep = b'{"resourceType": "Basic", "a": ' * 40 + b"1" + b"}" * 40
    with pytest.raises(FhirError) as info:
        parse_json(deep, Limits(max_depth=32))
    assert info.value.reason == "too-deep"


def test_references_parse() -> None:
    ref = Reference.parse("Patient/123")
    assert ref is not None and (ref.resource_type, ref.id) == ("Patient", "123")
    assert Reference.parse("#contained") is None
