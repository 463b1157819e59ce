"""Fellegi–Sunter weights: for each field and agreement level, m and u probabilities.

- m = P(level | the two records are the same person): how often true matches look like this
  (typing errors, people moving house, marriage).
- u = P(level | they are different people): how often it happens by chance.

A level's weight is log2(m / u); a pair's weight is the sum over fields (fields are taken as
independent given match status — the usual Fellegi–Sunter assumption). MISSING weighs 0.

The priors below are hand-set from what is published about UK patient registers (names from
an English population, NHS-style birth dates and postcodes) and are deliberately round. Each
field's m values and u values sum to about 1 over its levels. They are what HDX runs on until
a model is estimated from the data: `WeightEstimator` is the seam, `domain/em.py` the
expectation–maximisation implementation (u from random pairs, m by EM over the blocked
pairs, these priors as Dirichlet pseudo-counts), and `MatchWeights.from_probabilities` turns
its table into weights. The service runs on such a model when HDX_MATCH_MODEL names its
file (`hdx-patient-index train-model` writes one; match_model.py loads it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from hdx_patient_index.domain.comparators import Field, Level
from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.normalise import compact

ProbabilityTable = Mapping[Field, Mapping[Level, tuple[float, float]]]

F, L = Field, Level
PRIOR_PROBABILITIES: ProbabilityTable = {
    # Family names: ~0.4 % of random pairs share one (Smith is ~1 %); 12 % of true matches
    # differ (typos, marriage, double-barrelling).
    F.FAMILY: {
        L.EXACT: (0.88, 0.004),
        L.FUZZY_HIGH: (0.04, 0.002),
        L.PHONETIC: (0.02, 0.006),
        L.PARTIAL: (0.02, 0.003),
        L.FUZZY_LOW: (0.01, 0.02),
        L.TRANSPOSED: (0.002, 0.0001),
        L.DISAGREE: (0.028, 0.965),
    },
    # First given names: ~1 % of random pairs share one; nicknames are common in true matches.
    F.GIVEN: {
        L.EXACT: (0.84, 0.01),
        L.NICKNAME: (0.05, 0.002),
        L.FUZZY_HIGH: (0.03, 0.003),
        L.PHONETIC: (0.015, 0.006),
        L.PARTIAL: (0.015, 0.004),
        L.FUZZY_LOW: (0.01, 0.02),
        L.INITIAL: (0.02, 0.05),
        L.TRANSPOSED: (0.002, 0.0001),
        L.DISAGREE: (0.018, 0.905),
    },
    # Middle names, where at least one record has one. Many sources record the first given
    # name only, so the same person's records often differ in having one at all (one-sided,
    # weighing a little against); where both have one, they rarely differ (a source keeps
    # an initial, or a typo), and strangers share one about as often as a first name
    # (~1.5 %). About half of strangers' pairs are one-sided. Neither with one: missing.
    F.MIDDLE: {
        L.EXACT: (0.62, 0.0075),
        L.INITIAL: (0.035, 0.02),
        L.FUZZY_HIGH: (0.02, 0.0025),
        L.DISAGREE: (0.025, 0.47),
        L.ONE_SIDED: (0.30, 0.50),
    },
    # Birth dates spread over ~80 years, with clumping: u(exact) ≈ 1e-4.
    F.BIRTH_DATE: {
        L.EXACT: (0.93, 0.0001),
        L.DAY_MONTH_SWAPPED: (0.01, 0.0001),
        L.ONE_DIGIT: (0.03, 0.002),
        L.SAME_YEAR: (0.01, 0.012),
        L.DISAGREE: (0.02, 0.9858),
    },
    F.GENDER: {
        L.EXACT: (0.98, 0.5),
        L.DISAGREE: (0.02, 0.5),
    },
    # Where they live: the first address line and the postcode as one comparison (a home is
    # one fact). A household shares it; people move, so m(exact) is well under 1. A full
    # postcode is ~15 households, a district some thousands.
    F.ADDRESS: {
        L.EXACT: (0.65, 0.0002),
        L.SAME_LINE: (0.02, 0.00005),
        L.PARTIAL: (0.02, 0.0003),
        L.SAME_POSTCODE: (0.09, 0.0008),
        L.ONE_DIGIT: (0.01, 0.001),
        L.DISTRICT: (0.06, 0.01),
        L.DISAGREE: (0.15, 0.98795),
    },
    # A phone line is shared by a household; numbers change often.
    F.PHONE: {
        L.EXACT: (0.55, 0.0002),
        L.DISAGREE: (0.45, 0.9998),
    },
    # The same value in the same (untrusted) system: strong, but registrations get duplicated.
    # One keying error apart (a digit typed wrong, two swapped) is nearly as strong.
    F.IDENTIFIER: {
        L.EXACT: (0.85, 0.00001),
        L.ONE_DIGIT: (0.05, 0.00005),
        L.DISAGREE: (0.10, 0.99994),
    },
}


@dataclass(frozen=True)
class TermFrequencies:
    """How common each value of a name field is, so that agreeing on "smith" counts for
    less than agreeing on "lovelace" (a term-frequency adjustment).

    For an exact agreement on value v the weight is log2(m_exact / u_v), u_v being the share
    of records holding v (the chance a record picked at random agrees with it); a value not
    in the table gets ``floor``. ``u_v`` never goes below ``floor``: one data set's unique
    names say little about how unique they are in the population.
    """

    m_exact: float
    shares: Mapping[str, float]
    floor: float

    def __post_init__(self) -> None:
        if not (0 < self.m_exact <= 1 and 0 < self.floor <= 1):
            raise ValueError("m_exact and floor must be in (0, 1]")

    def weight(self, value: str) -> float:
        return math.log2(self.m_exact / max(self.shares.get(value, self.floor), self.floor))


def _family_value(d: Demographics) -> str | None:
    return compact(d.family) if d.family else None


def _given_value(d: Demographics) -> str | None:
    return d.first_given


# The value whose frequency an exact agreement on a field is weighed by.
TERM_VALUES: Mapping[Field, Callable[[Demographics], str | None]] = {
    Field.FAMILY: _family_value,
    Field.GIVEN: _given_value,
}


# Levels that weigh nothing in a table that does not list them (rather than as DISAGREE):
# comparisons that were MISSING before the level existed, so that a model file written
# then weighs them as it did.
NO_EVIDENCE_UNLESS_LISTED = frozenset({Level.ONE_SIDED})


@dataclass(frozen=True)
class MatchWeights:
    """log2(m/u) per field and level; a level a table leaves out weighs as DISAGREE.

    ``term_frequencies`` (optional, per field in TERM_VALUES) replace the EXACT weight of
    that field by the value's own weight.
    """

    table: Mapping[Field, Mapping[Level, float]]
    term_frequencies: Mapping[Field, TermFrequencies] = field(default_factory=dict)
    # Every (field, level) → weight, MISSING and unlisted levels included: the hot path.
    _flat: dict[tuple[Field, Level], float] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        flat = self._flat
        for f in self.table:
            for level in Level:
                flat[(f, level)] = self.weight(f, level)

    @classmethod
    def from_probabilities(
        cls,
        probabilities: ProbabilityTable,
        term_frequencies: Mapping[Field, TermFrequencies] | None = None,
    ) -> MatchWeights:
        table: dict[Field, dict[Level, float]] = {}
        for f, levels in probabilities.items():
            for level, (m, u) in levels.items():
                if not (0 < m <= 1 and 0 < u <= 1):
                    raise ValueError(f"{f}/{level}: m and u must be in (0, 1]")
                table.setdefault(f, {})[level] = math.log2(m / u)
        return cls(table, dict(term_frequencies or {}))

    def weight(self, field: Field, level: Level) -> float:
        if level is Level.MISSING:
            return 0.0
        levels = self.table.get(field)
        if levels is None:
            return 0.0
        if level in NO_EVIDENCE_UNLESS_LISTED and level not in levels:
            return 0.0
        return levels.get(level, levels.get(Level.DISAGREE, 0.0))

    def total(self, levels: Mapping[Field, Level]) -> float:
        flat = self._flat
        return sum(flat.get(item, 0.0) for item in levels.items())

    def score(
        self, a: Demographics, levels: Mapping[Field, Level], b: Demographics | None = None
    ) -> float:
        """The pair's weight: ``total`` with exact name agreements weighed by how common
        the name is (``a`` is either record: on EXACT both hold the same value), and
        family and given name swapped (TRANSPOSED, with ``b``) weighed as the two names
        agreeing (`transposed_weight`)."""
        total = self.total(levels)
        for f, tf in self.term_frequencies.items():
            if levels.get(f) is Level.EXACT and (value := TERM_VALUES[f](a)) is not None:
                total += tf.weight(value) - self._flat.get((f, Level.EXACT), 0.0)
        if (
            b is not None
            and levels.get(Field.FAMILY) is Level.TRANSPOSED
            and levels.get(Field.GIVEN) is Level.TRANSPOSED
        ):
            flat = self._flat
            total += self.transposed_weight(a, b) - (
                flat.get((Field.FAMILY, Level.TRANSPOSED), 0.0)
                + flat.get((Field.GIVEN, Level.TRANSPOSED), 0.0)
            )
        return total

    def transposed_weight(self, a: Demographics, b: Demographics) -> float:
        """What family and given name swapped between two records weigh: the two names
        agreeing, as EXACT on both would weigh them (term frequencies included).

        A swap is a keying error of one record, as likely in a stranger's record as in the
        person's own, so its rate cancels out of m/u: the evidence is the names. (u for
        the level from random pairs is next to nothing — strangers' records hardly ever
        carry each other's names swapped — and would make a swap of two common names
        weigh more than typing them right.) Each name is weighed as the commoner of its
        two readings (the record in the right order is not known)."""
        out = 0.0
        for f in (Field.FAMILY, Field.GIVEN):
            tf = self.term_frequencies.get(f)
            value_of = TERM_VALUES[f]
            readings = [v for v in (value_of(a), value_of(b)) if v is not None]
            if tf is None or not readings:
                out += self._flat.get((f, Level.EXACT), 0.0)
            else:
                out += min(tf.weight(v) for v in readings)
        return out


DEFAULT_WEIGHTS = MatchWeights.from_probabilities(PRIOR_PROBABILITIES)


class WeightEstimator(Protocol):
    """Learns m and u from the comparison vectors of candidate pairs (the blocked pairs the
    index produces). ``domain/em.py`` implements it by expectation–maximisation; its output
    is a drop-in `ProbabilityTable` for `MatchWeights.from_probabilities`."""

    def estimate(
        self, comparisons: Iterable[Mapping[Field, Level]], start: ProbabilityTable
    ) -> ProbabilityTable: ...
