"""Field comparators: how far two records agree on each field, as a discrete agreement level.

Fellegi–Sunter needs levels, not raw similarities: each (field, level) has its own m and u
probability (weights.py), so "Jaro–Winkler ≥ 0.94" and "same metaphone" carry different
evidence. Each comparator returns the *best* level that applies, testing from strongest to
weakest; MISSING when either side lacks the field (weight 0: no evidence either way).
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache

import jellyfish

from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.normalise import compact, given_name_forms, postcode_district


class Field(StrEnum):
    FAMILY = "family"
    GIVEN = "given"
    BIRTH_DATE = "birth_date"
    GENDER = "gender"
    POSTCODE = "postcode"
    PHONE = "phone"
    IDENTIFIER = "identifier"  # identifiers of untrusted systems (e.g. a hospital number)


class Level(StrEnum):
    EXACT = "exact"
    NICKNAME = "nickname"  # given names: one is a known short form of the other
    FUZZY_HIGH = "fuzzy-high"  # Jaro–Winkler ≥ JW_HIGH
    PHONETIC = "phonetic"  # same metaphone code
    PARTIAL = "partial"  # a shared name word, a maiden name, a middle name as first name
    FUZZY_LOW = "fuzzy-low"  # Jaro–Winkler ≥ JW_LOW
    INITIAL = "initial"  # one given name is the other's initial
    TRANSPOSED = "transposed"  # family and given name swapped
    DAY_MONTH_SWAPPED = "day-month-swapped"  # 1980-03-04 vs 1980-04-03
    ONE_DIGIT = "one-digit"  # one digit typed wrong, or two adjacent digits swapped
    SAME_YEAR = "same-year"
    DISTRICT = "district"  # same postcode district (outward code)
    DISAGREE = "disagree"
    MISSING = "missing"


JW_HIGH = 0.94
JW_LOW = 0.88


@lru_cache(maxsize=65_536)
def metaphone(text: str) -> str:
    return jellyfish.metaphone(text) if text else ""


@lru_cache(maxsize=65_536)
def soundex(text: str) -> str:
    return jellyfish.soundex(text) if text else ""


def jaro_winkler(a: str, b: str) -> float:
    return float(jellyfish.jaro_winkler_similarity(a, b))


def compare_strings(a: str, b: str) -> Level:
    """The graded comparison every name shares: exact, Jaro–Winkler bands, phonetic."""
    if a == b:
        return Level.EXACT
    sim = jaro_winkler(a, b)
    if sim >= JW_HIGH:
        return Level.FUZZY_HIGH
    if metaphone(a) == metaphone(b):
        return Level.PHONETIC
    if sim >= JW_LOW:
        return Level.FUZZY_LOW
    return Level.DISAGREE


def compare_family(a: Demographics, b: Demographics) -> Level:
    if not a.family or not b.family:
        return Level.MISSING
    level = compare_strings(compact(a.family), compact(b.family))
    if level in (Level.EXACT, Level.FUZZY_HIGH, Level.PHONETIC):
        return level
    # Double-barrelled names, a maiden name on one side, a previous name on the other.
    words_a = {w for f in (a.family, *a.other_families) for w in f.split()}
    words_b = {w for f in (b.family, *b.other_families) for w in f.split()}
    if words_a & words_b:
        return Level.PARTIAL
    return level


def compare_given(a: Demographics, b: Demographics) -> Level:
    ga, gb = a.first_given, b.first_given
    if not ga or not gb:
        return Level.MISSING
    if ga == gb:
        return Level.EXACT
    if given_name_forms(ga) & given_name_forms(gb):
        return Level.NICKNAME
    level = compare_strings(ga, gb)
    if level in (Level.FUZZY_HIGH, Level.PHONETIC):
        return level
    if (len(ga) == 1 or len(gb) == 1) and ga[0] == gb[0]:
        return Level.INITIAL
    if set(a.given) & set(b.given):
        return Level.PARTIAL  # a middle name used as the first name
    return level


def compare_birth_date(a: Demographics, b: Demographics) -> Level:
    if a.birth_year is None or b.birth_year is None:
        return Level.MISSING
    da, db = a.birth_date, b.birth_date
    if da is None or db is None:
        # A partial date on one side: only the year can be compared.
        return Level.SAME_YEAR if a.birth_year == b.birth_year else Level.DISAGREE
    if da == db:
        return Level.EXACT
    if da.year == db.year and da.day == db.month and da.month == db.day:
        return Level.DAY_MONTH_SWAPPED
    if jellyfish.damerau_levenshtein_distance(da.strftime("%Y%m%d"), db.strftime("%Y%m%d")) == 1:
        return Level.ONE_DIGIT
    if da.year == db.year:
        return Level.SAME_YEAR
    return Level.DISAGREE


def compare_gender(a: Demographics, b: Demographics) -> Level:
    if not a.gender or not b.gender:
        return Level.MISSING
    return Level.EXACT if a.gender == b.gender else Level.DISAGREE


def compare_postcode(a: Demographics, b: Demographics) -> Level:
    if not a.postcodes or not b.postcodes:
        return Level.MISSING
    if set(a.postcodes) & set(b.postcodes):
        return Level.EXACT
    districts_a = {d for p in a.postcodes if (d := postcode_district(p))}
    districts_b = {d for p in b.postcodes if (d := postcode_district(p))}
    return Level.DISTRICT if districts_a & districts_b else Level.DISAGREE


def compare_phone(a: Demographics, b: Demographics) -> Level:
    if not a.phones or not b.phones:
        return Level.MISSING
    return Level.EXACT if set(a.phones) & set(b.phones) else Level.DISAGREE


def compare_identifiers(a: Demographics, b: Demographics) -> Level:
    """Untrusted identifiers only count within one system: equal → exact, all differ → disagree."""
    if not a.identifiers or not b.identifiers:
        return Level.MISSING
    if set(a.identifiers) & set(b.identifiers):
        return Level.EXACT
    systems_a = {i.system for i in a.identifiers if i.system}
    systems_b = {i.system for i in b.identifiers if i.system}
    return Level.DISAGREE if systems_a & systems_b else Level.MISSING


_DISAGREEING = frozenset({Level.DISAGREE, Level.FUZZY_LOW, Level.PHONETIC, Level.PARTIAL})


def compare(a: Demographics, b: Demographics) -> dict[Field, Level]:
    """Every field's agreement level for one pair of records."""
    levels = {
        Field.FAMILY: compare_family(a, b),
        Field.GIVEN: compare_given(a, b),
        Field.BIRTH_DATE: compare_birth_date(a, b),
        Field.GENDER: compare_gender(a, b),
        Field.POSTCODE: compare_postcode(a, b),
        Field.PHONE: compare_phone(a, b),
        Field.IDENTIFIER: compare_identifiers(a, b),
    }
    if (
        levels[Field.FAMILY] in _DISAGREEING
        and levels[Field.GIVEN] in _DISAGREEING
        and a.family
        and b.family
        and a.first_given
        and b.first_given
        and compact(a.family) == b.first_given
        and compact(b.family) == a.first_given
    ):
        levels[Field.FAMILY] = levels[Field.GIVEN] = Level.TRANSPOSED
    return levels
