"""NHS number check digits and trusted identifier systems."""

from __future__ import annotations

import pytest

from hdx_patient_index.domain.demographics import extract_identifiers
from hdx_patient_index.domain.identifiers import (
    NHS_NUMBER,
    PERSON_SYSTEM,
    Identifier,
    TrustedSystems,
    nhs_number_valid,
)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("9434765919", True),  # the NHS Digital example number
        ("9434765870", True),
        ("4010232137", True),
        ("9434765918", False),  # wrong check digit
        ("9434765911", False),
        ("1234567890", False),  # check digit would be 10: never issued
        ("943476591", False),  # nine digits
        ("94347659190", False),  # eleven digits
        ("943476591X", False),
        ("", False),
        ("1111111111", False),  # passes the arithmetic, but a placeholder
        ("0000000000", False),
    ],
)
def test_nhs_number_check_digit(value: str, valid: bool) -> None:
    assert nhs_number_valid(value) is valid


def test_trusted_values_are_normalised_then_checked() -> None:
    trusted = TrustedSystems()
    assert trusted.normalise(NHS_NUMBER, "943 476 5919") == "9434765919"
    assert trusted.normalise(NHS_NUMBER, "943-476-5919") == "9434765919"
    assert trusted.valid(Identifier(NHS_NUMBER, "9434765919"))
    assert not trusted.valid(Identifier(NHS_NUMBER, "9434765918"))
    assert not trusted.valid(Identifier("urn:other", "9434765919"))  # not a trusted system


def test_other_trusted_systems_need_only_a_value() -> None:
    trusted = TrustedSystems.of([NHS_NUMBER, "urn:oid:2.16.840.1.113883.4.1"])
    assert trusted.valid(Identifier("urn:oid:2.16.840.1.113883.4.1", "123-45-6789"))
    assert TrustedSystems.of(["  ", "urn:x", "urn:x"]).systems == ("urn:x",)


def test_extraction_splits_trusted_from_plain_and_drops_the_person_id() -> None:
    patient = {
        "resourceType": "Patient",
        "identifier": [
            {"system": NHS_NUMBER, "value": "943 476 5919"},
            {"system": NHS_NUMBER, "value": "9434765918"},  # bad check digit → plain
            {"system": "https://st-marys.example.org/mrn", "value": " 123 "},
            {"system": PERSON_SYSTEM, "value": "some-person"},
            {"system": "urn:x"},  # no value
        ],
    }
    good, other = extract_identifiers(patient, TrustedSystems())
    assert good == (Identifier(NHS_NUMBER, "9434765919"),)
    assert other == (
        Identifier(NHS_NUMBER, "9434765918"),
        Identifier("https://st-marys.example.org/mrn", "123"),
    )


def test_identifier_tokens() -> None:
    assert Identifier.parse_token("urn:a|1") == Identifier("urn:a", "1")
    assert Identifier.parse_token("|1") == Identifier("", "1")
    assert Identifier.parse_token("1") == Identifier("", "1")
    assert Identifier(NHS_NUMBER, "9434765919").token == f"{NHS_NUMBER}|9434765919"
