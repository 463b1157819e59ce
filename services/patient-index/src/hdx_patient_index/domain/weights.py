"""Fellegi–Sunter weights: for each field and agreement level, m and u probabilities.

- m = P(level | the two records are the same person): how often true matches look like this
  (typing errors, people moving house, marriage).
- u = P(level | they are different people): how often it happens by chance.

A level's weight is log2(m / u); a pair's weight is the sum over fields (fields are taken as
independent given match status — the usual Fellegi–Sunter assumption). MISSING weighs 0.

The priors below are hand-set from what is published about UK patient registers (names from
an English population, NHS-style birth dates and postcodes) and are deliberately round. Each
field's m values and u values sum to about 1 over its levels. The seam for learning them from
the data is `WeightEstimator`: an expectation–maximisation implementation returns the same
shape of table and `MatchWeights.from_probabilities` turns it into weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from hdx_patient_index.domain.comparators import Field, Level

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
    # A full postcode is ~15 households; people move, so m is well under 1.
    F.POSTCODE: {
        L.EXACT: (0.70, 0.0005),
        L.DISTRICT: (0.10, 0.01),
        L.DISAGREE: (0.20, 0.9895),
    },
    # A phone line is shared by a household; numbers change often.
    F.PHONE: {
        L.EXACT: (0.55, 0.0002),
        L.DISAGREE: (0.45, 0.9998),
    },
    # The same value in the same (untrusted) system: strong, but registrations get duplicated.
    F.IDENTIFIER: {
        L.EXACT: (0.90, 0.00001),
        L.DISAGREE: (0.10, 0.99999),
    },
}


@dataclass(frozen=True)
class MatchWeights:
    """log2(m/u) per field and level; a level a table leaves out weighs as DISAGREE."""

    table: Mapping[Field, Mapping[Level, float]]

    @classmethod
    def from_probabilities(cls, probabilities: ProbabilityTable) -> MatchWeights:
        table: dict[Field, dict[Level, float]] = {}
        for field, levels in probabilities.items():
            for level, (m, u) in levels.items():
                if not (0 < m <= 1 and 0 < u <= 1):
                    raise ValueError(f"{field}/{level}: m and u must be in (0, 1]")
                table.setdefault(field, {})[level] = math.log2(m / u)
        return cls(table)

    def weight(self, field: Field, level: Level) -> float:
        if level is Level.MISSING:
            return 0.0
        levels = self.table.get(field)
        if levels is None:
            return 0.0
        return levels.get(level, levels.get(Level.DISAGREE, 0.0))

    def total(self, levels: Mapping[Field, Level]) -> float:
        return sum(self.weight(f, lv) for f, lv in levels.items())


DEFAULT_WEIGHTS = MatchWeights.from_probabilities(PRIOR_PROBABILITIES)


class WeightEstimator(Protocol):
    """Learns m and u from the comparison vectors of candidate pairs (the blocked pairs the
    index produces), e.g. by expectation–maximisation. Not implemented yet: HDX runs on the
    priors above; an estimator's output is a drop-in `ProbabilityTable`."""

    def estimate(
        self, comparisons: Iterable[Mapping[Field, Level]], start: ProbabilityTable
    ) -> ProbabilityTable: ...
