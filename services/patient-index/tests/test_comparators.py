"""Field comparators: each returns the strongest agreement level that applies."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pix_builders import NHS_A, NHS_B, demo

from hdx_patient_index.domain.comparators import (
    Field,
    Level,
    compare,
    compare_address,
    compare_birth_date,
    compare_family,
    compare_gender,
    compare_given,
    compare_identifiers,
    compare_lines,
    compare_middle,
    compare_phone,
    compare_postcode,
    one_edit,
)
from hdx_patient_index.domain.demographics import Demographics, extract_demographics
from hdx_patient_index.domain.identifiers import NHS_NUMBER, Identifier, TrustedSystems
from hdx_patient_index.domain.weights import (
    DEFAULT_WEIGHTS,
    PRIOR_PROBABILITIES,
    MatchWeights,
    TermFrequencies,
)


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
        ("Finlay", "Finlhy", Level.FUZZY_HIGH),  # one typo: Jaro–Winkler 0.93
        ("Aaron", "Baron", Level.FUZZY_HIGH),  # five letters, the first wrong: 0.87
        ("Tom", "Tim", Level.PHONETIC),  # shorter names one letter apart: not a typo level
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
        (["Ada", "Mary"], ["Ada", "Mary"], Level.EXACT),
        (["Ada", "Mary", "Jane"], ["Ada", "Jane"], Level.EXACT),  # one of them shared
        (["Ada", "Mary"], ["Ada", "M"], Level.INITIAL),
        (["Ada", "Mary"], ["Ada", "Marry"], Level.FUZZY_HIGH),
        (["Ada", "Mary"], ["Ada", "Florence"], Level.DISAGREE),
        (["Ada", "Mary"], ["Ada"], Level.ONE_SIDED),  # a middle name on one side only
        (["Mary", "Ada"], ["Ada"], Level.MISSING),  # the middle name used as the first
        (["Ada", "Mary", "Jane"], ["Jane", "Mary"], Level.EXACT),  # reordered, one shared
        (["Ada", "Mary"], [], Level.MISSING),  # no given name at all on one side
        (["Ada", "Mary"], ["Mary", "Ada"], Level.MISSING),  # reordered: the given's business
        ("Ada", "Ada", Level.MISSING),
    ],
)
def test_middle(a: Any, b: Any, level: Level) -> None:
    assert compare_middle(demo(given=a), demo(given=b)) is level
    assert compare_middle(demo(given=b), demo(given=a)) is level


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


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("19800304", "19800305", True),  # one digit
        ("19800304", "19080304", True),  # adjacent digits swapped
        ("19800304", "19800304", False),  # equal is not an error
        ("19800304", "19810305", False),  # two digits
        ("19800304", "19800430", False),  # two swaps
        ("4305", "4350", True),
        ("1234567", "123456", False),  # lengths differ: not a keying error we look for
    ],
)
def test_one_edit(a: str, b: str, same: bool) -> None:
    assert one_edit(a, b) is same


@pytest.mark.parametrize(
    ("a", "b", "level"),
    [
        # Date transpositions and typos.
        ("1980-03-04", "1980-04-03", Level.DAY_MONTH_SWAPPED),
        ("1980-12-01", "1980-01-12", Level.DAY_MONTH_SWAPPED),
        ("1980-03-04", "1980-03-40", Level.SAME_YEAR),  # an invalid date keeps its year
        ("1980-03-14", "1980-13-14", Level.SAME_YEAR),
        ("1980-03-14", "1890-03-14", Level.ONE_DIGIT),  # 98 → 89
        ("1980-03-14", "1908-03-14", Level.ONE_DIGIT),  # 80 → 08
        ("1980-03-14", "1970-04-14", Level.DISAGREE),  # two digits, two fields
        ("2001-05-05", "2001-05-05", Level.EXACT),
    ],
)
def test_birth_date_transpositions(a: str, b: str, level: Level) -> None:
    assert compare_birth_date(demo(birth_date=a), demo(birth_date=b)) is level


def _home(line: str | None, postcode: str | None) -> Demographics:
    return Demographics(
        addresses=(line,) if line else (), postcodes=(postcode,) if postcode else ()
    )


@pytest.mark.parametrize(
    ("a", "b", "level"),
    [
        (("12 station rd", "LS14AB"), ("12 station rd", "LS14AB"), Level.EXACT),
        (("12 station rd", "LS14AB"), ("12 stationrd", None), Level.EXACT),
        (("12 station rd", "LS14AB"), ("12 staton rd", "LS14AB"), Level.EXACT),  # fuzzy street
        (("12 station rd", "LS14AB"), ("12 station rd", "LS14BA"), Level.EXACT),  # pc typo
        (("12 station rd", "LS14AB"), ("12 station rd", "M11AE"), Level.SAME_LINE),
        (("12 station rd", "LS14AB"), ("14 station rd", "LS14AB"), Level.PARTIAL),
        # Another number on a street spelt a little differently (Jaro–Winkler ≥ JW_LOW, as
        # for the same number): a typo in each, or a neighbour.
        (("5 werriwa ur escent", "4205"), ("25 werriwa coescent", "4205"), Level.PARTIAL),
        (("12 station rd", "LS14AB"), ("3 mill ln", "LS14AB"), Level.SAME_POSTCODE),
        # A space typed into a word ('bat h' for 'bath'): the street without its spaces.
        (("23 bath pl", "5118"), ("23 bat h pace", "5118"), Level.EXACT),
        # Two streets, no word split: 'kingsway' is not 'king st' mistyped.
        (("12 king st", "LS14AB"), ("12 kingsway", "LS14AB"), Level.SAME_POSTCODE),
        (("12 station rd", "4305"), ("3 mill ln", "4350"), Level.ONE_DIGIT),
        (("12 station rd", "LS14AB"), ("3 mill ln", "LS19ZZ"), Level.DISTRICT),
        (("12 station rd", "LS14AB"), ("3 mill ln", "M11AE"), Level.DISAGREE),
        ((None, "LS14AB"), (None, "LS14AB"), Level.SAME_POSTCODE),
        (("12 station rd", None), (None, "LS14AB"), Level.MISSING),
        ((None, None), ("12 station rd", "LS14AB"), Level.MISSING),
    ],
)
def test_address_line_and_postcode_are_one_comparison(
    a: tuple[str | None, str | None], b: tuple[str | None, str | None], level: Level
) -> None:
    assert compare_address(_home(*a), _home(*b)) is level
    assert compare_address(_home(*b), _home(*a)) is level


def test_compare_emits_the_address_once_not_the_postcode_on_its_own() -> None:
    levels = compare(_home("12 station rd", "LS14AB"), _home("12 station rd", "LS14AB"))
    assert levels[Field.ADDRESS] is Level.EXACT and Field.POSTCODE not in levels


@pytest.mark.parametrize(
    ("a", "b", "level"),
    [
        ([("urn:mrn", "12345678")], [("urn:mrn", "12345678")], Level.EXACT),
        ([("urn:mrn", "12345678")], [("urn:mrn", "12345687")], Level.ONE_DIGIT),
        ([("urn:mrn", "12")], [("urn:mrn", "13")], Level.DISAGREE),  # too short to tell
        ([("urn:mrn", "12345678")], [("urn:other", "12345678")], Level.MISSING),
        ([("urn:mrn", "12345678"), ("urn:b", "1")], [("urn:b", "1")], Level.EXACT),
    ],
)
def test_untrusted_identifiers(
    a: list[tuple[str, str]], b: list[tuple[str, str]], level: Level
) -> None:
    def ids(pairs: list[tuple[str, str]]) -> Demographics:
        return Demographics(identifiers=tuple(Identifier(s, v) for s, v in pairs))

    assert compare_identifiers(ids(a), ids(b)) is level


def test_an_nhs_number_keyed_wrong_is_one_digit_from_the_trusted_one() -> None:
    trusted = Demographics(trusted=(Identifier(NHS_NUMBER, NHS_A),))
    typed = Demographics(identifiers=(Identifier(NHS_NUMBER, NHS_A[:-2] + NHS_A[-1] + NHS_A[-2]),))
    assert compare_identifiers(trusted, typed) is Level.ONE_DIGIT
    assert compare_identifiers(typed, trusted) is Level.ONE_DIGIT
    # Two trusted values are never compared here: the trusted-identifier path decides.
    other = Demographics(trusted=(Identifier(NHS_NUMBER, NHS_B),))
    assert compare_identifiers(trusted, other) is Level.MISSING


@pytest.mark.parametrize(
    ("family", "shares", "expected"),
    [
        ("smith", {"smith": 0.02}, math.log2(0.9 / 0.02)),  # common: less evidence
        ("lovelace", {"smith": 0.02}, math.log2(0.9 / 0.0001)),  # unseen: the floor
        ("rare", {"rare": 0.00001}, math.log2(0.9 / 0.0001)),  # never below the floor
    ],
)
def test_term_frequencies_weigh_common_names_less(
    family: str, shares: dict[str, float], expected: float
) -> None:
    tf = TermFrequencies(0.9, shares, 0.0001)
    weights = MatchWeights.from_probabilities(PRIOR_PROBABILITIES, {Field.FAMILY: tf})
    d = Demographics(family=family)
    levels = {Field.FAMILY: Level.EXACT, Field.GIVEN: Level.DISAGREE}
    base = DEFAULT_WEIGHTS.total(levels)
    shift = expected - DEFAULT_WEIGHTS.weight(Field.FAMILY, Level.EXACT)
    assert weights.score(d, levels) == pytest.approx(base + shift)
    # Other levels are not term-frequency adjusted.
    fuzzy = {Field.FAMILY: Level.FUZZY_HIGH}
    assert weights.score(d, fuzzy) == pytest.approx(DEFAULT_WEIGHTS.total(fuzzy))


def test_weights_precomputed_table_agrees_with_weight() -> None:
    for f in PRIOR_PROBABILITIES:
        for level in Level:
            assert DEFAULT_WEIGHTS.total({f: level}) == DEFAULT_WEIGHTS.weight(f, level)
    assert DEFAULT_WEIGHTS.total({Field.POSTCODE: Level.EXACT}) == 0.0  # not in the table


@pytest.mark.parametrize(
    ("a", "b", "transposed"),
    [
        (("lovelace", ["ada"]), ("ada", ["lovelace"]), True),
        (("ryan", ["chloe"]), ("chloe", ["ryna"]), True),  # swapped, and a typo
        (("sporn", ["abby"]), ("abyb", ["sporn"]), True),
        (("graham jones", ["amelia"]), ("amelua", ["graham", "jones"]), True),
        (("lovelace", ["ada"]), ("hopper", ["grace"]), False),
        (("lovelace", ["ada"]), ("ada", ["hopper"]), False),  # only one name crosses
    ],
)
def test_swapped_names_with_typos(
    a: tuple[str, list[str]], b: tuple[str, list[str]], transposed: bool
) -> None:
    levels = compare(demo(family=a[0], given=a[1]), demo(family=b[0], given=b[1]))
    got = levels[Field.FAMILY] is Level.TRANSPOSED and levels[Field.GIVEN] is Level.TRANSPOSED
    assert got is transposed


def _lines(postcode: str, *lines: str) -> Demographics:
    patient = {
        "resourceType": "Patient",
        "address": [{"use": "home", "line": list(lines), "postalCode": postcode}],
    }
    return extract_demographics(patient, TrustedSystems())


def test_the_same_address_lines_in_another_order_are_the_same_address() -> None:
    home = _lines("2870", "23 Woollum Street", "Allunga")
    swapped = _lines("2870", "23 Allunga", "Woollum Street")
    assert compare_address(home, swapped) is Level.EXACT
    assert compare_address(swapped, home) is Level.EXACT
    assert compare_address(home, _lines("4000", "Allunga", "23 Woollum St")) is Level.SAME_LINE
    # Two homes that share a line (a locality, an estate, a building) are not one home.
    elsewhere = _lines("2870", "5 Kyeema Street", "Allunga")
    assert compare_address(home, elsewhere) is Level.SAME_POSTCODE
    # Flat 2 at number 10 and flat 10 at number 2: the same words, the numbers swapped.
    flat = _lines("LS14AB", "2 Rose Court", "10 High Street")
    other = _lines("LS14AB", "10 Rose Court", "2 High Street")
    assert compare_address(flat, other) is Level.PARTIAL  # as their first lines say


def test_the_best_of_several_address_lines_counts() -> None:
    one = Demographics(addresses=("12 station rd",))
    two = Demographics(addresses=("5 low rd", "12 station rd"))
    street = Demographics(addresses=("7 low rd",))
    assert compare_lines(one, two) is compare_lines(two, one) is Level.EXACT
    assert compare_lines(two, street) is compare_lines(street, two) is Level.PARTIAL
    assert compare_lines(one, street) is Level.DISAGREE
    assert compare_lines(one, Demographics(addresses=("12 statoin rd",))) is Level.FUZZY_HIGH
    assert compare_lines(one, Demographics()) is Level.MISSING


def test_family_names_of_several_words_share_a_word() -> None:
    assert compare_family(demo(family="Van Dyke"), demo(family="Dyke")) is Level.PARTIAL
    assert compare_family(demo(family="Van Dyke"), demo(family="Hopper")) is Level.DISAGREE
