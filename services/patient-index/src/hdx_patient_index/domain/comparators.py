"""Field comparators: how far two records agree on each field, as a discrete agreement level.

Fellegi–Sunter needs levels, not raw similarities: each (field, level) has its own m and u
probability (weights.py), so "Jaro–Winkler ≥ 0.94" and "same metaphone" carry different
evidence. Each comparator returns the *best* level that applies, testing from strongest to
weakest; MISSING when either side lacks the field (weight 0: no evidence either way).
"""

from __future__ import annotations

from datetime import date
from enum import StrEnum
from functools import lru_cache

import jellyfish

from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.normalise import (
    compact,
    given_name_forms,
    postcode_district,
    split_house_number,
)


class Field(StrEnum):
    FAMILY = "family"
    GIVEN = "given"
    MIDDLE = "middle"  # middle names (given names after the first)
    BIRTH_DATE = "birth_date"
    GENDER = "gender"
    POSTCODE = "postcode"  # compared within ADDRESS (compare_postcode), not on its own
    ADDRESS = "address"  # where they live: first address line and postcode together
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
    ONE_DIGIT = "one-digit"  # one character typed wrong, or two adjacent ones swapped
    SAME_YEAR = "same-year"
    DISTRICT = "district"  # same postcode district (outward code)
    SAME_LINE = "same-line"  # addresses: the same first line under another postcode
    SAME_POSTCODE = "same-postcode"  # addresses: the same postcode, not the same line
    ONE_SIDED = "one-sided"  # middle names: one record has some, the other none
    DISAGREE = "disagree"
    MISSING = "missing"


JW_HIGH = 0.94
JW_LOW = 0.88
# Identifiers shorter than this one keying error apart are as likely different people.
MIN_KEYED_LENGTH = 6


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


@lru_cache(maxsize=65_536)
def _words(name: str) -> frozenset[str]:
    return frozenset(name.split())


def compare_family(a: Demographics, b: Demographics) -> Level:
    if not a.family or not b.family:
        return Level.MISSING
    if a.family == b.family:
        return Level.EXACT
    level = compare_strings(compact(a.family), compact(b.family))
    if level in (Level.EXACT, Level.FUZZY_HIGH, Level.PHONETIC):
        return level
    # Double-barrelled names, a maiden name on one side, a previous name on the other.
    if not a.other_families and not b.other_families:  # the common case, words cached
        return Level.PARTIAL if not _words(a.family).isdisjoint(_words(b.family)) else level
    words_a = {w for f in (a.family, *a.other_families) for w in f.split()}
    words_b = {w for f in (b.family, *b.other_families) for w in f.split()}
    if words_a & words_b:
        return Level.PARTIAL
    return level


MIN_TYPO_LENGTH = 5


def one_typo(a: str, b: str) -> bool:
    """Names at least MIN_TYPO_LENGTH long one typo apart (a letter wrong, missing or
    extra, or two swapped): Jaro–Winkler puts some of them under JW_HIGH (a typo early in
    a name costs it the prefix bonus)."""
    return (
        min(len(a), len(b)) >= MIN_TYPO_LENGTH
        and abs(len(a) - len(b)) <= 1
        and jellyfish.damerau_levenshtein_distance(a, b) <= 1
    )


def compare_given(a: Demographics, b: Demographics) -> Level:
    ga, gb = a.first_given, b.first_given
    if not ga or not gb:
        return Level.MISSING
    if ga == gb:
        return Level.EXACT
    if not given_name_forms(ga).isdisjoint(given_name_forms(gb)):
        return Level.NICKNAME
    level = compare_strings(ga, gb)
    if level is not Level.FUZZY_HIGH and one_typo(ga, gb):
        return Level.FUZZY_HIGH
    if level in (Level.FUZZY_HIGH, Level.PHONETIC):
        return level
    if (len(ga) == 1 or len(gb) == 1) and ga[0] == gb[0]:
        return Level.INITIAL
    if set(a.given) & set(b.given):
        return Level.PARTIAL  # a middle name used as the first name
    return level


def compare_middle(a: Demographics, b: Demographics) -> Level:
    """Middle names, when both records have some: one the same → exact; one the other's
    initial → initial; one a typo of the other (Jaro–Winkler ≥ JW_HIGH) → fuzzy-high; all
    different → disagree. One record with middle names and the other with a given name but
    none → one-sided: whether that tells anything (sources that drop middle names, or two
    people) is the model's to say — EM estimates its m and u like any level's. Missing when
    neither has any, when either has no given name, or when a middle name of one is the
    other's first given name (a middle name used as the first, names reordered: the
    given-name comparison has weighed that already)."""
    if not a.given or not b.given:
        return Level.MISSING
    ma, mb = a.given[1:], b.given[1:]
    if not ma and not mb:
        return Level.MISSING
    if not set(ma).isdisjoint(mb):
        return Level.EXACT
    if a.given[0] in mb or b.given[0] in ma:
        return Level.MISSING
    if not ma or not mb:
        return Level.ONE_SIDED
    if any((len(x) == 1 or len(y) == 1) and x[0] == y[0] for x in ma for y in mb):
        return Level.INITIAL
    if any(jaro_winkler(x, y) >= JW_HIGH for x in ma for y in mb):
        return Level.FUZZY_HIGH
    return Level.DISAGREE


def one_edit(a: str, b: str) -> bool:
    """One keying error apart: a single character substituted, or two adjacent ones swapped
    (what a modulus-11 check digit catches, and what typing a number wrong mostly does)."""
    n = len(a)
    if n != len(b) or a == b:
        return False
    i = 0
    while a[i] == b[i]:
        i += 1
    if a[i + 1 :] == b[i + 1 :]:
        return True
    return i + 1 < n and a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2 :] == b[i + 2 :]


@lru_cache(maxsize=65_536)
def _digits(d: date) -> str:
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


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
    if one_edit(_digits(da), _digits(db)):
        return Level.ONE_DIGIT
    if da.year == db.year:
        return Level.SAME_YEAR
    return Level.DISAGREE


def compare_gender(a: Demographics, b: Demographics) -> Level:
    if not a.gender or not b.gender:
        return Level.MISSING
    return Level.EXACT if a.gender == b.gender else Level.DISAGREE


def compare_postcode(a: Demographics, b: Demographics) -> Level:
    """Same postcode; one keying error apart; same UK district (outward code); else none."""
    pa, pb = a.postcodes, b.postcodes
    if not pa or not pb:
        return Level.MISSING
    if len(pa) == 1 and len(pb) == 1:
        x, y = pa[0], pb[0]
        if x == y:
            return Level.EXACT
        if one_edit(x, y):
            return Level.ONE_DIGIT
        dx = postcode_district(x)
        return Level.DISTRICT if dx is not None and dx == postcode_district(y) else Level.DISAGREE
    if not set(pa).isdisjoint(pb):
        return Level.EXACT
    if any(one_edit(x, y) for x in pa for y in pb):
        return Level.ONE_DIGIT
    districts_a = {d for p in pa if (d := postcode_district(p))}
    districts_b = {d for p in pb if (d := postcode_district(p))}
    return Level.DISTRICT if districts_a & districts_b else Level.DISAGREE


@lru_cache(maxsize=65_536)
def _split_word(street: str) -> bool:
    """Has the street a letter standing alone ('bat h pace'): a word a space was typed
    into? ('king st' / 'kingsway' has none: two streets, not one mistyped.)"""
    return any(len(w) == 1 and w.isalpha() for w in street.split())


@lru_cache(maxsize=262_144)
def _compare_line(x: str, y: str) -> Level:
    if x == y or compact(x) == compact(y):
        return Level.EXACT
    nx, sx = split_house_number(x)
    ny, sy = split_house_number(y)
    street = jaro_winkler(sx, sy)
    if street < JW_LOW and (_split_word(sx) or _split_word(sy)):
        # A space typed into a word leaves a letter on its own ('bat h pace' for 'bath
        # place'): the street is compared without its spaces, as the whole line is above.
        street = jaro_winkler(compact(sx), compact(sy))
    if nx == ny:
        # The same house number on a street spelt a little differently.
        return Level.FUZZY_HIGH if street >= JW_LOW else Level.DISAGREE
    if street >= JW_LOW and nx and ny:
        # The same street (spelt a little differently, as for the same number above),
        # another number: a typo in the number, or a neighbour.
        return Level.PARTIAL
    return Level.DISAGREE


_LINE_ORDER = (Level.EXACT, Level.FUZZY_HIGH, Level.PARTIAL, Level.DISAGREE)


def compare_lines(a: Demographics, b: Demographics) -> Level:
    """The best agreement between any current address line of one and of the other:
    exact, same number on a street spelt a little differently (fuzzy-high), same street
    (spelt a little differently or not) with another number (partial), disagree; missing
    when a side has no line. An address whose lines hold the same words in another order
    (`demographics.address_words`: '23 allunga' + 'woollum st' for '23 woollum st' +
    'allunga') is the same line: exact."""
    if not a.addresses or not b.addresses:
        return Level.MISSING
    if len(a.addresses) == 1 and len(b.addresses) == 1:  # the common case, without the loop
        best = _compare_line(a.addresses[0], b.addresses[0])
        if best is Level.EXACT:
            return best
        if (
            a.address_words
            and b.address_words
            and not set(a.address_words).isdisjoint(b.address_words)
        ):
            return Level.EXACT  # the same lines in another order (`address_words`)
        return best
    best = Level.DISAGREE
    for x in a.addresses:
        for y in b.addresses:
            level = _compare_line(x, y)
            if _LINE_ORDER.index(level) < _LINE_ORDER.index(best):
                best = level
                if best is Level.EXACT:
                    return best
    if a.address_words and b.address_words and not set(a.address_words).isdisjoint(b.address_words):
        return Level.EXACT  # the same lines in another order (`address_words`)
    return best


def compare_address(a: Demographics, b: Demographics) -> Level:
    """Where the two live, the first address line and the postcode taken together.

    They are one fact, not two: counted separately, the same home (or a move) would count
    twice, and a household's members would look like one person twice over. Levels:

    - exact: the same line (or the same number on a street spelt a little differently), and
      the same postcode (or one keying error apart, or no postcode to compare);
    - same-line: the same line under another postcode;
    - partial: the same street with another house number, the postcode not against it;
    - same-postcode: the same postcode, the lines not the same;
    - one-digit: postcodes one keying error apart, the lines not the same;
    - district: the same UK postcode district only;
    - disagree; missing when neither part can be compared.
    """
    line = compare_lines(a, b)
    postcode = compare_postcode(a, b)
    same_postcode = postcode in (Level.EXACT, Level.ONE_DIGIT)
    if line in (Level.EXACT, Level.FUZZY_HIGH):
        if same_postcode or postcode is Level.MISSING:
            return Level.EXACT
        return Level.SAME_LINE
    if line is Level.PARTIAL and (same_postcode or postcode is Level.MISSING):
        return Level.PARTIAL
    if postcode is Level.EXACT:
        return Level.SAME_POSTCODE
    if postcode is Level.ONE_DIGIT:
        return Level.ONE_DIGIT  # short postcodes one keying error apart happen by chance
    if postcode is Level.DISTRICT:
        return Level.DISTRICT
    if line is Level.MISSING and postcode is Level.MISSING:
        return Level.MISSING
    return Level.DISAGREE


def compare_phone(a: Demographics, b: Demographics) -> Level:
    if not a.phones or not b.phones:
        return Level.MISSING
    return Level.EXACT if set(a.phones) & set(b.phones) else Level.DISAGREE


def compare_identifiers(a: Demographics, b: Demographics) -> Level:
    """Identifiers count only within one system: a shared value → exact; one keying error
    apart → one-digit; values on both sides that all differ → disagree; else missing.

    Untrusted identifiers (a hospital number, an NHS number that fails its check digit) are
    compared with each other and with the other side's trusted ones: an NHS number typed
    with one digit wrong is not trusted, but it is strong evidence. Two different *trusted*
    values never get here (the matcher keeps such persons apart).
    """
    if not a.identifiers and not b.identifiers:
        return Level.MISSING
    if len(a.identifiers) == 1 and len(b.identifiers) == 1 and not a.trusted and not b.trusted:
        x, y = a.identifiers[0], b.identifiers[0]  # the common case, without the lists
        if not x.system or x.system != y.system:
            return Level.MISSING
        if x.value == y.value:
            return Level.EXACT
        if len(x.value) >= MIN_KEYED_LENGTH and one_edit(x.value, y.value):
            return Level.ONE_DIGIT
        return Level.DISAGREE
    # Pairs of values in one system, at least one of them untrusted.
    pairs = [
        (x.value, y.value)
        for xs, ys in ((a.identifiers, (*b.identifiers, *b.trusted)), (a.trusted, b.identifiers))
        for x in xs
        for y in ys
        if x.system and x.system == y.system
    ]
    if not pairs:
        return Level.MISSING
    if any(x == y for x, y in pairs):
        return Level.EXACT
    if any(len(x) >= MIN_KEYED_LENGTH and one_edit(x, y) for x, y in pairs):
        return Level.ONE_DIGIT
    return Level.DISAGREE


_DISAGREEING = frozenset({Level.DISAGREE, Level.FUZZY_LOW, Level.PHONETIC, Level.PARTIAL})


def _name_forms(d: Demographics) -> tuple[str, str] | None:
    """(family, given) compacted, the given names all together ('graham jones' given as
    two names reads as the family name 'grahamjones')."""
    if not d.family or not d.given:
        return None
    return compact(d.family), "".join(d.given)


def _transposed(a: Demographics, b: Demographics) -> bool:
    """Family and given name swapped between the records, allowing a typo in each: both
    crossed pairs at least JW_LOW alike, one of them at least JW_HIGH."""
    fa, fb = _name_forms(a), _name_forms(b)
    if fa is None or fb is None:
        return False
    family_a, given_a = fa
    family_b, given_b = fb
    first_a, first_b = a.given[0], b.given[0]
    # With one given name, all of them together is that name: one Jaro–Winkler will do.
    one = jaro_winkler(family_a, given_b)
    if first_b != given_b:
        one = max(one, jaro_winkler(family_a, first_b))
    if one < JW_LOW:
        return False  # both crossings must reach JW_LOW: the other one need not be computed
    two = jaro_winkler(given_a, family_b)
    if first_a != given_a:
        two = max(two, jaro_winkler(first_a, family_b))
    return min(one, two) >= JW_LOW and max(one, two) >= JW_HIGH


def compare(a: Demographics, b: Demographics) -> dict[Field, Level]:
    """Every field's agreement level for one pair of records."""
    levels = {
        Field.FAMILY: compare_family(a, b),
        Field.GIVEN: compare_given(a, b),
        Field.MIDDLE: compare_middle(a, b),
        Field.BIRTH_DATE: compare_birth_date(a, b),
        Field.GENDER: compare_gender(a, b),
        Field.ADDRESS: compare_address(a, b),  # line and postcode together
        Field.PHONE: compare_phone(a, b),
        Field.IDENTIFIER: compare_identifiers(a, b),
    }
    if (
        levels[Field.FAMILY] in _DISAGREEING
        and levels[Field.GIVEN] in _DISAGREEING
        and _transposed(a, b)
    ):
        levels[Field.FAMILY] = levels[Field.GIVEN] = Level.TRANSPOSED
    return levels
