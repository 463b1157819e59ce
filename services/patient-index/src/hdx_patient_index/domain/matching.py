"""Deciding which person a record belongs to.

1. Trusted identifiers first. An equal, valid trusted identifier means the same person. A
   person holding a *different* value in a trusted system the record also has is a different
   person: never linked automatically, not even offered for review.
2. Otherwise Fellegi–Sunter: the record is compared with every record of each blocked
   candidate person; a person's weight is its best record's.
3. Thresholds: weight ≥ upper → link ("probable"); lower ≤ weight < upper → a new person,
   with the candidate recorded for review ("possible"); below lower → a new person.

Grades follow FHIR's match-grade extension (certain | probable | possible | certainly-not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from hdx_patient_index.domain.comparators import Field, Level, compare
from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.index import PersonIndex, RecordKey
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


class Basis(StrEnum):
    TRUSTED_ID = "trusted-id"
    DEMOGRAPHICS = "demographics"


@dataclass(frozen=True)
class MatchConfig:
    """Thresholds are Fellegi–Sunter weights (sums of log2(m/u)).

    With the prior weights, the same name, birth date and gender with nothing else weighs
    about 28 (review, not an automatic link: twins and common names); adding the same
    postcode brings it to about 39. ``prior_log2_odds`` turns a weight into a probability
    for ``$match`` scores: -24 ≈ one in 16 million, the chance that two records picked at
    random from a national population are the same person.
    """

    upper: float = 30.0
    lower: float = 18.0
    prior_log2_odds: float = -24.0
    weights: MatchWeights = field(default=DEFAULT_WEIGHTS)

    def __post_init__(self) -> None:
        if self.lower > self.upper:
            raise ValueError(f"lower threshold {self.lower} is above upper {self.upper}")


@dataclass(frozen=True, slots=True)
class Candidate:
    person_id: str
    grade: Grade
    weight: float
    probability: float
    basis: Basis
    levels: Mapping[Field, Level] = field(default_factory=dict)  # the best record's levels


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


def trusted_conflict(record: Mapping[str, set[str]], person: Mapping[str, set[str]]) -> bool:
    """True when some trusted system has values on both sides and they share none."""
    return any(values.isdisjoint(person[s]) for s, values in record.items() if s in person)


class Matcher:
    def __init__(self, config: MatchConfig | None = None) -> None:
        self.config = config or MatchConfig()

    def weigh(self, a: Demographics, b: Demographics) -> tuple[float, dict[Field, Level]]:
        levels = compare(a, b)
        return self.config.weights.total(levels), levels

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
        best: tuple[float, dict[Field, Level]] | None = None
        for rec in index.records_of(person_id):
            if rec.key == exclude:
                continue
            scored = self.weigh(d, rec.demographics)
            if best is None or scored[0] > best[0]:
                best = scored
        if best is None:
            return None
        weight, levels = best
        if basis is Basis.TRUSTED_ID:
            return Candidate(person_id, Grade.CERTAIN, weight, 1.0, basis, levels)
        grade = self.grade_of(weight) or Grade.CERTAINLY_NOT
        return Candidate(person_id, grade, weight, self.probability(weight), basis, levels)

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
        return certain + probabilistic, conflicted

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
