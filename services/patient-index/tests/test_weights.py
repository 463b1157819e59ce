"""Fellegi–Sunter weights: levels, priors, and model tables written before a level existed."""

from __future__ import annotations

import math

import pytest

from hdx_patient_index.domain.comparators import Field as F
from hdx_patient_index.domain.comparators import Level as L
from hdx_patient_index.domain.comparators import compare
from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.weights import (
    DEFAULT_WEIGHTS,
    PRIOR_PROBABILITIES,
    MatchWeights,
    TermFrequencies,
)


def test_a_middle_name_on_one_side_only_weighs_a_little_against_by_the_priors() -> None:
    m, u = PRIOR_PROBABILITIES[F.MIDDLE][L.ONE_SIDED]
    assert DEFAULT_WEIGHTS.weight(F.MIDDLE, L.ONE_SIDED) == pytest.approx(math.log2(m / u))
    assert -1 < DEFAULT_WEIGHTS.weight(F.MIDDLE, L.ONE_SIDED) < 0
    # Both with middle names that differ says much more.
    assert DEFAULT_WEIGHTS.weight(F.MIDDLE, L.DISAGREE) < -3


@pytest.mark.parametrize("f", list(PRIOR_PROBABILITIES))
def test_each_fields_priors_sum_to_about_one(f: F) -> None:
    levels = PRIOR_PROBABILITIES[f]
    assert sum(m for m, _ in levels.values()) == pytest.approx(1, abs=0.02)
    assert sum(u for _, u in levels.values()) == pytest.approx(1, abs=0.02)


def test_a_table_without_the_one_sided_level_weighs_it_as_nothing_not_as_disagree() -> None:
    # A model file written before the level existed compared such pairs as missing.
    table = {F.MIDDLE: {L.EXACT: 5.0, L.DISAGREE: -4.0}, F.GIVEN: {L.EXACT: 6.0, L.DISAGREE: -4}}
    w = MatchWeights(table)
    assert w.weight(F.MIDDLE, L.ONE_SIDED) == 0.0
    assert w.total({F.MIDDLE: L.ONE_SIDED, F.GIVEN: L.EXACT}) == 6.0
    # Other unlisted levels still weigh as DISAGREE.
    assert w.weight(F.MIDDLE, L.INITIAL) == -4.0


def test_names_swapped_weigh_as_the_two_names_agreeing_the_commoner_reading_first() -> None:
    tf = {
        F.FAMILY: TermFrequencies(0.88, {"smith": 0.02, "leo": 0.0001}, 1e-5),
        F.GIVEN: TermFrequencies(0.84, {"leo": 0.01}, 1e-5),
    }
    w = MatchWeights(DEFAULT_WEIGHTS.table, tf)
    right = Demographics(family="smith", given=("leo",))
    swapped = Demographics(family="leo", given=("smith",))
    levels = compare(right, swapped)
    assert levels[F.FAMILY] is L.TRANSPOSED and levels[F.GIVEN] is L.TRANSPOSED
    # As 'smith' and 'leo' typed right would weigh — not more, however rare a swap is.
    expected = tf[F.FAMILY].weight("smith") + tf[F.GIVEN].weight("leo")
    assert w.score(right, levels, swapped) == pytest.approx(expected)
    assert w.score(swapped, levels, right) == pytest.approx(expected)
    both_right = {F.FAMILY: L.EXACT, F.GIVEN: L.EXACT}
    assert w.score(right, levels, swapped) == pytest.approx(w.score(right, both_right))
    # Without term frequencies: the EXACT weights of both fields.
    plain = DEFAULT_WEIGHTS.score(right, levels, swapped)
    assert plain == pytest.approx(DEFAULT_WEIGHTS.total(both_right))
