"""Normalisation: case, diacritics, punctuation, nicknames, postcodes, phone numbers."""

from __future__ import annotations

import pytest

from hdx_patient_index.domain.normalise import (
    compact,
    given_name_forms,
    name_tokens,
    normalise_address_line,
    normalise_name,
    normalise_phone,
    normalise_postcode,
    postcode_district,
    split_house_number,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Ada", "ada"),
        ("  LOVELACE ", "lovelace"),
        ("Zoë", "zoe"),
        ("Ångström", "angstrom"),
        ("Müller", "muller"),
        ("Straße", "strasse"),
        ("Søren", "soren"),
        ("Łukasz", "lukasz"),
        ("O'Brien", "obrien"),
        ("O’Brien", "obrien"),
        ("St. John", "st john"),
        ("Smith-Jones", "smith jones"),
        ("de la  Cruz", "de la cruz"),
        ("José María", "jose maria"),
        ("---", None),
        (None, None),
    ],
)
def test_normalise_name(raw: str | None, expected: str | None) -> None:
    assert normalise_name(raw) == expected


def test_compact_joins_words() -> None:
    assert compact("de la cruz") == "delacruz"
    assert name_tokens("Mary-Ann") == ("mary", "ann")


@pytest.mark.parametrize(
    ("a", "b", "agree"),
    [
        ("bill", "william", True),
        ("william", "bill", True),
        ("liz", "elizabeth", True),
        ("beth", "liz", True),  # both short for elizabeth
        ("alex", "alexandra", True),
        ("alex", "alexander", True),
        ("peggy", "margaret", True),
        ("jack", "john", True),
        ("bob", "william", False),
        ("ada", "ada", True),
        ("ada", "adam", False),
    ],
)
def test_nickname_forms(a: str, b: str, agree: bool) -> None:
    assert bool(given_name_forms(a) & given_name_forms(b)) is agree


@pytest.mark.parametrize(
    ("raw", "postcode", "district"),
    [
        ("SW1A 1AA", "SW1A1AA", "SW1A"),
        ("sw1a1aa", "SW1A1AA", "SW1A"),
        (" m1 1ae ", "M11AE", "M1"),
        ("EC1A-1BB", "EC1A1BB", "EC1A"),
        ("10115", "10115", None),  # not a UK postcode: no district
        ("", None, None),
    ],
)
def test_postcodes(raw: str, postcode: str | None, district: str | None) -> None:
    assert normalise_postcode(raw) == postcode
    assert (postcode_district(postcode) if postcode else None) == district


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("020 7946 0958", "2079460958"),
        ("+44 20 7946 0958", "2079460958"),
        ("0044 (0)20 7946 0958", "2079460958"),
        ("07700 900123", "7700900123"),
        ("+44 7700 900123", "7700900123"),
        ("123", None),
        ("ext", None),
    ],
)
def test_phone_numbers(raw: str, expected: str | None) -> None:
    assert normalise_phone(raw) == expected


@pytest.mark.parametrize(
    ("a", "b", "agree"),
    [
        ("izzy", "isabella", True),
        ("jess", "jessica", True),
        ("lottie", "charlotte", True),
        ("theo", "theodore", True),
        ("millie", "amelia", True),
        ("tim", "timothy", True),
        ("sasha", "alexandra", True),
        ("sasha", "alex", True),  # both short for alexandra/alexander
        ("theo", "edward", False),
        ("jess", "jessie", False),  # not in the table: left to the fuzzy comparators
    ],
)
def test_nickname_table_additions(a: str, b: str, agree: bool) -> None:
    assert bool(given_name_forms(a) & given_name_forms(b)) is agree


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("12 Station Road", "12 station rd"),
        ("12 STATION RD.", "12 station rd"),
        ("Flat 3, 7 Crescent Avenue", "flat 3 7 cres ave"),
        ("1a Church-Lane", "1a church ln"),
        ("  ", None),
        (None, None),
    ],
)
def test_normalise_address_line(raw: str | None, expected: str | None) -> None:
    assert normalise_address_line(raw) == expected


@pytest.mark.parametrize(
    ("line", "number", "street"),
    [
        ("12 station rd", "12", "station rd"),
        ("12a station rd", "12a", "station rd"),
        ("station rd", "", "station rd"),
        ("4", "", "4"),
    ],
)
def test_split_house_number(line: str, number: str, street: str) -> None:
    assert split_house_number(line) == (number, street)
