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


# Compact JSON as orjson writes it takes parse_json's fast path (orjson, then checked);
# anything the strict parser would refuse must still be refused, with the same outcome.
@pytest.mark.parametrize(
    ("raw", "reason", "says"),
    [
        (
            b'{"resourceType":"Patient","id":"a","id":"b"}',
            "invalid-json",
            "duplicate JSON key 'id'",
        ),
        (
            b'{"resourceType":"Patient","id":"a","id":"a"}',
            "invalid-json",
            "duplicate JSON key 'id'",
        ),
        (
            b'{"resourceType":"Patient","name":[{"family":"X","family":"Y"}]}',
            "invalid-json",
            "duplicate JSON key 'family'",
        ),
        (b'{"resourceType":"Patient","gender":null}', "invalid-json", "'gender' is null"),
        (b'{"resourceType":"Patient","name":[]}', "invalid-json", "'name' is empty"),
        (b'{"resourceType":"Patient","id":""}', "invalid-json", "'id' is empty"),
        (b'{"resourceType":"Patient","name":[{}]}', "invalid-json", "empty JSON object"),
        (b'{"resourceType":"Patient","name":[null]}', "invalid-json", "null or empty"),
        (
            b'{"resourceType":"Patient","name":[{"given":["A",""]}]}',
            "invalid-json",
            "null or empty",
        ),
        (b'{"resourceType":"Patient","meta":{"tag":[{"code":null}]}}', "invalid-json", "null"),
        (b"{}", "invalid-json", "empty JSON object"),
        (b'["Patient"]', "invalid-json", "JSON object"),
        (b'{"resourceType":"Observation","valueQuantity":{"value":NaN}}', "invalid", ""),
    ],
)
def test_compact_input_is_refused_as_the_strict_parser_refuses_it(
    raw: bytes, reason: str, says: str
) -> None:
    with pytest.raises(FhirError) as info:
        decode_resource(raw)
    assert info.value.reason.startswith(reason)
    assert says in orjson.dumps(info.value.outcome()).decode()


def test_compact_and_spaced_json_parse_alike() -> None:
    spaced = orjson.dumps(OBS, option=orjson.OPT_INDENT_2)
    assert parse_json(orjson.dumps(OBS)) == parse_json(spaced) == OBS
    escaped = b'{"resourceType":"Patient","id":"p1","name":[{"family":"Br\\u00f6nte"}]}'
    assert parse_json(escaped)["name"][0]["family"] == "Br\u00f6nte"
    big = b'{"resourceType":"Basic","id":"b","n":123456789012345678901234567890}'
    assert parse_json(big)["n"] == 123456789012345678901234567890


def test_the_depth_limit_holds_for_compact_input() -> None:
    deep = b'{"resourceType":"Basic","a":' * 40 + b"1" + b"}" * 40
    with pytest.raises(FhirError) as info:
        parse_json(deep, Limits(max_depth=32))
    assert info.value.reason == "too-deep"
    assert parse_json(deep, Limits(max_depth=41))["resourceType"] == "Basic"
