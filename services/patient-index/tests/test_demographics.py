"""Extracting normalised demographics from FHIR Patients."""

from __future__ import annotations

from datetime import date

from pix_builders import NHS_A, demo

from hdx_patient_index.domain.demographics import Demographics, extract_demographics
from hdx_patient_index.domain.identifiers import NHS_NUMBER, Identifier, TrustedSystems


def test_extracts_the_current_name_and_keeps_previous_family_names() -> None:
    patient = {
        "resourceType": "Patient",
        "name": [
            {"use": "maiden", "family": "Byron", "given": ["Augusta", "Ada"]},
            {"use": "official", "family": "King-Noel", "given": ["Ada", "Augusta"]},
            {"use": "old", "family": "King", "period": {"end": "1835"}},
        ],
        "birthDate": "1815-12-10",
        "gender": "female",
        "address": [
            {"use": "old", "postalCode": "W1 1AA"},
            {"use": "home", "postalCode": "sw1a 1aa"},
        ],
        "telecom": [
            {"system": "email", "value": "ada@example.org"},
            {"system": "phone", "value": "+44 20 7946 0958"},
        ],
        "identifier": [{"system": NHS_NUMBER, "value": NHS_A}],
    }
    d = extract_demographics(patient, TrustedSystems())
    assert d.family == "king noel"
    assert d.given == ("ada", "augusta")
    assert d.other_families == ("byron", "king")
    assert d.birth_date == date(1815, 12, 10) and d.birth_year == 1815
    assert d.gender == "female"
    assert d.postcodes == ("SW1A1AA",)
    assert d.phones == ("2079460958",)
    assert d.trusted == (Identifier(NHS_NUMBER, NHS_A),)


def test_text_only_names_partial_dates_and_unknown_gender() -> None:
    d = extract_demographics(
        {
            "resourceType": "Patient",
            "name": [{"text": "Grace Brewster Hopper"}],
            "birthDate": "1906-12",
            "gender": "unknown",
        },
        TrustedSystems(),
    )
    assert d.family == "hopper" and d.given == ("grace", "brewster")
    assert d.birth_date is None and d.birth_year == 1906
    assert d.gender is None


def test_an_empty_patient_has_empty_demographics() -> None:
    assert extract_demographics({"resourceType": "Patient"}, TrustedSystems()) == Demographics()


def test_mobiles_are_the_phones_a_source_marked_mobile_and_round_trip() -> None:
    d = extract_demographics(
        {
            "resourceType": "Patient",
            "telecom": [
                {"system": "phone", "use": "home", "value": "0113 496 0000"},
                {"system": "phone", "use": "mobile", "value": "+44 7700 900123"},
                {"system": "sms", "use": "mobile", "value": "07700 900456"},
                {"system": "email", "use": "mobile", "value": "ada@example.org"},
            ],
        },
        TrustedSystems(),
    )
    assert d.phones == ("1134960000", "7700900123", "7700900456")
    assert d.mobiles == ("7700900123", "7700900456")
    assert Demographics.from_json(d.to_json()) == d
    # A snapshot written before mobiles were kept reads as none (a home phone, at worst).
    doc = d.to_json()
    del doc["mobiles"]
    assert Demographics.from_json(doc).mobiles == ()


def test_json_round_trip() -> None:
    d = demo(
        postcode="SW1A 1AA",
        phone="020 7946 0958",
        nhs=NHS_A,
        identifiers=[{"system": "urn:mrn", "value": "7"}],
    )
    assert Demographics.from_json(d.to_json()) == d
    partial = Demographics(family="x", birth_year=1970)
    assert Demographics.from_json(partial.to_json()) == partial


def test_current_address_lines_are_kept_normalised_and_round_trip() -> None:
    patient = {
        "resourceType": "Patient",
        "address": [
            {"use": "old", "line": ["1 Old Road"], "postalCode": "W1 1AA"},
            {"use": "home", "line": ["12 Station Road.", "Flat 3"], "postalCode": "LS1 4AB"},
            {"use": "work", "line": ["  "], "postalCode": "M1 1AE"},
        ],
    }
    d = extract_demographics(patient, TrustedSystems())
    assert d.addresses == ("12 station rd",)  # the first line; street types abbreviated
    assert d.postcodes == ("LS14AB", "M11AE")
    assert Demographics.from_json(d.to_json()) == d
    # Snapshots stored before addresses were extracted still load.
    assert Demographics.from_json({"family": "x"}).addresses == ()


def test_a_first_line_that_is_only_a_house_number_takes_the_next_line_as_its_street() -> None:
    def lines(*raw: str) -> tuple[str, ...]:
        patient = {"resourceType": "Patient", "address": [{"use": "home", "line": list(raw)}]}
        return extract_demographics(patient, TrustedSystems()).addresses

    assert lines("53", "Kyeema Street") == ("53 kyeema st",)
    assert lines("12a", "Station Road", "Leeds") == ("12a station rd",)
    assert lines("53") == ("53",)  # nothing to join
    assert lines("Flat 3", "12 Station Road") == ("flat 3",)  # a first line with words stays
    assert lines("12 Station Road", "Flat 3") == ("12 station rd",)


def test_an_address_of_two_lines_or_more_is_also_kept_as_its_words_in_no_order() -> None:
    def words(*raw: str) -> tuple[str, ...]:
        patient = {"resourceType": "Patient", "address": [{"use": "home", "line": list(raw)}]}
        return extract_demographics(patient, TrustedSystems()).address_words

    # The same lines in another order, the house number on whichever line came first.
    assert words("23 Woollum Street", "Allunga") == ("23|allunga st woollum",)
    assert words("23 Allunga", "Woollum St") == ("23|allunga st woollum",)
    assert words("Allunga", "23 Woollum Street") == ("23|allunga st woollum",)
    # The house numbers keep their order: flat 2 at number 10 is not flat 10 at number 2.
    assert words("2 Rose Court", "10 High Street") != words("10 Rose Court", "2 High Street")
    # One line: its first line is compared already.
    assert words("12 Station Road") == ()
    patient = {"resourceType": "Patient", "address": [{"line": ["23 Allunga", "Woollum St"]}]}
    d = extract_demographics(patient, TrustedSystems())
    assert Demographics.from_json(d.to_json()) == d
    # Snapshots stored before address words were extracted still load, with none.
    assert Demographics.from_json({"addresses": ["23 allunga"]}).address_words == ()
