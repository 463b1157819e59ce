"""Expectation–maximisation of the Fellegi–Sunter m and u probabilities (domain/em.py)."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from datetime import date, timedelta

import orjson
import pytest

from hdx_patient_index.domain.blocking import index_keys
from hdx_patient_index.domain.comparators import Field, Level, compare
from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.em import (
    ExpectationMaximisation,
    MatchModel,
    ModelError,
    anchor_counts,
    blocked_pairs,
    estimate_model,
    estimate_u,
    exact_agreement,
    household_lifted,
    level_vectors,
    random_match_rate,
    random_pairs,
    term_frequencies,
    u_among_nonmatches,
    with_exact,
)
from hdx_patient_index.domain.identifiers import Identifier
from hdx_patient_index.domain.matching import Hold
from hdx_patient_index.domain.weights import (
    DEFAULT_WEIGHTS,
    PRIOR_PROBABILITIES,
    TermFrequencies,
    WeightEstimator,
)

F, L = Field, Level
Table = dict[Field, dict[Level, tuple[float, float]]]


def sample(
    truth: Table, match_proportion: float, n: int, seed: int, missing: float = 0.0
) -> list[dict[Field, Level]]:
    """Comparison vectors drawn from a known two-class model (fields independent)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        is_match = rng.random() < match_proportion
        vector = {}
        for f, levels in truth.items():
            if rng.random() < missing:
                vector[f] = L.MISSING
                continue
            names = list(levels)
            weights = [levels[lv][0 if is_match else 1] for lv in names]
            vector[f] = rng.choices(names, weights)[0]
        out.append(vector)
    return out


TRUTH_A: Table = {
    F.FAMILY: {L.EXACT: (0.85, 0.01), L.FUZZY_HIGH: (0.10, 0.04), L.DISAGREE: (0.05, 0.95)},
    F.GIVEN: {L.EXACT: (0.80, 0.02), L.NICKNAME: (0.10, 0.01), L.DISAGREE: (0.10, 0.97)},
    F.BIRTH_DATE: {
        L.EXACT: (0.90, 0.001),
        L.ONE_DIGIT: (0.06, 0.02),
        L.DISAGREE: (0.04, 0.979),
    },
    F.ADDRESS: {L.EXACT: (0.60, 0.005), L.DISAGREE: (0.40, 0.995)},
}
# Noisier data: more typos among matches, more chance agreement among non-matches.
TRUTH_B: Table = {
    F.FAMILY: {L.EXACT: (0.70, 0.05), L.FUZZY_HIGH: (0.20, 0.10), L.DISAGREE: (0.10, 0.85)},
    F.GIVEN: {L.EXACT: (0.65, 0.05), L.NICKNAME: (0.20, 0.05), L.DISAGREE: (0.15, 0.90)},
    F.BIRTH_DATE: {L.EXACT: (0.75, 0.01), L.ONE_DIGIT: (0.15, 0.05), L.DISAGREE: (0.10, 0.94)},
    F.ADDRESS: {L.EXACT: (0.50, 0.02), L.DISAGREE: (0.50, 0.98)},
}


def flat_start(truth: Table) -> Table:
    """A deliberately uninformed start for m (uniform over levels), u at its truth — what
    estimate_model does: u from random pairs, m learnt."""
    return {f: {lv: (1 / len(ls), ls[lv][1]) for lv in ls} for f, ls in truth.items()}


# (truth, match proportion among the pairs, missing share, m tolerance)
CONVERGENCE_CASES = [
    ("clean, 30 % matches", TRUTH_A, 0.30, 0.0, 0.02),
    ("clean, 5 % matches", TRUTH_A, 0.05, 0.0, 0.03),
    ("noisy, 50 % matches", TRUTH_B, 0.50, 0.0, 0.03),
    ("noisy, 20 % matches, 15 % missing", TRUTH_B, 0.20, 0.15, 0.04),
]


@pytest.mark.parametrize(
    ("truth", "lam", "missing", "tolerance"),
    [c[1:] for c in CONVERGENCE_CASES],
    ids=[c[0] for c in CONVERGENCE_CASES],
)
def test_em_recovers_m_and_the_match_proportion(
    truth: Table, lam: float, missing: float, tolerance: float
) -> None:
    vectors = sample(truth, lam, 20_000, seed=7, missing=missing)
    result = ExpectationMaximisation(m_prior_pairs=1.0).fit(vectors, flat_start(truth))
    assert result.converged and result.iterations < 200
    assert result.match_proportion == pytest.approx(lam, abs=0.02)
    for f, levels in truth.items():
        for level, (m, u) in levels.items():
            got_m, got_u = result.probabilities[f][level]
            assert got_m == pytest.approx(m, abs=tolerance), (f, level)
            assert got_u == u  # held fixed


def test_em_can_estimate_u_too() -> None:
    vectors = sample(TRUTH_A, 0.3, 20_000, seed=11)
    start = {
        f: {
            lv: (min(0.9, m * 1.2) if lv is L.EXACT else m, u * 2 if lv is L.EXACT else u)
            for lv, (m, u) in ls.items()
        }
        for f, ls in TRUTH_A.items()
    }
    result = ExpectationMaximisation(estimate_u=True, m_prior_pairs=1, u_prior_pairs=1).fit(
        vectors, start
    )
    assert result.converged
    for f, levels in TRUTH_A.items():
        for level, (m, u) in levels.items():
            got_m, got_u = result.probabilities[f][level]
            assert got_m == pytest.approx(m, abs=0.03)
            assert got_u == pytest.approx(u, abs=0.01)


def test_em_is_a_weight_estimator_and_its_log_likelihood_rises() -> None:
    estimator: WeightEstimator = ExpectationMaximisation()
    vectors = sample(TRUTH_B, 0.4, 5_000, seed=3)
    table = estimator.estimate(vectors, flat_start(TRUTH_B))
    assert set(table) == set(TRUTH_B)
    one = ExpectationMaximisation(max_iterations=1).fit(vectors, flat_start(TRUTH_B))
    many = ExpectationMaximisation().fit(vectors, flat_start(TRUTH_B))
    assert many.log_likelihood > one.log_likelihood
    assert not one.converged


def test_levels_the_table_does_not_list_count_as_disagree_and_missing_as_nothing() -> None:
    start: Table = {F.FAMILY: {L.EXACT: (0.5, 0.1), L.DISAGREE: (0.5, 0.9)}}
    vectors = [{F.FAMILY: L.PHONETIC}] * 50 + [{F.FAMILY: L.MISSING}] * 1_000
    result = ExpectationMaximisation(m_prior_pairs=0.0).fit(vectors, start)
    assert result.pairs == 1_050
    m_disagree = result.probabilities[F.FAMILY][L.DISAGREE][0]
    assert m_disagree == pytest.approx(1.0)  # every non-missing value was a disagreement


def test_conditioned_fields_are_left_out_and_keep_their_start() -> None:
    """Pairs blocked on the birth date all agree on it; left in, its tiny random-pair u
    would make every pair look like a match."""
    truth: Table = {f: ls for f, ls in TRUTH_A.items() if f is not F.BIRTH_DATE}
    vectors = [v | {F.BIRTH_DATE: L.EXACT} for v in sample(truth, 0.3, 10_000, seed=5)]
    start = flat_start(TRUTH_A)
    result = ExpectationMaximisation().fit(vectors, start, conditioned=frozenset({F.BIRTH_DATE}))
    assert result.probabilities[F.BIRTH_DATE] == start[F.BIRTH_DATE]
    assert result.match_proportion == pytest.approx(0.3, abs=0.03)
    naive = ExpectationMaximisation().fit(vectors, start)
    assert naive.match_proportion > 0.9


def test_priors_keep_levels_the_data_never_shows_above_zero() -> None:
    u = estimate_u([{F.FAMILY: L.DISAGREE}] * 10_000)
    assert all(p > 0 for levels in u.values() for p in levels.values())
    assert u[F.FAMILY][L.EXACT] == pytest.approx(1_000 * 0.004 / 11_000, rel=0.01)
    assert sum(u[F.FAMILY].values()) == pytest.approx(1.0)


def test_random_pairs_are_distinct_ordered_and_seeded() -> None:
    pairs = random_pairs(50, 500, random.Random(1))
    assert len(pairs) == len(set(pairs)) == 500
    assert all(i < j for i, j in pairs)
    assert pairs == random_pairs(50, 500, random.Random(1))
    assert len(random_pairs(4, 100, random.Random(1))) == 6  # all there are


def _people(n: int, seed: int) -> list[Demographics]:
    """Small records with duplicates: each person once or twice, sometimes with a typo."""
    rng = random.Random(seed)
    families = ["smith", "jones", "patel", "lovelace", "hopper", "turing", "noether", "curie"]
    givens = ["ada", "grace", "alan", "emmy", "marie", "john", "mary", "james", "sam"]
    out: list[Demographics] = []
    for i in range(n):
        family = f"{rng.choice(families)}{rng.choice(['', 'son', 'ley', 'ton', 'field'])}"
        given = rng.choice(givens)
        born = date(1930, 1, 1) + timedelta(days=rng.randrange(30_000))
        postcode = f"LS{rng.randrange(1, 30)}{rng.randrange(1, 9)}AB"
        person = Demographics(
            family=family,
            given=(given,),
            birth_date=born,
            birth_year=born.year,
            gender=rng.choice(["male", "female"]),
            postcodes=(postcode,),
            addresses=(f"{i % 200 + 1} station rd",),
        )
        out.append(person)
        if rng.random() < 0.5:
            typo = family[:-1] if rng.random() < 0.3 else family
            out.append(
                Demographics(
                    family=typo,
                    given=person.given,
                    birth_date=born,
                    birth_year=born.year,
                    gender=person.gender,
                    postcodes=person.postcodes,
                )
            )
    return out


def test_a_model_from_records_alone_is_sane_reproducible_and_round_trips() -> None:
    records = _people(600, seed=2)
    model = estimate_model(records, seed=9, n_random_pairs=5_000)
    assert [s["converged"] for s in model.training["sessions"]] == [True, True]
    weights = model.weights(term_frequencies=False)
    for f in (F.FAMILY, F.GIVEN, F.BIRTH_DATE):
        assert weights.weight(f, L.EXACT) > 0 > weights.weight(f, L.DISAGREE), f
    assert all(math.isfinite(w) for ls in weights.table.values() for w in ls.values())
    again = estimate_model(records, seed=9, n_random_pairs=5_000)
    assert again.dumps() == model.dumps()
    loaded = MatchModel.loads(model.dumps())
    assert loaded == model
    assert loaded.weights() == model.weights()
    assert F.FAMILY in model.term_frequencies


def test_a_model_file_of_another_version_is_refused() -> None:
    doc = estimate_model(_people(100, seed=1), n_random_pairs=500).to_json()
    doc["version"] = 99
    with pytest.raises(ValueError, match="version"):
        MatchModel.from_json(doc)


def test_blocked_pairs_share_a_key_of_the_prefix() -> None:
    a = Demographics(family="smith", given=("ada",), birth_date=date(1990, 1, 2), birth_year=1990)
    b = Demographics(family="jones", given=("bob",), birth_date=date(1990, 1, 2), birth_year=1990)
    c = Demographics(family="smith", given=("ada",), birth_date=date(1970, 5, 6), birth_year=1970)
    assert blocked_pairs([a, b, c], "d:") == [(0, 1)]
    assert blocked_pairs([a, b, c], "n:") == [(0, 2)]
    assert blocked_pairs([a, b, c], "d:", max_block=1) == []
    # Keys made once for both sessions give the same pairs.
    keys = [index_keys(d) for d in (a, b, c)]
    assert blocked_pairs([a, b, c], "d:", keys=keys) == [(0, 1)]
    assert blocked_pairs([a, b, c], "n:", keys=keys) == [(0, 2)]


def test_level_vectors_count_each_distinct_vector_over_the_table() -> None:
    agree = {F.FAMILY: L.EXACT, F.GIVEN: L.EXACT}
    vectors = level_vectors([agree, agree, {F.FAMILY: L.DISAGREE}])
    fields = list(PRIOR_PROBABILITIES)
    assert sum(vectors.values()) == 3 and len(vectors) == 2
    assert vectors[tuple(agree.get(f, L.MISSING) for f in fields)] == 2
    only = {F.FAMILY: L.DISAGREE}
    assert vectors[tuple(only.get(f, L.MISSING) for f in fields)] == 1


def test_anchor_pairs_compared_once_with_the_sessions() -> None:
    records = [
        replace(d, identifiers=(Identifier("urn:hospital", "H1" if n % 3 else "H2"),))
        for n, d in enumerate(_people(12, seed=4))
    ]
    cache: dict[tuple[int, int], dict[Field, Level]] = {}
    assert anchor_counts(records, compared=cache) == anchor_counts(records)
    assert cache and all(i < j for i, j in cache)
    assert all(levels == compare(records[i], records[j]) for (i, j), levels in cache.items())


def test_term_frequencies_count_shares_and_floor_the_rest() -> None:
    records = [Demographics(family="smith")] * 3 + [Demographics(family="lovelace")]
    tf = term_frequencies(records, {F.FAMILY: 0.9})[F.FAMILY]
    assert tf.shares == {"smith": 0.75}
    assert tf.floor == 0.25
    assert tf.weight("smith") < tf.weight("lovelace") == tf.weight("never-seen")
    assert PRIOR_PROBABILITIES[F.FAMILY][L.EXACT][0] == pytest.approx(0.88)


def test_exact_agreement_is_counted_from_the_values() -> None:
    records = [Demographics(family="smith")] * 3 + [
        Demographics(family="jones"),
        Demographics(family=None),
    ]
    # 3·2 ordered pairs of smiths among 4·3 ordered pairs of records with a family name.
    assert exact_agreement(records)[F.FAMILY] == pytest.approx(6 / 12)
    u = with_exact({F.FAMILY: {L.EXACT: 0.1, L.FUZZY_HIGH: 0.3, L.DISAGREE: 0.6}}, {F.FAMILY: 0.5})
    assert u[F.FAMILY] == pytest.approx({L.EXACT: 0.5, L.FUZZY_HIGH: 0.5 / 3, L.DISAGREE: 1 / 3})


def prior_model() -> MatchModel:
    """A model that holds exactly the priors (what the service runs on without a file)."""
    return MatchModel(
        m={f: {lv: p[0] for lv, p in ls.items()} for f, ls in PRIOR_PROBABILITIES.items()},
        u={f: {lv: p[1] for lv, p in ls.items()} for f, ls in PRIOR_PROBABILITIES.items()},
        match_proportion=0.1,
        term_frequencies={F.FAMILY: TermFrequencies(0.88, {"smith": 0.01}, 1e-5)},
        training={"records": 0},
    )


def test_a_model_of_the_priors_weighs_as_the_priors_and_round_trips_through_text() -> None:
    model = prior_model()
    assert model.weights(term_frequencies=False) == DEFAULT_WEIGHTS
    assert MatchModel.loads(model.dumps()) == model
    assert MatchModel.loads(model.dumps().decode()) == model


def test_a_model_written_before_the_one_sided_middle_level_loads_and_weighs_it_as_nothing() -> None:
    doc = orjson.loads(prior_model().dumps())
    del doc["m"]["middle"]["one-sided"], doc["u"]["middle"]["one-sided"]
    for side in ("m", "u"):  # the other levels as they were, summing to about 1
        total = sum(doc[side]["middle"].values())
        doc[side]["middle"] = {lv: p / total for lv, p in doc[side]["middle"].items()}
    weights = MatchModel.from_json(doc).weights()
    assert weights.weight(F.MIDDLE, L.ONE_SIDED) == 0.0
    assert weights.weight(F.MIDDLE, L.DISAGREE) < 0


def _broken(change: str) -> object:
    doc = orjson.loads(prior_model().dumps())
    if change == "not an object":
        return [doc]
    if change == "no m":
        del doc["m"]
    elif change == "a field missing":
        del doc["m"]["birth_date"], doc["u"]["birth_date"]
    elif change == "unknown field":
        doc["m"]["shoe_size"] = doc["u"]["shoe_size"] = {"exact": 0.5, "disagree": 0.5}
    elif change == "unknown level":
        doc["m"]["gender"]["maybe"] = doc["u"]["gender"]["maybe"] = 0.1
    elif change == "missing has no probability":
        doc["m"]["gender"]["missing"] = doc["u"]["gender"]["missing"] = 0.1
    elif change == "levels differ":
        del doc["u"]["phone"]["exact"]
    elif change == "no disagree":
        doc["m"]["gender"] = doc["u"]["gender"] = {"exact": 1.0}
    elif change == "zero probability":
        doc["u"]["identifier"]["exact"] = 0
    elif change == "above one":
        doc["m"]["gender"]["exact"] = 1.5
    elif change == "a string":
        doc["m"]["gender"]["exact"] = "0.98"
    elif change == "does not sum to one":
        doc["m"]["family"]["exact"] = 0.5
    elif change == "match proportion":
        doc["match_proportion"] = 1.0
    elif change == "term frequencies of a date":
        doc["term_frequencies"]["birth_date"] = doc["term_frequencies"]["family"]
    elif change == "term frequency share":
        doc["term_frequencies"]["family"]["shares"]["smith"] = -1
    return doc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("not an object", "JSON object"),
        ("no m", "'m' is missing"),
        ("a field missing", "m has no field 'birth_date'"),
        ("unknown field", "unknown field 'shoe_size'"),
        ("unknown level", "unknown level 'maybe'"),
        ("missing has no probability", "'missing' has no probability"),
        ("levels differ", "phone: m and u do not list the same levels"),
        ("no disagree", "gender: no 'disagree' level"),
        ("zero probability", r"u.identifier.exact: 0.0 is not a probability"),
        ("above one", r"m.gender.exact: 1.5 is not a probability"),
        ("a string", "is not a number"),
        ("does not sum to one", "family: m sums to 0.6200, not 1"),
        ("match proportion", r"match_proportion 1.0 is not in \(0, 1\)"),
        ("term frequencies of a date", "'birth_date' is not a name field"),
        ("term frequency share", "shares.smith: -1.0 is not a probability"),
    ],
)
def test_a_broken_model_document_is_refused_saying_what_is_wrong(change: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        MatchModel.from_json(_broken(change))


@pytest.mark.parametrize("text", [b"", b"{not json", b"null", b"[]", b'{"version": 1}'])
def test_text_that_is_not_a_model_is_refused(text: bytes) -> None:
    with pytest.raises(ModelError):
        MatchModel.loads(text)


def _evidence(
    agreeing: float, shaped: float, anchor_agreeing: float, anchor_shaped: float
) -> dict[str, float]:
    return {
        "pairs_agreeing": agreeing,
        "pairs_shaped": shaped,
        "anchor_agreeing": anchor_agreeing,
        "anchor_shaped": anchor_shaped,
    }


@pytest.mark.parametrize(
    ("evidence", "lifted"),
    [
        # 1 in 10 of a person's own records differ in the given name: of 200 pairs born
        # together at one home, 20 twin-shaped pairs would be one person's records.
        (_evidence(200, 22, 1000, 100), True),
        (_evidence(200, 28, 1000, 100), True),  # within two Poisson deviations (20 + 8.9)
        (_evidence(200, 30, 1000, 100), False),
        (_evidence(200, 60, 1000, 100), False),  # twins: more than the records explain
        (_evidence(3600, 250, 4000, 35), False),  # the synthetic set's twins
        (_evidence(50, 5, 1000, 100), False),  # too few pairs to show twins either way
        (_evidence(200, 0, 0, 0), False),  # no identifier shared: nothing to compare with
        (_evidence(200, 1, 1000, 0), False),  # a person's records never look so; one does
    ],
)
def test_a_hard_negative_rule_is_lifted_only_when_the_data_show_no_need_for_it(
    evidence: dict[str, float], lifted: bool
) -> None:
    assert household_lifted(evidence) is lifted


def test_lifted_holds_come_from_the_model_and_undated_goes_with_generation() -> None:
    base = prior_model()
    assert base.lifted_holds() == frozenset()  # no household evidence: every rule holds
    clear = _evidence(200, 22, 1000, 100)
    twins = _evidence(200, 80, 1000, 100)
    model = MatchModel(
        base.m, base.u, base.match_proportion, household={"twin": clear, "generation": twins}
    )
    assert model.lifted_holds() == {Hold.TWIN}
    model = MatchModel(
        base.m, base.u, base.match_proportion, household={"twin": twins, "generation": clear}
    )
    assert model.lifted_holds() == {Hold.GENERATION, Hold.UNDATED}
    assert MatchModel.loads(model.dumps()) == model
    doc = orjson.loads(model.dumps())
    doc["household"] = {"cousin": clear}
    with pytest.raises(ModelError, match="unknown rule"):
        MatchModel.from_json(doc)
    doc["household"] = {"twin": {"pairs_shaped": -1}}
    with pytest.raises(ModelError, match="negative"):
        MatchModel.from_json(doc)


def test_a_model_counts_household_evidence_from_the_records() -> None:
    model = estimate_model(_people(600, seed=2), seed=9, n_random_pairs=5_000)
    assert set(model.household) == {"twin", "generation"}
    # No identifiers in these records: nothing shows how a person's own records differ.
    assert model.household["twin"]["anchor_agreeing"] == 0
    assert model.lifted_holds() == frozenset()


def _random_sample(matches: int, strangers_sharing_a_phone: int = 0) -> list[dict[Field, Level]]:
    """30,000 random pairs: strangers who disagree on everything, a few who share a phone
    (a household), and ``matches`` pairs of one person who agree on nearly everything."""
    stranger = dict.fromkeys(PRIOR_PROBABILITIES, L.DISAGREE)
    household = stranger | {F.PHONE: L.EXACT, F.FAMILY: L.EXACT}
    person = stranger | {
        F.FAMILY: L.EXACT,
        F.GIVEN: L.EXACT,
        F.BIRTH_DATE: L.EXACT,
        F.ADDRESS: L.EXACT,
        F.IDENTIFIER: L.EXACT,
    }
    rest = 30_000 - matches - strangers_sharing_a_phone
    return [person] * matches + [household] * strangers_sharing_a_phone + [stranger] * rest


def _m_and_u() -> tuple[dict[Field, dict[Level, float]], dict[Field, dict[Level, float]]]:
    m = {f: {lv: p[0] for lv, p in levels.items()} for f, levels in PRIOR_PROBABILITIES.items()}
    u = {f: {lv: p[1] for lv, p in levels.items()} for f, levels in PRIOR_PROBABILITIES.items()}
    return m, u


def test_u_among_nonmatches_does_not_depend_on_how_many_matches_the_sample_holds() -> None:
    # A seed's sample holds a Poisson count of one person's pairs (FEBRL4: ~3); each agrees
    # on the same identifier. Counted as strangers they set u of that level (5 of them: u
    # ~1.6e-4, 12 bits less than none); weighed by their posterior they are taken out.
    m, u = _m_and_u()
    rate = 1e-4
    found = [
        u_among_nonmatches(_random_sample(k), m, estimate_u(_random_sample(k)), rate)
        for k in (0, 1, 5)
    ]
    for f in (F.IDENTIFIER, F.ADDRESS, F.FAMILY):
        for k in (1, 2):
            assert found[k][f][L.EXACT] == pytest.approx(found[0][f][L.EXACT], rel=1e-3)
    naive = estimate_u(_random_sample(5))[F.IDENTIFIER][L.EXACT]
    assert math.log2(naive / found[2][F.IDENTIFIER][L.EXACT]) > 8
    # No stranger shows the level: the priors' pseudo-count share, as estimate_u gives it.
    assert found[0][F.IDENTIFIER][L.EXACT] == pytest.approx(
        estimate_u(_random_sample(0))[F.IDENTIFIER][L.EXACT]
    )
    for levels in found[2].values():
        assert sum(levels.values()) == pytest.approx(1.0)
    # Without a random match rate there is nothing to take out.
    assert u_among_nonmatches(_random_sample(5), m, u, 0.0) == u


def test_u_among_nonmatches_keeps_what_strangers_share() -> None:
    # A household shares a phone: strangers' agreement is u's business, and stays in it.
    m, u = _m_and_u()
    sample = _random_sample(3, strangers_sharing_a_phone=30)
    found = u_among_nonmatches(sample, m, estimate_u(sample), 1e-4)
    assert found[F.PHONE][L.EXACT] == pytest.approx(30 / 30_000, rel=0.05)
    # Fields left out keep the u they came with.
    kept = u_among_nonmatches(sample, m, u, 1e-4, fields=[F.PHONE])
    assert kept[F.IDENTIFIER] == u[F.IDENTIFIER]


def test_u_among_nonmatches_takes_counted_exact_agreement_less_the_expected_matches() -> None:
    m, u = _m_and_u()
    rate = 1e-4
    share = 5e-3  # family names counted over all records: matches and strangers alike
    found = u_among_nonmatches(_random_sample(0), m, u, rate, {F.FAMILY: share})
    expected = (share - rate * m[F.FAMILY][L.EXACT]) / (1 - rate)
    assert found[F.FAMILY][L.EXACT] == pytest.approx(expected)
    assert sum(found[F.FAMILY].values()) == pytest.approx(1.0)
    # Never below the priors' pseudo-count share over the random pairs.
    floor = u_among_nonmatches(_random_sample(0), m, u, rate, {F.FAMILY: 1e-9})
    prior = PRIOR_PROBABILITIES[F.FAMILY]
    assert floor[F.FAMILY][L.EXACT] == pytest.approx(
        1_000 * prior[L.EXACT][1] / sum(p[1] for p in prior.values()) / 31_000
    )


def test_a_model_u_is_the_same_whatever_the_seed_for_levels_only_matches_reach() -> None:
    # Records whose persons each have two records sharing an identifier: a random pair
    # shares one only when it is one person's, so u of a shared identifier must not
    # depend on how many of them the seed's random pairs caught.
    records: list[Demographics] = []
    person = 0
    for d in _people(400, seed=3):
        person = len(records) if d.addresses else person  # a duplicate has no address line
        records.append(replace(d, identifiers=(Identifier("urn:hospital", f"H{person * 7919}"),)))
    us = {
        estimate_model(records, seed=s, n_random_pairs=5_000).u[F.IDENTIFIER][L.EXACT]
        for s in range(4)
    }
    assert max(us) / min(us) < 1.01


def test_the_random_match_rate_comes_from_the_birth_date_session() -> None:
    sessions = [
        {"keys": "d:", "match_proportion": 0.5, "pairs": 900},
        {"keys": "n:", "match_proportion": 0.9, "pairs": 10},
    ]
    # 450 matches share a birth date, 90 % of matches do: 500 of 1000 × 999 / 2 pairs.
    assert random_match_rate(1000, sessions, 0.9) == pytest.approx(500 / 499_500)
    assert random_match_rate(1000, sessions[1:], 0.9) == 0.0


def test_a_model_records_the_random_match_rate_and_keeps_the_birth_date_u() -> None:
    model = estimate_model(_people(600, seed=2), seed=9, n_random_pairs=5_000)
    assert 0 < model.training["random_pair_match_rate"] < 0.01
    assert "birth_date" not in model.training["u_corrected_for_matches"]
    assert "identifier" in model.training["u_corrected_for_matches"]
