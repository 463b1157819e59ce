"""Field comparators: each returns the strongest agreement level that applies."""

from __future__ import annotations

from typing import Any

import pytest
from pix_builders import demo

from hdx_patient_index.domain.comparators import (
    Field,
    Level,
    compare,
    compare_birth_date,
    compare_family,
    compare_gender,
    compare_given,
    compare_identifiers,
    compare_phone,
    compare_postcode,
)
from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.weights import DEFAULT_WEIGHTS, PRIOR_PROBABILITIES


@pytest.mark.parametrize(
    ("a", "b", "level"),
    [
        ("Lovelace", "Lovelace", Level.EXACT),
        ("LOVELACE", "lovelace", Level.EXACT),
        ("De La Cruz", "Delacruz", Level.EXACT),
        ("Müller", "Muller", Level.EXACT),
        ("Lovelace", "Lovelase", Level.FUZZY_HIGH),
        ("Smith", "Smyth", Level.PHONETIC),
        ("Smith-Jones", "Jones", Level.PARTIAL),
        ("Thompson", "Tomson", Level.FUZZY_LOW),
        ("Lovelace", "Hopper", Level.DISAGREE),
        ("Lovelace", None, Level.MISSING),
    ],
)
def test_family(a: str, b: str | None, level: Level) -> None:
    assert compare_family(demo(family=a), demo(family=b)) is level


def test_family_partial_on_a_maiden_name() -> None:
    married = Demographics(family="king", other_families=("byron",))
    assert compare_family(married, Demographics(family="byron")) is Level.PARTIAL


@pytest.mark.parametrize(
    ("a", "b", "level"),
    [
        ("Ada", "ada", Level.EXACT),
        ("Bill", "William", Level.NICKNAME),
        ("Liz", "Elizabeth", Level.NICKNAME),
        ("Jonathon", "Jonathan", Level.FUZZY_HIGH),
        ("Stephen", "Steven", Level.PHONETIC),
        ("Katharine", "Kathryn", Level.PHONETIC),
        ("A", "Ada", Level.INITIAL),
        (["Mary", "Ada"], ["Ada"], Level.PARTIAL),  # the middle name used as the first
        ("Ada", "Grace", Level.DISAGREE),
        (None, "Ada", Level.MISSING),
    ],
)
def test_given(a: Any, b: Any, level: Level) -> None:
    assert compare_given(demo(given=a), demo(given=b)) is level


@pytest.mark.parametrize(
    ("a", "b", "level"),
    [
        ("1980-03-04", "1980-03-04", Level.EXACT),
        ("1980-03-04", "1980-04-03", Level.DAY_MONTH_SWAPPED),
        ("1980-03-04", "1980-03-05", Level.ONE_DIGIT),
        ("1980-03-04", "1908-03-04", Level.ONE_DIGIT),  # adjacent digits swapped
        ("1980-03-04", "1980-11-20", Level.SAME_YEAR),
        ("1980", "1980-11-20", Level.SAME_YEAR),  # partial date: year only
        ("1980", "1981-11-20", Level.DISAGREE),
        ("1980-03-04", "1975-07-21", Level.DISAGREE),
        ("1980-03-04", None, Level.MISSING),
    ],
)
def test_birth_date(a: str, b: str | None, level: Level) -> None:
    assert compare_birth_date(demo(birth_date=a), demo(birth_date=b)) is level


@pytest.mark.parametrize(
    ("fn", "a", "b", "level"),
    [
        (compare_gender, {"gender": "female"}, {"gender": "female"}, Level.EXACT),
        (compare_gender, {"gender": "female"}, {"gender": "male"}, Level.DISAGREE),
        (compare_gender, {"gender": "female"}, {"gender": "unknown"}, Level.MISSING),
        (compare_postcode, {"postcode": "SW1A 1AA"}, {"postcode": "sw1a1aa"}, Level.EXACT),
        (compare_postcode, {"postcode": "SW1A 1AA"}, {"postcode": "SW1A 2BB"}, Level.DISTRICT),
        (compare_postcode, {"postcode": "SW1A 1AA"}, {"postcode": "M1 1AE"}, Level.DISAGREE),
        (compare_postcode, {"postcode": "SW1A 1AA"}, {}, Level.MISSING),
        (compare_phone, {"phone": "+44 20 7946 0958"}, {"phone": "020 7946 0958"}, Level.EXACT),
        (compare_phone, {"phone": "020 7946 0958"}, {"phone": "020 7946 0000"}, Level.DISAGREE),
        (
            compare_identifiers,
            {"identifiers": [{"system": "urn:mrn", "value": "1"}]},
            {"identifiers": [{"system": "urn:mrn", "value": "1"}]},
            Level.EXACT,
        ),
        (
            compare_identifiers,
            {"identifiers": [{"system": "urn:mrn", "value": "1"}]},
            {"identifiers": [{"system": "urn:mrn", "value": "2"}]},
            Level.DISAGREE,
        ),
        (
            compare_identifiers,
            {"identifiers": [{"system": "urn:mrn", "value": "1"}]},
            {"identifiers": [{"system": "urn:other", "value": "2"}]},
            Level.MISSING,  # different systems say nothing about each other
        ),
    ],
)
def test_other_fields(fn: Any, a: dict[str, Any], b: dict[str, Any], level: Level) -> None:
    assert fn(demo(**a), demo(**b)) is level


def test_swapped_family_and_given_names() -> None:
    levels = compare(demo(family="Lovelace", given="Ada"), demo(family="Ada", given="Lovelace"))
    assert levels[Field.FAMILY] is Level.TRANSPOSED and levels[Field.GIVEN] is Level.TRANSPOSED


def test_priors_are_probability_distributions_and_weights_ordered() -> None:
    for field, levels in PRIOR_PROBABILITIES.items():
        assert sum(m for m, _ in levels.values()) == pytest.approx(1.0, abs=0.01), field
        assert sum(u for _, u in levels.values()) == pytest.approx(1.0, abs=0.01), field
        assert (
            DEFAULT_WEIGHTS.weight(field, Level.EXACT)
            > 0
            > DEFAULT_WEIGHTS.weight(field, Level.DISAGREE)
        )
        assert DEFAULT_WEIGHTS.weight(field, Level.MISSING) == 0
