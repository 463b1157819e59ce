"""Matching: trusted identifiers, Fellegi–Sunter thresholds, the in-memory index."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import date
from typing import Any

import pytest
from pix_builders import NHS_A, NHS_B, NHS_C, demo

from hdx_patient_index.domain.comparators import Field, Level, compare
from hdx_patient_index.domain.demographics import Demographics, extract_demographics
from hdx_patient_index.domain.identifiers import NHS_NUMBER, Identifier, TrustedSystems
from hdx_patient_index.domain.index import PersonIndex
from hdx_patient_index.domain.matching import (
    Basis,
    Grade,
    Hold,
    MatchConfig,
    Matcher,
    ReviewReason,
    Shape,
    anchor_shapes,
    hold,
    household_shapes,
    trusted_conflict,
)

ADA: dict[str, Any] = {
    "family": "Lovelace",
    "given": "Ada",
    "birth_date": "1815-12-10",
    "gender": "female",
    "postcode": "SW1A 1AA",
    "phone": "020 7946 0958",
}


def index_with(*records: tuple[str, Demographics]) -> PersonIndex:
    index = PersonIndex()
    for n, (person, d) in enumerate(records):
        index.put(("urn:hdx:org:a", f"r{n}"), person, d)
    return index


def test_an_equal_trusted_id_links_whatever_the_demographics_say() -> None:
    index = index_with(("P1", demo(**ADA, nhs=NHS_A)))
    # Married, moved, and the birth date typed wrong: still the same NHS number.
    d = demo(family="King", given="Ada", birth_date="1815-10-12", postcode="M1 1AE", nhs=NHS_A)
    decision = Matcher().decide(d, index)
    assert decision.person_id == "P1" and decision.grade is Grade.CERTAIN
    assert decision.candidates[0].basis is Basis.TRUSTED_ID
    assert not decision.possible_match


def test_different_trusted_ids_never_link_even_with_identical_demographics() -> None:
    index = index_with(("P1", demo(**ADA, nhs=NHS_A)))
    decision = Matcher().decide(demo(**ADA, nhs=NHS_B), index)
    assert decision.person_id is None and decision.grade is Grade.CERTAIN
    assert decision.candidates == () and decision.review == ()


def test_equal_in_one_trusted_system_but_different_in_another_goes_to_review() -> None:
    ssn = "urn:oid:2.16.840.1.113883.4.1"
    trusted = TrustedSystems.of([NHS_NUMBER, ssn])
    existing = Demographics(
        family="lovelace",
        trusted=(Identifier(NHS_NUMBER, NHS_A), Identifier(ssn, "111-11-1111")),
    )
    incoming = Demographics(
        family="lovelace",
        trusted=(Identifier(NHS_NUMBER, NHS_A), Identifier(ssn, "222-22-2222")),
    )
    assert trusted.valid(Identifier(ssn, "111-11-1111"))
    decision = Matcher().decide(incoming, index_with(("P1", existing)))
    assert decision.person_id is None and decision.grade is Grade.POSSIBLE
    assert [(r.candidate.person_id, r.reason) for r in decision.review] == [
        ("P1", ReviewReason.TRUSTED_ID_CONFLICT)
    ]


def test_two_persons_with_the_same_trusted_id_link_to_one_and_flag_the_other() -> None:
    index = index_with(("P1", demo(**ADA, nhs=NHS_A)), ("P2", demo(**ADA, nhs=NHS_A)))
    decision = Matcher().decide(demo(**ADA, nhs=NHS_A), index)
    assert decision.person_id == "P1" and decision.grade is Grade.CERTAIN
    assert [(r.candidate.person_id, r.reason) for r in decision.review] == [
        ("P2", ReviewReason.AMBIGUOUS)
    ]


def test_a_record_without_a_trusted_id_links_on_strong_demographics() -> None:
    index = index_with(("P1", demo(**ADA, nhs=NHS_A)))
    decision = Matcher().decide(demo(**ADA), index)
    assert decision.person_id == "P1" and decision.grade is Grade.PROBABLE


def test_a_person_in_another_trusted_system_is_still_matched_on_demographics() -> None:
    index = index_with(("P1", demo(**ADA)))
    decision = Matcher().decide(demo(**ADA, nhs=NHS_C), index)
    assert decision.person_id == "P1" and decision.grade is Grade.PROBABLE


# (what differs from the indexed Ada, expected decision)
THRESHOLD_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("identical", {}, "link"),
    ("nickname, postcode district", {"given": "Addie", "postcode": "SW1A 2BB"}, "link"),
    ("family typo", {"family": "Lovelase"}, "link"),
    ("day and month swapped", {"birth_date": "1815-10-12"}, "link"),
    ("no address or phone", {"postcode": None, "phone": None}, "review"),
    ("no address, phone or gender", {"postcode": None, "phone": None, "gender": None}, "review"),
    (
        "twin sister at the same address",
        {"given": "Augusta", "phone": None},
        "review",
    ),
    (
        "a namesake born another year",
        {"birth_date": "1915-02-01", "postcode": None, "phone": None},
        "new",
    ),
    (
        "different person entirely",
        {
            "family": "Hopper",
            "given": "Grace",
            "birth_date": "1906-12-09",
            "postcode": "M1 1AE",
            "phone": None,
        },
        "new",
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [(c, e) for _, c, e in THRESHOLD_CASES],
    ids=[name for name, _, _ in THRESHOLD_CASES],
)
def test_thresholds(changes: dict[str, Any], expected: str) -> None:
    index = index_with(("P1", demo(**ADA)))
    decision = Matcher().decide(demo(**{**ADA, **changes}), index)
    got = "link" if decision.person_id == "P1" else "review" if decision.possible_match else "new"
    weight = decision.candidates[0].weight if decision.candidates else None
    assert got == expected, f"weight {weight}"
    if expected == "review":
        assert decision.person_id is None and decision.grade is Grade.POSSIBLE
        assert decision.review[0].reason is ReviewReason.POSSIBLE_MATCH
    if expected == "new":
        assert decision.grade is Grade.CERTAIN


def test_thresholds_are_configurable() -> None:
    index = index_with(("P1", demo(**ADA)))
    sparse = demo(**{**ADA, "postcode": None, "phone": None})
    assert Matcher().decide(sparse, index).person_id is None
    lenient = Matcher(MatchConfig(upper=25.0, lower=15.0))
    decision = lenient.decide(sparse, index)
    assert decision.person_id == "P1" and decision.grade is Grade.PROBABLE
    strict = Matcher(MatchConfig(upper=80.0, lower=60.0))
    decision = strict.decide(demo(**ADA), index)
    assert decision.person_id is None and decision.review == ()
    with pytest.raises(ValueError, match="above upper"):
        MatchConfig(upper=10.0, lower=20.0)


def test_the_best_of_a_persons_records_counts() -> None:
    moved = demo(**{**ADA, "postcode": "M1 1AE", "phone": None})
    index = index_with(("P1", demo(**ADA)), ("P1", moved))
    decision = Matcher().decide(demo(**ADA), index)
    assert decision.person_id == "P1"
    assert len(decision.candidates) == 1  # one candidate per person, not per record


def test_a_record_is_not_its_own_candidate_when_excluded() -> None:
    index = PersonIndex()
    index.put(("s", "1"), "P1", demo(**ADA))
    assert Matcher().decide(demo(**ADA), index, exclude=("s", "1")).person_id is None
    assert Matcher().decide(demo(**ADA), index).person_id == "P1"


def test_probabilities_follow_the_weight() -> None:
    m = Matcher()
    assert m.probability(-100) < m.probability(18) < m.probability(30) < m.probability(200)
    assert m.probability(24) == pytest.approx(0.5)
    assert m.probability(200) == 1.0


def test_trusted_conflict() -> None:
    assert trusted_conflict({"n": {"1"}}, {"n": {"2"}})
    assert not trusted_conflict({"n": {"1"}}, {"n": {"1", "2"}})
    assert not trusted_conflict({"n": {"1"}}, {"m": {"2"}})
    assert not trusted_conflict({}, {"n": {"2"}})


def test_index_refiles_a_record_when_its_demographics_change() -> None:
    index = PersonIndex()
    index.put(("s", "1"), "P1", demo(**ADA, nhs=NHS_A))
    assert index.candidates(demo(**ADA)) == {"P1"}
    assert index.owners([Identifier(NHS_NUMBER, NHS_A)]) == {"P1"}
    hopper = demo(family="Hopper", given="Grace", birth_date="1906-12-09", nhs=NHS_B)
    index.put(("s", "1"), "P1", hopper)
    assert index.candidates(demo(**ADA)) == set()
    assert index.owners([Identifier(NHS_NUMBER, NHS_A)]) == set()
    assert index.candidates(hopper) == {"P1"}
    assert index.trusted_of("P1") == {NHS_NUMBER: {NHS_B}}
    index.remove(("s", "1"))
    assert len(index) == 0 and index.person_count == 0 and index.candidates(hopper) == set()


def test_blocking_finds_a_swapped_birth_date_and_swapped_names() -> None:
    index = PersonIndex()
    index.put(("s", "1"), "P1", demo(family="Lovelace", given="Ada", birth_date="1815-12-10"))
    # Different birth date key, different soundex-year key, same name key: found by name.
    assert index.candidates(demo(birth_date="1816-01-01")) == {"P1"}
    # Only the date, day and month swapped, and a different name.
    swapped = demo(family="Byron", given="Augusta", birth_date="1815-10-12")
    assert index.candidates(swapped) == {"P1"}
    # Family and given swapped, no date.
    assert index.candidates(demo(family="Ada", given="Lovelace", birth_date=None)) == {"P1"}


def test_blocking_finds_an_identifier_one_keying_error_away() -> None:
    index = PersonIndex()
    system = "urn:hdx:org:a:mrn"

    def mrn(value: str) -> dict[str, str]:
        return {"system": system, "value": value}

    index.put(
        ("s", "1"),
        "P1",
        demo(family="Moody", given="Blake", identifiers=[{"system": system, "value": "4137787"}]),
    )
    index.put(
        ("s", "2"),
        "P2",
        demo(family="Lane", given="Ann", identifiers=[{"system": system, "value": "12345"}]),
    )

    def other(value: str, in_system: str = system) -> Demographics:
        # Nothing else in common with P1: only the identifier can find it.
        return demo(
            family="Tilley",
            given="Jacob",
            birth_date="1901-01-01",
            postcode="ZZ1 1ZZ",
            phone="0000",
            identifiers=[{"system": in_system, "value": value}],
        )

    assert index.candidates(other("4137877")) == {"P1"}  # two adjacent digits swapped
    assert index.candidates(other("4137797")) == {"P1"}  # one digit wrong
    assert index.candidates(other("4137787")) == {"P1"}  # the same value
    assert index.candidates(other("4137877", "urn:other")) == set()  # another system
    assert index.candidates(other("4173877")) == set()  # two keying errors
    assert index.candidates(other("12354")) == set()  # too short to count (MIN_KEYED_LENGTH)
    # A variant in common without being one keying error apart: shifted, not a candidate.
    index.put(("s", "3"), "P3", demo(family="Cole", given="Ben", identifiers=[mrn("1378770")]))
    assert index.candidates(other("4137877")) == {"P1"}
    index.remove(("s", "1"))
    assert index.candidates(other("4137877")) == set()


def test_blocking_finds_a_nickname_without_a_birth_date() -> None:
    index = PersonIndex()
    index.put(("s", "1"), "P1", demo(family="Smith", given="Anthony", birth_date=None))
    index.put(("s", "2"), "P2", demo(family="Smith", given="Bill", birth_date=None))
    assert index.candidates(demo(family="Smith", given="Tony", birth_date=None)) == {"P1"}
    assert index.candidates(demo(family="Smith", given="William", birth_date=None)) == {"P2"}
    assert index.candidates(demo(family="Smith", given="Will", birth_date=None)) == {"P2"}
    assert index.candidates(demo(family="Smith", given="Ada", birth_date=None)) == set()


def person(
    given: str | None,
    born: str | None,
    *,
    family: str = "lovelace",
    gender: str | None = "female",
    mrn: str | None = None,
    mobile: str | None = None,
) -> Demographics:
    """Someone at the Lovelaces' home: same address, postcode and (home) phone; a mobile
    of their own if given."""
    d = date.fromisoformat(born) if born else None
    return Demographics(
        family=family,
        given=(given,) if given else (),
        birth_date=d,
        birth_year=d.year if d else None,
        gender=gender,
        postcodes=("SW1A1AA",),
        addresses=("12 st jamess sq",),
        phones=("2079460958",) + ((mobile,) if mobile else ()),
        mobiles=(mobile,) if mobile else (),
        identifiers=(Identifier("urn:mrn", mrn),) if mrn else (),
    )


# (what differs from Ada at home, born 1815-12-10, the rule that holds the link or None)
HOLD_CASES: list[tuple[str, Demographics, Hold | None]] = [
    ("the same person", person("ada", "1815-12-10"), None),
    ("a typo in the given name", person("adda", "1815-12-10"), None),
    ("a nickname", person("addie", "1815-12-10"), None),
    ("day and month swapped", person("ada", "1815-10-12"), None),
    ("twin sister", person("augusta", "1815-12-10"), Hold.TWIN),
    ("twin brother", person("byron", "1815-12-10", gender="male"), Hold.TWIN),
    ("twin, date typed wrong", person("augusta", "1815-12-11"), Hold.TWIN),
    ("twin, other surname", person("augusta", "1815-12-10", family="king"), Hold.TWIN),
    ("mother of the same name", person("ada", "1790-03-01"), Hold.GENERATION),
    ("daughter of the same name", person("ada", "1840-07-01"), Hold.GENERATION),
    ("sister, another year", person("augusta", "1817-02-01"), Hold.HOUSEHOLD),
    ("someone at home, no date", person("augusta", None), Hold.HOUSEHOLD),
    ("father or son of the same name, no date", person("ada", None), Hold.UNDATED),
    ("no date, same hospital number", person("ada", None, mrn="7"), None),
    ("no date, her own mobile", person("ada", None, mobile="7700900123"), None),
    ("no date, another mobile", person("ada", None, mobile="7700900999"), Hold.UNDATED),
    ("birth year typed wrong", person("ada", "1825-12-10"), None),  # one digit
    ("same hospital number (twin)", person("augusta", "1815-12-10", mrn="7"), None),
]


@pytest.mark.parametrize(
    ("other", "rule"), [c[1:] for c in HOLD_CASES], ids=[c[0] for c in HOLD_CASES]
)
def test_hard_negative_rules(other: Demographics, rule: Hold | None) -> None:
    ada = person("ada", "1815-12-10", mrn="7", mobile="7700900123")
    levels = compare(ada, other)
    assert hold(ada, other, levels) is rule
    assert hold(other, ada, compare(other, ada)) is rule
    if rule is not None:
        # However strong the household's evidence, the link is held for review.
        decision = Matcher(MatchConfig(upper=1.0, lower=0.0)).decide(other, index_with(("P1", ada)))
        assert decision.person_id is None and decision.grade is Grade.POSSIBLE
        assert decision.review[0].candidate.hold is rule
        off = Matcher(MatchConfig(upper=1.0, lower=0.0, hard_negatives=False))
        assert off.decide(other, index_with(("P1", ada))).person_id == "P1"


def test_a_twin_anywhere_in_a_persons_records_holds_the_link() -> None:
    # P1 is Ada (two records); a record of her twin sister matches the sparser one well.
    sparse = Demographics(family="lovelace", addresses=("12 st jamess sq",), postcodes=("SW1A1AA",))
    index = index_with(("P1", person("ada", "1815-12-10")), ("P1", sparse))
    twin = person("augusta", "1815-12-10")
    decision = Matcher(MatchConfig(upper=1.0, lower=0.0)).decide(twin, index)
    assert decision.person_id is None and decision.review[0].candidate.hold is Hold.TWIN


def test_a_name_in_the_wrong_field_is_no_twin_but_a_name_shared_by_twins_is() -> None:
    ada = person("ada", "1815-12-10")
    # 'lovelace' typed as the given name, no family name: Ada, not her twin.
    misfiled = Demographics(
        given=("lovelace",),
        birth_date=ada.birth_date,
        birth_year=1815,
        gender="female",
        postcodes=ada.postcodes,
        addresses=ada.addresses,
        phones=ada.phones,
    )
    assert hold(ada, misfiled, compare(ada, misfiled)) is None
    assert hold(misfiled, ada, compare(misfiled, ada)) is None
    # Thomas Thomas and John Thomas, twins: the given name is the family's, not a mix-up.
    thomas = person("thomas", "1990-05-05", family="thomas", gender="male")
    john = person("john", "1990-05-05", family="thomas", gender="male")
    assert hold(thomas, john, compare(thomas, john)) is Hold.TWIN
    assert hold(john, thomas, compare(john, thomas)) is Hold.TWIN


def test_a_contradiction_another_record_answers_is_not_a_hold() -> None:
    linker = Matcher(MatchConfig(upper=1.0, lower=0.0))
    # Ada's person holds a record whose given name was replaced ('augusta'): another of
    # her records carries her name, so a new 'Ada' record is not taken for her twin.
    index = index_with(("P1", person("ada", "1815-12-10")), ("P1", person("augusta", "1815-12-10")))
    assert linker.decide(person("ada", "1815-12-10"), index).person_id == "P1"
    # Likewise a record whose birth date was mistyped by decades, against the others.
    index = index_with(("P1", person("ada", "1815-12-10")), ("P1", person("ada", "1851-07-01")))
    assert linker.decide(person("ada", "1815-12-10"), index).person_id == "P1"
    # Nothing of the person's carries the twin's name: still held.
    index = index_with(("P1", person(None, "1815-12-10")), ("P1", person("ada", "1815-12-10")))
    decision = linker.decide(person("augusta", "1815-12-10"), index)
    assert decision.person_id is None and decision.review[0].candidate.hold is Hold.TWIN


def test_an_undated_record_links_when_another_of_the_persons_records_has_its_birth_date() -> None:
    linker = Matcher(MatchConfig(upper=1.0, lower=0.0))
    # The person's best record for a new dated 'Ada' has no date; another of hers agrees.
    index = index_with(("P1", person("ada", None)), ("P1", person("ada", "1815-12-10")))
    assert linker.decide(person("ada", "1815-12-10"), index).person_id == "P1"
    # A new undated record: nothing of hers can agree on a date it does not carry.
    decision = linker.decide(person("ada", None), index)
    assert decision.person_id is None and decision.review[0].candidate.hold is Hold.UNDATED


def test_a_shared_mobile_answers_a_missing_birth_date_a_shared_home_phone_does_not() -> None:
    linker = Matcher(MatchConfig(upper=1.0, lower=0.0))
    # George senior, dated; a record of 'George' at his home with no birth date. The home
    # phone is the household's (his son George junior shares it): held for review.
    father = person("george", "1950-01-01", gender="male", mobile="7700900001")
    index = index_with(("P1", father))
    decision = linker.decide(person("george", None, gender="male"), index)
    assert decision.person_id is None and decision.review[0].candidate.hold is Hold.UNDATED
    # His own mobile number (FHIR use 'mobile': it stays with its owner) says which George.
    decision = linker.decide(person("george", None, gender="male", mobile="7700900001"), index)
    assert decision.person_id == "P1" and decision.grade is Grade.PROBABLE
    # Another mobile: his son's, perhaps: held.
    decision = linker.decide(person("george", None, gender="male", mobile="7700900002"), index)
    assert decision.person_id is None and decision.review[0].candidate.hold is Hold.UNDATED
    # The mobile on another of the person's records than the best one counts as well.
    bare = Demographics(family="lovelace", given=("george",), mobiles=("7700900003",))
    bare = replace(bare, phones=bare.mobiles)
    index = index_with(("P1", person("george", "1950-01-01", gender="male")), ("P1", bare))
    decision = linker.decide(person("george", None, gender="male", mobile="7700900003"), index)
    assert decision.person_id == "P1"


def test_a_shared_mobile_does_not_answer_a_twin_or_a_generation() -> None:
    # A contradiction (another given name on the same birthday, a birth date a generation
    # away) is not lifted by a phone: children's records carry a parent's mobile.
    linker = Matcher(MatchConfig(upper=1.0, lower=0.0))
    index = index_with(("P1", person("ada", "1815-12-10", mobile="7700900123")))
    twin = person("augusta", "1815-12-10", mobile="7700900123")
    assert linker.decide(twin, index).review[0].candidate.hold is Hold.TWIN
    daughter = person("ada", "1840-07-01", mobile="7700900123")
    assert linker.decide(daughter, index).review[0].candidate.hold is Hold.GENERATION


def test_an_exact_identifier_answers_another_records_contradiction_a_near_one_does_not() -> None:
    linker = Matcher(MatchConfig(upper=1.0, lower=0.0))
    # P1: a record without a given name carrying MRN 1234567, and one named 'augusta'.
    index = index_with(
        ("P1", person(None, "1815-12-10", mrn="1234567")),
        ("P1", person("augusta", "1815-12-10", mrn="7654321")),
    )
    same_number = person("ada", "1815-12-10", mrn="1234567")
    decision = linker.decide(same_number, index)
    assert decision.person_id == "P1" and decision.candidates[0].tied
    # One digit off (consecutive numbers, as twins registered together get): held.
    next_number = person("ada", "1815-12-10", mrn="1234568")
    decision = linker.decide(next_number, index)
    assert decision.person_id is None and decision.review[0].candidate.hold is Hold.TWIN


def test_a_record_that_fits_two_people_equally_is_not_linked() -> None:
    # Father and son of one name at one address; a record with no birth date fits both.
    father = person("george", "1950-01-01", gender="male")
    son = person("george", "1980-06-06", gender="male")
    index = index_with(("FATHER", father), ("SON", son))
    undated = person("george", None, gender="male")
    decision = Matcher(MatchConfig(upper=10.0, lower=0.0)).decide(undated, index)
    assert decision.person_id is None and decision.grade is Grade.POSSIBLE
    assert {r.candidate.person_id for r in decision.review} == {"FATHER", "SON"}
    # Each is held already for want of a birth date, before their tie is even weighed.
    assert {r.candidate.hold for r in decision.review} == {Hold.UNDATED}


def test_an_identifier_picks_one_of_two_people_a_record_fits_equally() -> None:
    father = person("george", "1950-01-01", gender="male", mrn="5550001")
    son = person("george", "1980-06-06", gender="male", mrn="5550777")
    index = index_with(("FATHER", father), ("SON", son))
    undated = person("george", None, gender="male", mrn="5550777")
    decision = Matcher(MatchConfig(upper=10.0, lower=0.0)).decide(undated, index)
    assert decision.person_id == "SON" and decision.grade is Grade.PROBABLE
    # The father is no contender: without a birth date the record could only be held for
    # review against him (UNDATED), and the son's own number settles it.
    assert not decision.review


def test_one_person_the_index_holds_twice_is_not_ambiguous() -> None:
    # The same Ada filed as two persons (a missed link): the record links to the better.
    index = index_with(("P1", person("ada", "1815-12-10")), ("P2", person("ada", "1815-12-10")))
    decision = Matcher(MatchConfig(upper=10.0, lower=0.0)).decide(
        person("ada", "1815-12-10"), index
    )
    assert decision.person_id == "P1"
    assert [(r.candidate.person_id, r.reason) for r in decision.review] == [
        ("P2", ReviewReason.AMBIGUOUS)
    ]


@pytest.mark.parametrize(
    ("persons", "upper", "lower"),
    [
        (2**24, 24 + math.log2(99), 24 - math.log2(99)),  # the defaults' rule: ≈ 30.6 / 17.4
        (10_000, math.log2(10_000) + math.log2(99), math.log2(10_000) - math.log2(99)),
        (1, 1 + math.log2(99), 1 - math.log2(99)),  # never below one person
    ],
)
def test_thresholds_for_a_population(persons: int, upper: float, lower: float) -> None:
    config = MatchConfig.for_population(persons)
    assert config.upper == pytest.approx(upper)
    assert config.lower == pytest.approx(lower)
    assert config.prior_log2_odds == pytest.approx(-max(math.log2(persons), 1))
    defaults = MatchConfig()
    assert abs(MatchConfig.for_population(2**24).upper - defaults.upper) < 1
    assert abs(MatchConfig.for_population(2**24).lower - defaults.lower) < 1


def test_the_matcher_weighs_swapped_names_as_agreeing_names_not_more() -> None:
    right = person("ada", "1815-12-10")
    swapped = replace(right, family="ada", given=("lovelace",))
    weight, levels = Matcher().weigh(right, swapped)
    exact, _ = Matcher().weigh(right, right)
    assert levels[Field.FAMILY] is Level.TRANSPOSED
    assert weight == pytest.approx(exact)


@pytest.mark.parametrize(
    ("other", "rule"),
    [
        (person("augusta", "1815-12-10"), Hold.TWIN),
        (person("ada", "1790-03-01"), Hold.GENERATION),
        (person("ada", None), Hold.UNDATED),
    ],
)
def test_a_lifted_rule_does_not_hold_and_the_others_still_do(
    other: Demographics, rule: Hold
) -> None:
    ada = person("ada", "1815-12-10")
    assert hold(ada, other, compare(ada, other), frozenset({rule})) is None
    lifted = Matcher(MatchConfig(upper=1.0, lower=0.0, lifted_holds=frozenset({rule})))
    assert lifted.decide(other, index_with(("P1", ada))).person_id == "P1"
    # Lifting another rule changes nothing for this one.
    others = frozenset(Hold) - {rule}
    strict = Matcher(MatchConfig(upper=1.0, lower=0.0, lifted_holds=others))
    decision = strict.decide(other, index_with(("P1", ada)))
    assert decision.person_id is None and decision.review[0].candidate.hold is rule


def test_household_shapes_of_pairs_at_one_home() -> None:
    ada = person("ada", "1815-12-10")
    assert household_shapes(ada, person("ada", "1815-12-10"), compare(ada, ada)) == {
        Shape.BORN_TOGETHER,
        Shape.NAMED_ALIKE,
    }
    twin = person("augusta", "1815-12-10")
    assert household_shapes(ada, twin, compare(ada, twin)) == {Shape.TWIN}
    mother = person("ada", "1790-03-01")
    assert household_shapes(ada, mother, compare(ada, mother)) == {Shape.GENERATION}
    # A shared identifier value: one person, not evidence about households.
    same, ada7 = person("augusta", "1815-12-10", mrn="7"), person("ada", "1815-12-10", mrn="7")
    assert household_shapes(ada7, same, compare(ada7, same)) == set()
    # Elsewhere: not a household.
    away = replace(twin, addresses=("1 other rd",), postcodes=("LS11AB",), phones=())
    assert household_shapes(ada, away, compare(ada, away)) == set()
    # The same pairs sharing an identifier: what a person's own records look like.
    assert anchor_shapes(ada, twin, compare(ada, twin)) == {Shape.TWIN}
    assert anchor_shapes(ada, mother, compare(ada, mother)) == {Shape.GENERATION}


def test_a_name_in_the_wrong_field_weighs_as_agreeing_only_where_the_data_show_no_twins() -> None:
    andrew = person("andrew", "1908-03-27", family="rawlings", gender="male")
    # 'rawlings' keyed as the given name, the family name replaced: the name in the wrong
    # field and nothing else about the names agreeing.
    crossed = replace(andrew, family="lachlan", given=("rawlings",))
    levels = compare(andrew, crossed)
    assert levels[Field.GIVEN] is Level.DISAGREE and levels[Field.FAMILY] is Level.DISAGREE
    with_twins = Matcher(MatchConfig())
    without = Matcher(MatchConfig(lifted_holds=frozenset({Hold.TWIN})))
    weights = with_twins.config.weights
    gain = weights.weight(Field.GIVEN, Level.EXACT) - weights.weight(Field.GIVEN, Level.DISAGREE)
    assert without.weigh(andrew, crossed)[0] == pytest.approx(
        with_twins.weigh(andrew, crossed)[0] + gain
    )
    assert without.weigh(crossed, andrew)[0] == pytest.approx(without.weigh(andrew, crossed)[0])
    # Thomas Thomas and John Thomas: the given name is the family's own, not a mix-up.
    thomas = person("thomas", "1990-05-05", family="thomas", gender="male")
    john = person("john", "1990-05-05", family="thomas", gender="male")
    assert without.weigh(thomas, john)[0] == with_twins.weigh(thomas, john)[0]


def test_address_lines_in_another_order_weigh_as_the_same_home_and_a_twin_is_still_held() -> None:
    def weller(given: str, *lines: str) -> Demographics:
        doc = {
            "resourceType": "Patient",
            "name": [{"family": "Weller", "given": [given]}],
            "birthDate": "1970-01-06",
            "gender": "male",
            "address": [{"use": "home", "line": list(lines), "postalCode": "2870"}],
        }
        return extract_demographics(doc, TrustedSystems())

    flynn = weller("Flynn", "23 Woollum Street", "Allunga")
    # Another source lists his address lines the other way round: the same home.
    swapped = weller("Flynn", "23 Allunga", "Woollum Street")
    matcher = Matcher()
    weight, levels = matcher.weigh(swapped, flynn)
    assert levels[Field.ADDRESS] is Level.EXACT
    assert weight == pytest.approx(matcher.weigh(flynn, flynn)[0])
    index = index_with(("P1", flynn))
    assert matcher.decide(swapped, index).person_id == matcher.decide(flynn, index).person_id
    # His twin brother's record, the lines swapped too: the same home is what twins share,
    # and the twin rule still holds the link for review.
    twin = weller("Oscar", "23 Allunga", "Woollum Street")
    decision = Matcher(MatchConfig(upper=1.0, lower=0.0)).decide(twin, index)
    assert decision.person_id is None and decision.review[0].candidate.hold is Hold.TWIN
    # Likewise a space typed into the street ('bat h pace' for 'bath place'): the same
    # home, and still a twin.
    bath = weller("Flynn", "23 Bath Place")
    typed = weller("Oscar", "23 Bat h Pace")
    assert compare(typed, bath)[Field.ADDRESS] is Level.EXACT
    decision = Matcher(MatchConfig(upper=1.0, lower=0.0)).decide(typed, index_with(("P1", bath)))
    assert decision.person_id is None and decision.review[0].candidate.hold is Hold.TWIN
