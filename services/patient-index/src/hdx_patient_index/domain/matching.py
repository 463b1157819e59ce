"""Deciding which person a record belongs to.

1. Trusted identifiers first. An equal, valid trusted identifier means the same person. A
   person holding a *different* value in a trusted system the record also has is a different
   person: never linked automatically, not even offered for review.
2. Otherwise Fellegi–Sunter: the record is compared with every record of each blocked
   candidate person; a person's weight is its best record's.
3. Thresholds: weight ≥ upper → link ("probable"); lower ≤ weight < upper → a new person,
   with the candidate recorded for review ("possible"); below lower → a new person.
4. Hard negatives are never linked automatically, whatever the weight (`hold`): fields are
   not independent within a family, so a household's shared surname, address and phone
   can outweigh the one field that tells its members apart. Twins (the same birth date,
   given names more than one typo apart) and parent and child of one name (birth years
   `GENERATION_YEARS` or more apart) go to review at most — unless an identifier of one
   system agrees, which family members never share. More generally a link needs the
   *person* to agree, not just the household: the given name or the birth date must agree
   (exact, nickname, typo, or the other record's family name — a name in the wrong
   field; or exact, day/month swapped, one digit). Twins and generations are checked
   against every record of a candidate person, not only its best: one contradiction holds
   the link — unless the person's records answer it: another of them agrees with the
   record on the field the contradiction is about (the given name for a twin, the birth
   date for a generation: the odd record carries a replaced name or a mistyped date), or
   one of them carries the very same identifier value (`_tied`; exact only, since twins
   registered together can hold consecutive numbers). And a link needs a clear winner: when
   two persons score above the upper threshold within `ambiguity_margin` of each other and
   could not be linked to each other (a father and son of one name, a record without a
   birth date), neither is linked; both go to review — unless the record carries the same
   identifier value as one of them and not the other, which then wins.
   Nor does a record link on demographics when the birth date is missing on either side
   and no record of the person agrees on it (`UNDATED`): name, sex, address and home phone
   are what a father and his son of one name share; such a link waits for a reviewer, an
   identifier, or the person's own mobile number (`shares_mobile`: a number a source marked
   as a mobile, which stays with its owner). A mobile does not lift a twin or generation
   contradiction, though: a child's record often carries a parent's mobile.
   `MatchConfig.hard_negatives=False` turns all of this off (to measure what it costs).
   A rule in `MatchConfig.lifted_holds` does not hold: the model lifts the twin rule, or
   the generation rule (and with it UNDATED), only when its data show no such pairs
   beyond what a person's own records explain (`MatchModel.lifted_holds`, domain/em.py:
   a population without twins or parents and children of one name, such as FEBRL's).

Grades follow FHIR's match-grade extension (certain | probable | possible | certainly-not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

import jellyfish

from hdx_patient_index.domain.comparators import Field, Level, compare
from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.index import PersonIndex, RecordKey
from hdx_patient_index.domain.normalise import compact
from hdx_patient_index.domain.weights import DEFAULT_WEIGHTS, MatchWeights


class Grade(StrEnum):
    CERTAIN = "certain"
    PROBABLE = "probable"
    POSSIBLE = "possible"
    CERTAINLY_NOT = "certainly-not"


class ReviewReason(StrEnum):
    POSSIBLE_MATCH = "possible-match"  # between the thresholds: a person may be duplicated
    AMBIGUOUS = "ambiguous-match"  # linked, but another person matched as well
    TRUSTED_ID_CONFLICT = "trusted-id-conflict"  # equal in one trusted system, not in another
    ANOTHER_PERSON = "matches-another-person"  # an update now matches a different person


class Hold(StrEnum):
    """Why a pair above the upper threshold is only offered for review."""

    TWIN = "twin"  # same family name and birth date, given names that differ outright
    GENERATION = "generation"  # same family and given name, birth dates far apart
    HOUSEHOLD = "household"  # neither the given name nor the birth date agrees
    UNDATED = "undated"  # no birth date to tell a parent from a child of the same name
    AMBIGUOUS = "ambiguous"  # another person scores within the margin: no clear winner


class Basis(StrEnum):
    TRUSTED_ID = "trusted-id"
    DEMOGRAPHICS = "demographics"


LINK_PROBABILITY = 0.99
AMBIGUITY_MARGIN = math.log2(99)  # the best person 99 times likelier than the next
REVIEW_PROBABILITY = 0.01


@dataclass(frozen=True)
class MatchConfig:
    """Thresholds are Fellegi–Sunter weights (sums of log2(m/u)).

    With the prior weights, the same name, birth date and gender with nothing else weighs
    about 28 (review, not an automatic link: twins and common names); adding the same
    postcode brings it to about 35, the same address line and postcode to about 40.
    ``prior_log2_odds`` turns a weight into a probability for ``$match`` scores: -24 ≈ one
    in 16 million, the chance that two records picked at random from a national
    population are the same person.

    The defaults follow one rule, `for_population`: link when the posterior probability of
    a match is at least 99 % (weight ≥ −prior + log2 99 ≈ 30.6), review from 1 % (≈ 17.4).
    """

    upper: float = 30.0
    lower: float = 18.0
    prior_log2_odds: float = -24.0
    weights: MatchWeights = field(default=DEFAULT_WEIGHTS)
    hard_negatives: bool = True  # hold twins and parent/child pairs for review (`hold`)
    # A probable link needs a clear winner: another person this close (log2) holds both.
    ambiguity_margin: float = AMBIGUITY_MARGIN
    # Holds the data showed no need for (`MatchModel.lifted_holds`, domain/em.py): a pair
    # of that shape is weighed like any other. Empty (the default): every rule holds.
    lifted_holds: frozenset[Hold] = frozenset()

    def __post_init__(self) -> None:
        if self.lower > self.upper:
            raise ValueError(f"lower threshold {self.lower} is above upper {self.upper}")

    @classmethod
    def for_population(
        cls,
        persons: int,
        weights: MatchWeights = DEFAULT_WEIGHTS,
        link_probability: float = LINK_PROBABILITY,
        review_probability: float = REVIEW_PROBABILITY,
        hard_negatives: bool = True,
        lifted_holds: frozenset[Hold] = frozenset(),
    ) -> MatchConfig:
        """Thresholds for an index of about ``persons`` people: the prior odds that a record
        is one given person are 1 : persons; link at ``link_probability`` posterior, review
        from ``review_probability``. No labels are involved: only the population's size."""
        prior = -math.log2(max(persons, 2))
        return cls(
            upper=-prior + math.log2(link_probability / (1 - link_probability)),
            lower=-prior + math.log2(review_probability / (1 - review_probability)),
            prior_log2_odds=prior,
            weights=weights,
            hard_negatives=hard_negatives,
            lifted_holds=lifted_holds,
        )


@dataclass(frozen=True, slots=True)
class Candidate:
    person_id: str
    grade: Grade
    weight: float
    probability: float
    basis: Basis
    levels: Mapping[Field, Level] = field(default_factory=dict)  # the best record's levels
    hold: Hold | None = None  # why a weight above the upper threshold is not a link
    # An identifier value (same system) of one of the person's records is the record's too.
    tied: bool = False


@dataclass(frozen=True, slots=True)
class ReviewItem:
    candidate: Candidate
    reason: ReviewReason


@dataclass(frozen=True)
class Decision:
    """Where a record goes: an existing person (``person_id``) or a new one (None).

    ``grade`` is the link's: certain (trusted identifier) or probable (demographics above the
    upper threshold) for an existing person; for a new person certain, or possible when a
    candidate needs review (the record may be a duplicate of it).
    """

    person_id: str | None
    grade: Grade
    candidates: tuple[Candidate, ...] = ()
    review: tuple[ReviewItem, ...] = ()

    @property
    def possible_match(self) -> bool:
        return bool(self.review)


_FAMILY_AGREES = frozenset(
    {Level.EXACT, Level.FUZZY_HIGH, Level.PHONETIC, Level.PARTIAL, Level.FUZZY_LOW}
)
_GIVEN_AGREES = frozenset(
    {Level.EXACT, Level.NICKNAME, Level.FUZZY_HIGH, Level.PHONETIC, Level.TRANSPOSED}
)
_GIVEN_DIFFERS = frozenset({Level.DISAGREE, Level.FUZZY_LOW})
_BORN_TOGETHER = frozenset({Level.EXACT, Level.DAY_MONTH_SWAPPED, Level.ONE_DIGIT})
_IDENTIFIER_AGREES = frozenset({Level.EXACT, Level.ONE_DIGIT})


# Birth years at least this far apart are a generation (parent and child), not a typo.
GENERATION_YEARS = 12


def _one_typo(a: Demographics, b: Demographics) -> bool:
    """First given names one insertion, deletion, substitution or swap apart."""
    ga, gb = a.first_given, b.first_given
    return bool(ga and gb and jellyfish.damerau_levenshtein_distance(ga, gb) <= 1)


def _crossed(a: Demographics, b: Demographics) -> bool:
    """One record's first given name is the other's family name (a name put in the wrong
    field: 'Cameron' as the given name here, the family name there). Not when that name is
    also the record's own family name ('Thomas Thomas' and 'John Thomas' are two people)."""
    fa = compact(a.family) if a.family else None
    fb = compact(b.family) if b.family else None
    ga, gb = a.first_given, b.first_given
    return bool((fa and gb == fa and fb != fa) or (fb and ga == fb and fa != fb))


def crossed_gain(
    a: Demographics, b: Demographics, levels: Mapping[Field, Level], weights: MatchWeights
) -> float:
    """What a given name that is the other record's family name (`_crossed`: 'rawlings
    lacjlan' / 'andrew rawlings', one name keyed in the wrong field and the other replaced)
    adds over the given name's disagreement: it is weighed as the given name agreeing
    (its EXACT weight, no term frequency). 0 for any other pair.

    `Matcher.weigh` adds it only where the model lifts the twin rule (a population whose
    data show no twins, `MatchModel.lifted_holds`): a twin's record with its names swapped
    ('weller ebony' for Ebony Weller) carries the family name the other twin's record has,
    so where there are twins this is no evidence of one person."""
    given = levels.get(Field.GIVEN)
    if given not in _GIVEN_DIFFERS or not _crossed(a, b):
        return 0.0
    return weights.weight(Field.GIVEN, Level.EXACT) - weights.weight(Field.GIVEN, given)


def agreement(a: Demographics, b: Demographics, levels: Mapping[Field, Level]) -> tuple[bool, bool]:
    """(the given name agrees, the birth date agrees): the two fields that tell the
    members of one household apart. A given name agrees when it is the same, a nickname,
    a typo (one edit), or the other's family name (`_crossed`); a birth date when it is the
    same, day and month swapped, or one digit apart."""
    given = levels.get(Field.GIVEN)
    given_agrees = (
        given in _GIVEN_AGREES
        or (given in _GIVEN_DIFFERS and _one_typo(a, b))
        or (given is not Level.MISSING and _crossed(a, b))
    )
    return given_agrees, levels.get(Field.BIRTH_DATE) in _BORN_TOGETHER


def hold(
    a: Demographics,
    b: Demographics,
    levels: Mapping[Field, Level],
    lifted: frozenset[Hold] = frozenset(),
) -> Hold | None:
    """The hard-negative rule a pair falls under, if any (see the module doc, step 4);
    a rule in ``lifted`` (`MatchConfig.lifted_holds`) does not hold."""
    found = _hold(a, b, levels)
    return None if found in lifted else found


def _hold(a: Demographics, b: Demographics, levels: Mapping[Field, Level]) -> Hold | None:
    if levels.get(Field.IDENTIFIER) in _IDENTIFIER_AGREES:
        return None
    born = levels.get(Field.BIRTH_DATE)
    given = levels.get(Field.GIVEN)
    given_agrees, born_agrees = agreement(a, b, levels)
    if born_agrees and given in _GIVEN_DIFFERS and not given_agrees:
        return Hold.TWIN
    if (
        given_agrees
        and born is Level.DISAGREE
        and a.birth_year is not None
        and b.birth_year is not None
        and abs(a.birth_year - b.birth_year) >= GENERATION_YEARS
    ):
        return Hold.GENERATION
    if not given_agrees and not born_agrees:
        return Hold.HOUSEHOLD
    if born is Level.MISSING and not shares_mobile(a, b):
        # Name, sex and address are what a father and his son of the same name share; only
        # the birth date, an identifier (checked above) or the person's own mobile tells
        # them apart.
        return Hold.UNDATED
    return None


# Addresses that put two records in one home (or next door): what a household shares.
_SAME_HOME = frozenset({Level.EXACT, Level.SAME_LINE, Level.PARTIAL, Level.SAME_POSTCODE})


class Shape(StrEnum):
    """How a pair of records in one home looks, for `domain/em.py`'s household evidence:
    the pairs that show whether the data hold twins or generations of one name."""

    BORN_TOGETHER = "born-together"  # family name, birth date and given name agree
    TWIN = "twin"  # family name and birth date agree, the given names differ (Hold.TWIN)
    NAMED_ALIKE = "named-alike"  # family and given name agree, both dated, born together
    GENERATION = "generation"  # family and given name agree, born a generation apart


def household_shapes(a: Demographics, b: Demographics, levels: Mapping[Field, Level]) -> set[Shape]:
    """The shapes a pair of records has when both are in one home (the same address, or
    the same street or postcode) and nothing identifies them as one person (no identifier
    value in common); empty otherwise. Trusted identifiers are the caller's to check."""
    if (
        levels.get(Field.ADDRESS) not in _SAME_HOME
        or levels.get(Field.FAMILY) not in _FAMILY_AGREES
        or levels.get(Field.IDENTIFIER) in _IDENTIFIER_AGREES
        or levels.get(Field.GIVEN, Level.MISSING) is Level.MISSING
    ):
        return set()
    out: set[Shape] = set()
    given_agrees, born_agrees = agreement(a, b, levels)
    found = _hold(a, b, levels)
    if levels.get(Field.BIRTH_DATE) is Level.EXACT:
        if given_agrees:
            out.add(Shape.BORN_TOGETHER)
        elif found is Hold.TWIN:
            out.add(Shape.TWIN)
    if given_agrees and born_agrees:
        out.add(Shape.NAMED_ALIKE)
    if found is Hold.GENERATION:
        out.add(Shape.GENERATION)
    return out


def anchor_shapes(a: Demographics, b: Demographics, levels: Mapping[Field, Level]) -> set[Shape]:
    """For a pair that shares an identifier value (one person's, as family members never
    share one): the shape its given name and birth date would give it in one home. How
    often a person's own records look like twins or generations is how many of a home's
    twin- or generation-shaped pairs are one person's records."""
    if levels.get(Field.FAMILY) not in _FAMILY_AGREES:
        return set()
    given = levels.get(Field.GIVEN, Level.MISSING)
    born = levels.get(Field.BIRTH_DATE, Level.MISSING)
    if given is Level.MISSING:
        return set()
    given_agrees, born_agrees = agreement(a, b, levels)
    out: set[Shape] = set()
    if born_agrees:
        if given_agrees:
            out.add(Shape.BORN_TOGETHER)
        elif given in _GIVEN_DIFFERS:
            out.add(Shape.TWIN)
    if given_agrees and born is not Level.MISSING:
        if born_agrees:
            out.add(Shape.NAMED_ALIKE)
        elif (
            born is Level.DISAGREE
            and a.birth_year is not None
            and b.birth_year is not None
            and abs(a.birth_year - b.birth_year) >= GENERATION_YEARS
        ):
            out.add(Shape.GENERATION)
    return out


def shares_mobile(a: Demographics, b: Demographics) -> bool:
    """A number one record's source marked as a mobile (FHIR ContactPoint.use 'mobile': a
    device that stays with its owner) is among the other record's phones. A home phone is
    a household's, like its address, and says nothing about which member a record is."""
    return not (set(a.mobiles).isdisjoint(b.phones) and set(b.mobiles).isdisjoint(a.phones))


# The holds that any record of a person (not only its best) imposes: a contradiction.
_CONTRADICTIONS = frozenset({Hold.TWIN, Hold.GENERATION})


def _tied(scored: list[tuple[float, dict[Field, Level], Demographics]]) -> bool:
    """Does the record carry the very identifier value (same system) that one of the
    person's records carries? Family members never share one, so a twin or generation
    contradiction from another of the person's records is then that record's own error (a
    replaced name, a mistyped date), not a second person. Only an exact value ties: twins
    registered together can hold consecutive numbers, one keying error apart."""
    return any(levels.get(Field.IDENTIFIER) is Level.EXACT for _, levels, _ in scored)


def _contradiction(
    d: Demographics,
    scored: list[tuple[float, dict[Field, Level], Demographics]],
    lifted: frozenset[Hold] = frozenset(),
) -> Hold | None:
    """A twin or generation rule that another of the person's records imposes on ``d``.

    A record whose given name is more than one typo from ``d``'s (twin) does not count when
    another of the person's records agrees with ``d`` on the given name: the person is
    known by that name, and the odd record carries a replaced or garbled name. Likewise a
    birth date a generation away, when another record agrees on the birth date. A twin's
    or a parent's records never agree on the field that tells them apart."""
    agreements = [agreement(d, other, levels) for _, levels, other in scored]
    given_seen = any(g for g, _ in agreements)
    born_seen = any(b for _, b in agreements)
    for _, levels, other in scored:
        h = hold(d, other, levels, lifted)
        if (h is Hold.TWIN and not given_seen) or (h is Hold.GENERATION and not born_seen):
            return h
    return None


def trusted_conflict(record: Mapping[str, set[str]], person: Mapping[str, set[str]]) -> bool:
    """True when some trusted system has values on both sides and they share none."""
    return any(values.isdisjoint(person[s]) for s, values in record.items() if s in person)


class Matcher:
    def __init__(self, config: MatchConfig | None = None) -> None:
        self.config = config or MatchConfig()

    def weigh(self, a: Demographics, b: Demographics) -> tuple[float, dict[Field, Level]]:
        levels = compare(a, b)
        weight = self.config.weights.score(a, levels, b)
        if Hold.TWIN in self.config.lifted_holds:
            weight += crossed_gain(a, b, levels, self.config.weights)
        return weight, levels

    def probability(self, weight: float) -> float:
        """The posterior probability of a match, from the weight and the prior odds."""
        log_odds = weight + self.config.prior_log2_odds
        if log_odds > 60:
            return 1.0
        return 1.0 / (1.0 + math.pow(2.0, -log_odds))

    def grade_of(self, weight: float) -> Grade | None:
        if weight >= self.config.upper:
            return Grade.PROBABLE
        if weight >= self.config.lower:
            return Grade.POSSIBLE
        return None

    def score(
        self,
        d: Demographics,
        index: PersonIndex,
        person_id: str,
        exclude: RecordKey | None = None,
        basis: Basis = Basis.DEMOGRAPHICS,
    ) -> Candidate | None:
        """The person's best-scoring record against ``d`` (None if it has no other record)."""
        scored: list[tuple[float, dict[Field, Level], Demographics]] = []
        for rec in index.records_of(person_id):
            if rec.key == exclude:
                continue
            weight, levels = self.weigh(d, rec.demographics)
            scored.append((weight, levels, rec.demographics))
        if not scored:
            return None
        weight, levels, best_record = max(scored, key=lambda s: s[0])
        if basis is Basis.TRUSTED_ID:
            return Candidate(person_id, Grade.CERTAIN, weight, 1.0, basis, levels)
        grade = self.grade_of(weight) or Grade.CERTAINLY_NOT
        held = None
        tied = _tied(scored)
        lifted = self.config.lifted_holds
        if grade is Grade.PROBABLE and self.config.hard_negatives:
            held = hold(d, best_record, levels, lifted)
            if held is Hold.UNDATED and any(
                agreement(d, o, lv)[1] or shares_mobile(d, o) for _, lv, o in scored
            ):
                # Another of the person's records agrees on the birth date, or shares a
                # mobile with the record.
                held = None
            # Another record's contradiction counts unless an identifier ties the record
            # to the person outright (see `_tied`).
            if held is None and not tied:
                held = _contradiction(d, scored, lifted)
        if held is not None:
            grade = Grade.POSSIBLE
        return Candidate(
            person_id, grade, weight, self.probability(weight), basis, levels, held, tied
        )

    def search(
        self, d: Demographics, index: PersonIndex, exclude: RecordKey | None = None
    ) -> tuple[list[Candidate], list[Candidate]]:
        """(candidates at least possible, best first; persons in trusted-id conflict).

        Trusted-id matches come first (certain); a person in conflict on a trusted system is
        never a candidate. A conflicting person that also shares a trusted id is returned in
        the second list: that is a data problem for a person to look at.
        """
        mine = d.trusted_by_system()
        owners = index.owners(d.trusted)
        certain: list[Candidate] = []
        conflicted: list[Candidate] = []
        for pid in sorted(owners):
            c = self.score(d, index, pid, exclude, Basis.TRUSTED_ID)
            if c is None:
                continue
            if trusted_conflict(mine, index.trusted_of(pid)):
                conflicted.append(
                    Candidate(pid, Grade.POSSIBLE, c.weight, c.probability, c.basis, c.levels)
                )
            else:
                certain.append(c)
        probabilistic: list[Candidate] = []
        for pid in index.candidates(d) - owners:
            if mine and trusted_conflict(mine, index.trusted_of(pid)):
                continue
            c = self.score(d, index, pid, exclude)
            if c is not None and c.grade is not Grade.CERTAINLY_NOT:
                probabilistic.append(c)
        certain.sort(key=lambda c: (-c.weight, c.person_id))
        probabilistic.sort(key=lambda c: (-c.weight, c.person_id))
        return certain + self._clear_winner(probabilistic, index, exclude), conflicted

    def _clear_winner(
        self, ranked: list[Candidate], index: PersonIndex, exclude: RecordKey | None
    ) -> list[Candidate]:
        """Probable candidates within ``ambiguity_margin`` of the best are all held back to
        possible when there is more than one that the best could not itself be linked to
        (a father and son: yes; one person the index holds twice: no): a link needs a
        clear winner."""
        probable = [c for c in ranked if c.grade is Grade.PROBABLE]
        if len(probable) < 2 or not self.config.hard_negatives:
            return ranked
        best = probable[0]
        rivals = {
            c.person_id
            for c in probable[1:]
            if c.weight >= best.weight - self.config.ambiguity_margin
            and not self._same_person(index, best.person_id, c.person_id, exclude)
        }
        if not rivals:
            return ranked
        close = rivals | {best.person_id}
        # An identifier value the record shares with one of them (and only one) picks it,
        # since the members of a family never share one (see `_tied`); the others stay
        # probable, so `decide` files them for review as ambiguous.
        tied = [c for c in probable if c.person_id in close and c.tied]
        if len(tied) == 1:
            return [tied[0]] + [c for c in ranked if c is not tied[0]]
        return [
            replace(c, grade=Grade.POSSIBLE, hold=Hold.AMBIGUOUS) if c.person_id in close else c
            for c in ranked
        ]

    def _same_person(self, index: PersonIndex, a: str, b: str, exclude: RecordKey | None) -> bool:
        """Would person ``b``'s best record be linked to person ``a`` (above the upper
        threshold, no hard-negative rule between any of their records)?"""
        records_a = [r.demographics for r in index.records_of(a) if r.key != exclude]
        records_b = [r.demographics for r in index.records_of(b) if r.key != exclude]
        best = -math.inf
        for x in records_a:
            for y in records_b:
                weight, levels = self.weigh(x, y)
                if hold(x, y, levels, self.config.lifted_holds) in _CONTRADICTIONS:
                    return False
                best = max(best, weight)
        return best >= self.config.upper

    def decide(
        self, d: Demographics, index: PersonIndex, exclude: RecordKey | None = None
    ) -> Decision:
        """Which person a record with demographics ``d`` belongs to (see the module doc)."""
        candidates, conflicted = self.search(d, index, exclude)
        review = [ReviewItem(c, ReviewReason.TRUSTED_ID_CONFLICT) for c in conflicted]
        certain = [c for c in candidates if c.grade is Grade.CERTAIN]
        probable = [c for c in candidates if c.grade is Grade.PROBABLE]
        possible = [c for c in candidates if c.grade is Grade.POSSIBLE]
        linked = certain or probable
        if linked:
            best, *others = linked
            # Another person matching as strongly: both were linked to this record's evidence.
            review += [ReviewItem(c, ReviewReason.AMBIGUOUS) for c in others]
            return Decision(best.person_id, best.grade, tuple(candidates), tuple(review))
        review += [ReviewItem(c, ReviewReason.POSSIBLE_MATCH) for c in possible]
        grade = Grade.POSSIBLE if review else Grade.CERTAIN
        return Decision(None, grade, tuple(candidates), tuple(review))
