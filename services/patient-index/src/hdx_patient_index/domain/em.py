"""Estimating the Fellegi–Sunter m and u probabilities from the data, never from labels.

A `MatchModel` is what the matcher's weights are made from; it is estimated from a set of
records (demographics) and nothing else:

- **u** — how often each level happens by chance — from pairs of records drawn at random
  (seeded): nearly all random pairs are different people, so their levels are the u
  distribution (the approach Splink takes; true matches among them are ~1 in 10,000).
  Where a level is plain equality of one value (family name, first given name, birth
  date, gender: EXACT) its u is counted from the value counts instead (`exact_agreement`),
  which is exact where sampling is noisy; the field's other levels keep their sampled
  proportions. Once EM has found m, u is counted again over the random pairs that are not
  one person's (`u_among_nonmatches`: each pair weighs by its posterior of being a
  non-match), so the few matches a seed's sample happens to hold do not set u of the
  rare levels they agree on (the same identifier, the same address).
- **m** — how often true matches look like this — and λ, the share of matches among the
  pairs compared, by expectation–maximisation with u held at its random-pair estimate
  (`ExpectationMaximisation`, the `WeightEstimator` seam of weights.py; it can also
  re-estimate u). EM runs in *sessions*, one per kind of blocking key (as Splink does):
  the pairs that share a birth date, then the pairs whose names sound the same. A
  session's pairs all agree on the fields its key is made of, so those fields are left out
  of it (their levels say nothing there, and random-pair u would misfit them); every field
  is estimated by at least one session, and a field estimated by both gets the mean. The
  union of all the index's keys is *not* a good EM sample: pairs brought together by a
  shared postcode are mostly neighbours that agree on the address fields, which the
  random-pair u cannot explain, and EM then calls every pair a match.
- **priors** — `PRIOR_PROBABILITIES` (weights.py) enter both as Dirichlet pseudo-counts:
  ``m_prior_pairs`` pseudo-matches and ``u_prior_pairs`` pseudo-non-matches spread over
  the levels in the priors' proportions. They keep a level that the data never shows away
  from probability 0 (an infinite weight) and pull thinly observed levels towards
  published rates; with thousands of pairs the data dominate.
- **term frequencies** — the share of records holding each family and given name, so that
  agreeing on a common name weighs less (`TermFrequencies`).

Levels a field's priors do not list count as DISAGREE (as `MatchWeights` weighs them), and
MISSING is no evidence either way: it is left out of both the E and the M step.

The model is a plain dataclass that round-trips through JSON (`to_json`/`from_json`,
`dumps`/`loads`), so a decision can be reproduced from the model file it was made with.
Reading checks the document through and says what is wrong (`ModelError`): a corrupt or
hand-broken model must stop the service, never weigh records. Reading and writing the file
is the service's adapter's business (match_model.py); this module stays pure.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from hdx_patient_index.domain.blocking import index_keys
from hdx_patient_index.domain.comparators import Field, Level, compare
from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.matching import Hold, Shape, anchor_shapes, household_shapes
from hdx_patient_index.domain.weights import (
    PRIOR_PROBABILITIES,
    TERM_VALUES,
    MatchWeights,
    ProbabilityTable,
    TermFrequencies,
)

MODEL_VERSION = 1

# Defaults, documented in the module docstring.
M_PRIOR_PAIRS = 100.0  # pseudo-matches behind the m priors
U_PRIOR_PAIRS = 1_000.0  # pseudo-non-matches behind the u priors
RANDOM_PAIRS = 30_000  # random pairs for u (EXACT levels of single values are counted)
MAX_BLOCKED_PAIRS = 200_000  # blocked pairs for EM (a seeded sample beyond that)
MAX_BLOCK = 1_000  # blocks bigger than this are left out of the EM pairs
TF_MIN_SHARE = 1e-5  # a name is never taken to be rarer than 1 in 100,000
START_MATCH_PROPORTION = 0.1
NONMATCH_PASSES = 2  # E steps over the random pairs for u among non-matches

# EM sessions: (the blocking-key prefix whose pairs are used, the fields it conditions on).
SESSIONS: tuple[tuple[str, frozenset[Field]], ...] = (
    ("d:", frozenset({Field.BIRTH_DATE})),
    ("n:", frozenset({Field.FAMILY, Field.GIVEN})),
)

LevelCounts = dict[Field, dict[Level, float]]

# Household evidence (`household_lifted`): a hard-negative rule is lifted only when the
# data hold at least this many pairs of the agreeing shape (enough for twins or
# generations to show if the population has them) ...
MIN_HOUSEHOLD_PAIRS = 100
# ... and no more pairs of the rule's shape than a person's own records explain, within
# this many standard deviations of a Poisson count.
HOUSEHOLD_SIGMAS = 2.0
MAX_ANCHOR_GROUP = 50  # records sharing one identifier value; bigger groups are left out

# hold → (the session whose pairs show it, the shape that agrees, the rule's own shape)
HOUSEHOLD_TESTS: Mapping[Hold, tuple[str, Shape, Shape]] = {
    Hold.TWIN: ("d:", Shape.BORN_TOGETHER, Shape.TWIN),
    Hold.GENERATION: ("n:", Shape.NAMED_ALIKE, Shape.GENERATION),
}


def _canonical(levels: Mapping[Field, Level], table: ProbabilityTable) -> tuple[Level, ...]:
    """A comparison vector over the table's fields, with unlisted levels as DISAGREE."""
    out: list[Level] = []
    for f, known in table.items():
        level = levels.get(f, Level.MISSING)
        if level is not Level.MISSING and level not in known:
            level = Level.DISAGREE
        out.append(level)
    return tuple(out)


def _smoothed(
    counts: Mapping[Level, float], prior: Mapping[Level, float], strength: float
) -> dict[Level, float]:
    """Posterior mean of a Dirichlet(strength × prior) after ``counts``."""
    total = sum(counts.values()) + strength
    prior_total = sum(prior.values())
    return {
        level: (counts.get(level, 0.0) + strength * p / prior_total) / total
        for level, p in prior.items()
    }


@dataclass(frozen=True)
class EMResult:
    probabilities: dict[Field, dict[Level, tuple[float, float]]]
    match_proportion: float
    iterations: int
    converged: bool
    log_likelihood: float
    pairs: int


@dataclass(frozen=True)
class ExpectationMaximisation:
    """EM for the two-class Fellegi–Sunter mixture over comparison vectors (a
    `WeightEstimator`). MAP estimates: ``start`` is also the Dirichlet prior's centre."""

    m_prior_pairs: float = M_PRIOR_PAIRS
    u_prior_pairs: float = U_PRIOR_PAIRS
    estimate_u: bool = False  # u held at ``start`` (estimated from random pairs) by default
    max_iterations: int = 200
    tolerance: float = 1e-6
    start_match_proportion: float = START_MATCH_PROPORTION

    def estimate(
        self, comparisons: Iterable[Mapping[Field, Level]], start: ProbabilityTable
    ) -> ProbabilityTable:
        return self.fit(comparisons, start).probabilities

    def fit(
        self,
        comparisons: Iterable[Mapping[Field, Level]],
        start: ProbabilityTable,
        conditioned: frozenset[Field] = frozenset(),
    ) -> EMResult:
        """EM from ``start``; fields in ``conditioned`` are left out (and keep ``start``)."""
        fields = [f for f in start if f not in conditioned]
        used = {f: start[f] for f in fields}
        raw = Counter(tuple(c.get(f, Level.MISSING) for f in fields) for c in comparisons)
        patterns: Counter[tuple[Level, ...]] = Counter()
        for pattern, n in raw.items():  # unlisted levels → DISAGREE, once per distinct vector
            patterns[_canonical(dict(zip(fields, pattern, strict=True)), used)] += n
        n_pairs = sum(patterns.values())
        m = {f: {lv: p[0] for lv, p in start[f].items()} for f in fields}
        u = {f: {lv: p[1] for lv, p in start[f].items()} for f in fields}
        m_prior = {f: dict(m[f]) for f in fields}
        u_prior = {f: dict(u[f]) for f in fields}
        lam = self.start_match_proportion
        items = list(patterns.items())
        iterations, converged, log_likelihood = 0, False, 0.0
        for iterations in range(1, self.max_iterations + 1):  # noqa: B007
            m_counts: LevelCounts = {f: {} for f in fields}
            u_counts: LevelCounts = {f: {} for f in fields}
            matched = 0.0
            log_likelihood = 0.0
            for pattern, n in items:
                log_m = math.log(lam)
                log_u = math.log(1.0 - lam)
                for f, level in zip(fields, pattern, strict=True):
                    if level is not Level.MISSING:
                        log_m += math.log(m[f][level])
                        log_u += math.log(u[f][level])
                top = max(log_m, log_u)
                log_total = top + math.log(math.exp(log_m - top) + math.exp(log_u - top))
                g = math.exp(log_m - log_total)
                log_likelihood += n * log_total
                matched += n * g
                for f, level in zip(fields, pattern, strict=True):
                    if level is not Level.MISSING:
                        mc, uc = m_counts[f], u_counts[f]
                        mc[level] = mc.get(level, 0.0) + n * g
                        uc[level] = uc.get(level, 0.0) + n * (1.0 - g)
            new_m = {f: _smoothed(m_counts[f], m_prior[f], self.m_prior_pairs) for f in fields}
            new_u = (
                {f: _smoothed(u_counts[f], u_prior[f], self.u_prior_pairs) for f in fields}
                if self.estimate_u
                else u
            )
            new_lam = min(max(matched / n_pairs, 1e-9), 1 - 1e-9) if n_pairs else lam
            change = max(
                [abs(new_lam - lam)]
                + [abs(new_m[f][lv] - m[f][lv]) for f in fields for lv in m[f]]
                + [abs(new_u[f][lv] - u[f][lv]) for f in fields for lv in u[f]]
            )
            m, u, lam = new_m, new_u, new_lam
            if change < self.tolerance:
                converged = True
                break
        probabilities = {
            f: {lv: (m[f][lv], u[f][lv]) for lv in m[f]} if f in m else dict(start[f])
            for f in start
        }
        return EMResult(probabilities, lam, iterations, converged, log_likelihood, n_pairs)


def estimate_u(
    comparisons: Iterable[Mapping[Field, Level]],
    priors: ProbabilityTable = PRIOR_PROBABILITIES,
    prior_pairs: float = U_PRIOR_PAIRS,
) -> dict[Field, dict[Level, float]]:
    """u per field and level from the comparison vectors of random pairs (smoothed)."""
    return _u_counted(level_vectors(comparisons, priors), priors, prior_pairs)


def level_vectors(
    comparisons: Iterable[Mapping[Field, Level]], table: ProbabilityTable = PRIOR_PROBABILITIES
) -> Counter[tuple[Level, ...]]:
    """The comparisons as vectors over the table's fields (MISSING where absent), counted:
    all that u is counted from, without keeping one mapping per pair."""
    fields = list(table)
    return Counter(tuple(c.get(f, Level.MISSING) for f in fields) for c in comparisons)


def _u_counted(
    raw: Counter[tuple[Level, ...]], priors: ProbabilityTable, prior_pairs: float
) -> dict[Field, dict[Level, float]]:
    fields = list(priors)
    counts: LevelCounts = {f: {} for f in priors}
    for pattern, n in raw.items():
        canonical = _canonical(dict(zip(fields, pattern, strict=True)), priors)
        for f, level in zip(fields, canonical, strict=True):
            if level is not Level.MISSING:
                counts[f][level] = counts[f].get(level, 0.0) + n
    return {
        f: _smoothed(counts[f], {lv: p[1] for lv, p in priors[f].items()}, prior_pairs)
        for f in priors
    }


def _birth_date_value(d: Demographics) -> str | None:
    return d.birth_date.isoformat() if d.birth_date else None


def _gender_value(d: Demographics) -> str | None:
    return d.gender


# Fields whose EXACT level is plain equality of one value: its u is counted, not sampled.
EXACT_VALUES: Mapping[Field, Callable[[Demographics], str | None]] = {
    **TERM_VALUES,
    Field.BIRTH_DATE: _birth_date_value,
    Field.GENDER: _gender_value,
}


def exact_agreement(records: Sequence[Demographics]) -> dict[Field, float]:
    """The chance that two distinct records picked at random (both with the field) agree
    exactly, from the value counts: Σ c(c−1) / n(n−1). Exact where sampling random pairs is
    noisy (a birth date agrees in ~1 of 30,000 random pairs)."""
    out: dict[Field, float] = {}
    for f, value_of in EXACT_VALUES.items():
        counts = Counter(v for d in records if (v := value_of(d)) is not None)
        n = sum(counts.values())
        shared = sum(c * (c - 1) for c in counts.values())
        if n > 1 and shared:
            out[f] = shared / (n * (n - 1))
    return out


def with_exact(
    u: Mapping[Field, Mapping[Level, float]], exact: Mapping[Field, float]
) -> dict[Field, dict[Level, float]]:
    """u with the counted EXACT probabilities in, the field's other levels rescaled."""
    out = {f: dict(levels) for f, levels in u.items()}
    for f, p in exact.items():
        levels = out.get(f)
        if levels is None or Level.EXACT not in levels or not 0 < p < 1:
            continue
        rest = 1.0 - levels[Level.EXACT]
        for level in levels:
            levels[level] = p if level is Level.EXACT else levels[level] * (1.0 - p) / rest
    return out


def random_pairs(n_records: int, n_pairs: int, rng: random.Random) -> list[tuple[int, int]]:
    """Up to ``n_pairs`` distinct unordered pairs of distinct records, drawn at random."""
    possible = n_records * (n_records - 1) // 2
    target = min(n_pairs, possible)
    seen: set[tuple[int, int]] = set()
    draw = rng.random
    while len(seen) < target:
        i, j = int(draw() * n_records), int(draw() * (n_records - 1))
        if j >= i:
            j += 1
        seen.add((i, j) if i < j else (j, i))
    return sorted(seen)


def blocked_pairs(
    records: Sequence[Demographics],
    prefix: str,
    max_pairs: int = MAX_BLOCKED_PAIRS,
    max_block: int = MAX_BLOCK,
    rng: random.Random | None = None,
    keys: Sequence[frozenset[str]] | None = None,
) -> list[tuple[int, int]]:
    """The pairs of records that share an index key starting with ``prefix`` (the keys of
    blocking.py), leaving out blocks bigger than ``max_block``; a seeded sample when there
    are more than ``max_pairs``. ``keys``: each record's `index_keys`, if already made."""
    blocks: dict[str, list[int]] = {}
    for i, d in enumerate(records):
        for key in keys[i] if keys is not None else index_keys(d):
            if key.startswith(prefix):
                blocks.setdefault(key, []).append(i)
    pairs: set[tuple[int, int]] = set()
    for bucket in blocks.values():
        if 1 < len(bucket) <= max_block:
            pairs.update(itertools.combinations(bucket, 2))
    ordered = sorted(pairs)
    if len(ordered) > max_pairs:
        ordered = sorted((rng or random.Random(0)).sample(ordered, max_pairs))
    return ordered


def term_frequencies(
    records: Sequence[Demographics],
    m_exact: Mapping[Field, float],
    min_share: float = TF_MIN_SHARE,
) -> dict[Field, TermFrequencies]:
    """Each name's share of the records that have one; names seen once get the floor
    (1/records, but never below ``min_share``)."""
    out: dict[Field, TermFrequencies] = {}
    for f, value_of in TERM_VALUES.items():
        counts = Counter(v for d in records if (v := value_of(d)) is not None)
        total = sum(counts.values())
        if not total or f not in m_exact:
            continue
        floor = max(1.0 / total, min_share)
        shares = {v: c / total for v, c in counts.items() if c > 1}
        out[f] = TermFrequencies(m_exact[f], shares, floor)
    return out


def _share_trusted(a: Demographics, b: Demographics) -> bool:
    return bool(a.trusted and b.trusted) and not {
        (x.system, x.value) for x in a.trusted
    }.isdisjoint((y.system, y.value) for y in b.trusted)


def anchor_counts(
    records: Sequence[Demographics],
    max_group: int = MAX_ANCHOR_GROUP,
    compared: dict[tuple[int, int], dict[Field, Level]] | None = None,
) -> Counter[Shape]:
    """The shapes (`anchor_shapes`) of the pairs of records that share an identifier value
    of one system, trusted or not: one person's records, since family members never share
    one. Their given names and birth dates show how often a person's own records look like
    twins or generations."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, d in enumerate(records):
        for x in (*d.identifiers, *d.trusted):
            if x.system:
                groups.setdefault((x.system, x.value), []).append(i)
    pairs: set[tuple[int, int]] = set()
    for group in groups.values():
        if 1 < len(group) <= max_group:
            pairs.update(itertools.combinations(group, 2))
    counts: Counter[Shape] = Counter()
    for i, j in sorted(pairs):
        counts.update(anchor_shapes(records[i], records[j], _compared(records, i, j, compared)))
    return counts


def _compared(
    records: Sequence[Demographics],
    i: int,
    j: int,
    cache: dict[tuple[int, int], dict[Field, Level]] | None,
) -> dict[Field, Level]:
    """compare(records[i], records[j]), once per pair when given a cache (the EM sessions
    and the anchor pairs share many: a person's records share a birth date and a name)."""
    if cache is None:
        return compare(records[i], records[j])
    levels = cache.get((i, j))
    if levels is None:
        levels = cache[(i, j)] = compare(records[i], records[j])
    return levels


def household_counts(
    records: Sequence[Demographics],
    pairs: Iterable[tuple[int, int]],
    comparisons: Iterable[Mapping[Field, Level]],
) -> Counter[Shape]:
    """The shapes (`household_shapes`) of blocked pairs of records in one home that no
    identifier value ties together."""
    counts: Counter[Shape] = Counter()
    for (i, j), levels in zip(pairs, comparisons, strict=True):
        a, b = records[i], records[j]
        if not _share_trusted(a, b):
            counts.update(household_shapes(a, b, levels))
    return counts


def household_lifted(evidence: Mapping[str, float]) -> bool:
    """Do the counts show the rule's shape no more often than one person's own records
    explain? ``evidence`` (one entry of `MatchModel.household`): ``pairs_agreeing`` and
    ``pairs_shaped``, the home's pairs that agree (the same name, or born together) and
    those of the rule's shape (twins: another given name; generations: birth years 12 or
    more apart); ``anchor_agreeing`` and ``anchor_shaped``, the same among the pairs that
    share an identifier value. Expected of one person's records: pairs_agreeing ×
    anchor_shaped / anchor_agreeing. Lifted when pairs_shaped is within HOUSEHOLD_SIGMAS
    Poisson deviations of that, and there are at least MIN_HOUSEHOLD_PAIRS agreeing pairs
    (enough for twins or generations to show if the population has them)."""
    agreeing = evidence.get("pairs_agreeing", 0.0)
    shaped = evidence.get("pairs_shaped", math.inf)
    anchor_agreeing = evidence.get("anchor_agreeing", 0.0)
    anchor_shaped = evidence.get("anchor_shaped", 0.0)
    if agreeing < MIN_HOUSEHOLD_PAIRS or anchor_agreeing <= 0:
        return False
    expected = agreeing * anchor_shaped / anchor_agreeing
    return shaped <= expected + HOUSEHOLD_SIGMAS * math.sqrt(expected)


@dataclass(frozen=True)
class MatchModel:
    """Estimated m and u per field and level, term frequencies, and how they were got."""

    m: Mapping[Field, Mapping[Level, float]]
    u: Mapping[Field, Mapping[Level, float]]
    match_proportion: float  # λ: the share of matches among the blocked pairs
    term_frequencies: Mapping[Field, TermFrequencies] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)  # counts, seed, convergence
    version: int = MODEL_VERSION
    # Per hard-negative rule (twin, generation): the counts `household_lifted` decides on.
    # Empty (a model written before it existed): every rule holds.
    household: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def lifted_holds(self) -> frozenset[Hold]:
        """The hard-negative rules the data showed no need for (`household_lifted`), for
        `MatchConfig.lifted_holds`. Without generations of one name in the data, a record
        without a birth date has nobody to be confused with: UNDATED goes with GENERATION."""
        out = {
            hold
            for hold in HOUSEHOLD_TESTS
            if (evidence := self.household.get(str(hold))) and household_lifted(evidence)
        }
        if Hold.GENERATION in out:
            out.add(Hold.UNDATED)
        return frozenset(out)

    def probabilities(self) -> dict[Field, dict[Level, tuple[float, float]]]:
        return {
            f: {lv: (m, self.u[f][lv]) for lv, m in levels.items()} for f, levels in self.m.items()
        }

    def weights(self, term_frequencies: bool = True) -> MatchWeights:
        return MatchWeights.from_probabilities(
            self.probabilities(), self.term_frequencies if term_frequencies else None
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "match_proportion": self.match_proportion,
            "m": {str(f): {str(lv): p for lv, p in ls.items()} for f, ls in self.m.items()},
            "u": {str(f): {str(lv): p for lv, p in ls.items()} for f, ls in self.u.items()},
            "term_frequencies": {
                str(f): {"m_exact": tf.m_exact, "floor": tf.floor, "shares": dict(tf.shares)}
                for f, tf in self.term_frequencies.items()
            },
            "training": dict(self.training),
            "household": {k: dict(v) for k, v in self.household.items()},
        }

    @classmethod
    def from_json(cls, doc: Any) -> MatchModel:
        """The model a JSON document describes, checked through (`ModelError` says what is
        wrong): the version, every field the matcher weighs with m and u for the same known
        levels (DISAGREE among them), each probability in (0, 1] and each field's summing to
        about 1, λ in (0, 1), term frequencies only for name fields."""
        if not isinstance(doc, Mapping):
            raise ModelError(f"a match model is a JSON object, not {type(doc).__name__}")
        if doc.get("version") != MODEL_VERSION:
            raise ModelError(
                f"unsupported match model version {doc.get('version')!r} "
                f"(this index reads version {MODEL_VERSION})"
            )
        m, u = _table(doc, "m"), _table(doc, "u")
        for f in PRIOR_PROBABILITIES:
            if f not in m:
                raise ModelError(f"m has no field {str(f)!r}")
        for f, levels in m.items():
            if set(u.get(f, {})) != set(levels):
                raise ModelError(f"{f}: m and u do not list the same levels")
            if Level.DISAGREE not in levels:
                raise ModelError(f"{f}: no {str(Level.DISAGREE)!r} level")
            for name, side in (("m", levels), ("u", u[f])):
                if abs(sum(side.values()) - 1.0) > PROBABILITY_SUM_TOLERANCE:
                    raise ModelError(f"{f}: {name} sums to {sum(side.values()):.4f}, not 1")
        if set(u) - set(m):
            raise ModelError(f"u has fields m lacks: {sorted(str(f) for f in set(u) - set(m))}")
        lam = _number(doc.get("match_proportion"), "match_proportion")
        if not 0 < lam < 1:
            raise ModelError(f"match_proportion {lam} is not in (0, 1)")
        tfs = doc.get("term_frequencies", {})
        training = doc.get("training", {})
        if not isinstance(tfs, Mapping) or not isinstance(training, Mapping):
            raise ModelError("term_frequencies and training are JSON objects")
        return cls(
            m=m,
            u=u,
            match_proportion=lam,
            term_frequencies={_term_field(f): _term_frequencies(f, tf) for f, tf in tfs.items()},
            training=dict(training),
            household=_household(doc.get("household", {})),
        )

    def dumps(self) -> bytes:
        return orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)

    @classmethod
    def loads(cls, data: bytes | str) -> MatchModel:
        """A model from JSON text; `ModelError` when it is not JSON or not a model."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ModelError(f"not JSON: {exc}") from exc
        return cls.from_json(doc)

    def describe(self) -> str:
        """One line on what the model was trained on (for logs)."""
        t = self.training
        parts = [f"version {self.version}"]
        for key in ("records", "persons", "source", "trained_at", "seed"):
            if key in t:
                parts.append(f"{key} {t[key]}")
        return ", ".join(parts)


class ModelError(ValueError):
    """A match model document that cannot be used, and why."""


# How far each field's m (or u) may sum from 1 (priors are round numbers; EM sums to 1).
PROBABILITY_SUM_TOLERANCE = 0.02


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelError(f"{where}: {value!r} is not a number")
    out = float(value)
    if not math.isfinite(out):
        raise ModelError(f"{where}: {value!r} is not finite")
    return out


def _probability(value: Any, where: str) -> float:
    p = _number(value, where)
    if not 0 < p <= 1:
        raise ModelError(f"{where}: {p} is not a probability in (0, 1]")
    return p


def _table(doc: Mapping[str, Any], key: str) -> dict[Field, dict[Level, float]]:
    raw = doc.get(key)
    if not isinstance(raw, Mapping):
        raise ModelError(f"{key!r} is missing or not a JSON object")
    out: dict[Field, dict[Level, float]] = {}
    for f, levels in raw.items():
        try:
            field_ = Field(f)
        except ValueError:
            raise ModelError(f"{key}: unknown field {f!r}") from None
        if not isinstance(levels, Mapping) or not levels:
            raise ModelError(f"{key}.{f}: not a JSON object of levels")
        table: dict[Level, float] = {}
        for lv, p in levels.items():
            try:
                level = Level(lv)
            except ValueError:
                raise ModelError(f"{key}.{f}: unknown level {lv!r}") from None
            if level is Level.MISSING:
                raise ModelError(f"{key}.{f}: {str(Level.MISSING)!r} has no probability")
            table[level] = _probability(p, f"{key}.{f}.{lv}")
        out[field_] = table
    return out


def _household(doc: Any) -> dict[str, dict[str, float]]:
    if not isinstance(doc, Mapping):
        raise ModelError("household is a JSON object")
    known = {str(h) for h in HOUSEHOLD_TESTS}
    out: dict[str, dict[str, float]] = {}
    for rule, counts in doc.items():
        if rule not in known:
            raise ModelError(f"household: unknown rule {rule!r}")
        if not isinstance(counts, Mapping):
            raise ModelError(f"household.{rule}: not a JSON object of counts")
        out[rule] = {}
        for key, value in counts.items():
            n = _number(value, f"household.{rule}.{key}")
            if n < 0:
                raise ModelError(f"household.{rule}.{key}: {n} is negative")
            out[rule][str(key)] = n
    return out


def _term_field(f: Any) -> Field:
    try:
        field_ = Field(f)
    except ValueError:
        raise ModelError(f"term_frequencies: unknown field {f!r}") from None
    if field_ not in TERM_VALUES:
        raise ModelError(f"term_frequencies: {f!r} is not a name field")
    return field_


def _term_frequencies(f: str, tf: Any) -> TermFrequencies:
    where = f"term_frequencies.{f}"
    if not isinstance(tf, Mapping) or not isinstance(tf.get("shares"), Mapping):
        raise ModelError(f"{where}: needs m_exact, floor and shares")
    return TermFrequencies(
        _probability(tf.get("m_exact"), f"{where}.m_exact"),
        {str(v): _probability(s, f"{where}.shares.{v}") for v, s in tf["shares"].items()},
        _probability(tf.get("floor"), f"{where}.floor"),
    )


# Fields whose u is not corrected for the matches among random pairs (`u_among_nonmatches`):
# corrected, the birth date's exact agreement weighs 2–4 bits more, and on HDX's synthetic
# set namesakes (a common name and the same birth date, elsewhere) are linked five times
# as often (docs/performance.md).
UNCORRECTED_U = frozenset({Field.BIRTH_DATE})


def random_match_rate(
    records: int, sessions: Sequence[Mapping[str, Any]], m_birth_exact: float
) -> float:
    """The chance that two records drawn at random are one person's, from the data alone:
    the birth-date session's matches (λ × its pairs: the matches that share a birth date),
    divided by the share of matches that do (m of an exact birth date), over all pairs."""
    possible = records * (records - 1) / 2
    for run in sessions:
        if run["keys"] == "d:" and possible > 0 and m_birth_exact > 0:
            matches = float(run["match_proportion"]) * float(run["pairs"]) / m_birth_exact
            return min(max(matches / possible, 0.0), 0.5)
    return 0.0


def u_among_nonmatches(
    comparisons: Iterable[Mapping[Field, Level]],
    m: Mapping[Field, Mapping[Level, float]],
    u: Mapping[Field, Mapping[Level, float]],
    rate: float,
    exact: Mapping[Field, float] | None = None,
    priors: ProbabilityTable = PRIOR_PROBABILITIES,
    prior_pairs: float = U_PRIOR_PAIRS,
    fields: Iterable[Field] | None = None,
    passes: int = NONMATCH_PASSES,
) -> dict[Field, dict[Level, float]]:
    """u counted over the random pairs that are not one person's: each pair weighs by its
    posterior of being a non-match (1 − g), g from ``m``, ``u`` and prior odds
    rate : (1 − rate) (`random_match_rate`): the E step of EM over the random pairs, with
    m and λ held. The matches a seed's sample happens to hold (a Poisson count: FEBRL4
    expects ~3 in 30,000 pairs) agree on rare levels — the same identifier, the same
    address — and subtracting only their *expected* count (rate × m) leaves u of
    those levels at the mercy of the draw (a shared identifier weighed 13.6 or 21.4 bits by
    seed); each sampled match is taken out instead. ``exact`` (`exact_agreement`, counted
    over all records, so exact where a sample is noisy) replaces a field's EXACT level,
    less the expected matches: (share − rate × m) / (1 − rate), never below the priors'
    pseudo-count share over the random pairs; fields not in ``fields`` keep ``u``.
    ``passes`` recomputes g with the u found (twice is plenty: g is ~0 or ~1). A level no
    non-match shows keeps the priors' pseudo-count share, as `estimate_u` gives it."""
    return _u_among_nonmatches_counted(
        level_vectors(comparisons, priors), m, u, rate, exact, priors, prior_pairs, fields, passes
    )


def _u_among_nonmatches_counted(
    raw: Counter[tuple[Level, ...]],
    m: Mapping[Field, Mapping[Level, float]],
    u: Mapping[Field, Mapping[Level, float]],
    rate: float,
    exact: Mapping[Field, float] | None,
    priors: ProbabilityTable,
    prior_pairs: float,
    fields: Iterable[Field] | None,
    passes: int,
) -> dict[Field, dict[Level, float]]:
    table = list(priors)
    patterns: Counter[tuple[Level, ...]] = Counter()
    for pattern, n in raw.items():
        patterns[_canonical(dict(zip(table, pattern, strict=True)), priors)] += n
    chosen = set(fields if fields is not None else table)
    n_pairs = sum(patterns.values())
    current = {f: dict(u[f]) for f in table if f in u}
    if rate <= 0:
        return current
    prior_log_odds = math.log(rate) - math.log1p(-rate)
    for _ in range(max(passes, 1)):
        counts: LevelCounts = {f: {} for f in table}
        for pattern, n in patterns.items():
            log_odds = prior_log_odds
            for f, level in zip(table, pattern, strict=True):
                if level is not Level.MISSING and f in m and f in current:
                    log_odds += math.log(m[f][level]) - math.log(current[f][level])
            nonmatch = n / (1.0 + math.exp(log_odds)) if log_odds < 700 else 0.0
            for f, level in zip(table, pattern, strict=True):
                if level is not Level.MISSING:
                    counts[f][level] = counts[f].get(level, 0.0) + nonmatch
        found = {
            f: _smoothed(counts[f], {lv: p[1] for lv, p in priors[f].items()}, prior_pairs)
            for f in table
            if f in chosen
        }
        for f, levels in (exact or {}).items():
            if f not in found or f not in m:
                continue
            prior_total = sum(p[1] for p in priors[f].values())
            floor = prior_pairs * priors[f][Level.EXACT][1] / prior_total
            floor /= n_pairs + prior_pairs
            corrected = (levels - rate * m[f][Level.EXACT]) / (1.0 - rate)
            found = with_exact(found, {f: max(corrected, floor)})
        current = {f: found.get(f, levels) for f, levels in current.items()}
    return current


def estimate_model(
    records: Sequence[Demographics],
    *,
    seed: int = 0,
    priors: ProbabilityTable = PRIOR_PROBABILITIES,
    n_random_pairs: int = RANDOM_PAIRS,
    max_blocked_pairs: int = MAX_BLOCKED_PAIRS,
    em: ExpectationMaximisation | None = None,
    sessions: Sequence[tuple[str, frozenset[Field]]] = SESSIONS,
) -> MatchModel:
    """A model from these records alone: u from random pairs, m by EM sessions over
    blocked pairs, term frequencies from name counts (see the module docstring)."""
    em = em or ExpectationMaximisation()
    rng = random.Random(seed)
    rand = random_pairs(len(records), n_random_pairs, rng)
    # The random pairs' levels, counted as they are compared (no mapping kept per pair).
    rand_vectors = level_vectors((compare(records[i], records[j]) for i, j in rand), priors)
    u = _u_counted(rand_vectors, priors, em.u_prior_pairs)
    exact = exact_agreement(records)
    u = with_exact(u, exact)
    start = {f: {lv: (p[0], u[f][lv]) for lv, p in priors[f].items()} for f in priors}
    m_sum: dict[Field, dict[Level, float]] = {}
    u_sum: dict[Field, dict[Level, float]] = {}
    estimated: Counter[Field] = Counter()
    runs: list[dict[str, Any]] = []
    compared: dict[tuple[int, int], dict[Field, Level]] = {}
    anchors = anchor_counts(records, compared=compared)
    household: dict[str, dict[str, float]] = {}
    keys = [index_keys(d) for d in records]
    for prefix, conditioned in sessions:
        pairs = blocked_pairs(records, prefix, max_blocked_pairs, rng=rng, keys=keys)
        comparisons = [_compared(records, i, j, compared) for i, j in pairs]
        result = em.fit(comparisons, start, conditioned)
        tests = [(h, t) for h, t in HOUSEHOLD_TESTS.items() if t[0] == prefix]
        if tests:
            shapes = household_counts(records, pairs, comparisons)
            for hold, (_, agreeing, shaped) in tests:
                household[str(hold)] = {
                    "pairs_agreeing": shapes[agreeing],
                    "pairs_shaped": shapes[shaped],
                    "anchor_agreeing": anchors[agreeing],
                    "anchor_shaped": anchors[shaped],
                }
        for f, levels in result.probabilities.items():
            if f in conditioned:
                continue
            estimated[f] += 1
            for lv, (m_p, u_p) in levels.items():
                m_sum.setdefault(f, {})[lv] = m_sum.get(f, {}).get(lv, 0.0) + m_p
                u_sum.setdefault(f, {})[lv] = u_sum.get(f, {}).get(lv, 0.0) + u_p
        runs.append(
            {
                "keys": prefix,
                "conditioned": sorted(str(f) for f in conditioned),
                "pairs": result.pairs,
                "match_proportion": result.match_proportion,
                "iterations": result.iterations,
                "converged": result.converged,
                "log_likelihood": result.log_likelihood,
            }
        )
    m = {
        f: {lv: m_sum[f][lv] / estimated[f] for lv in levels}
        if estimated[f]
        else {lv: p[0] for lv, p in levels.items()}
        for f, levels in start.items()
    }
    u_final = {
        f: {lv: u_sum[f][lv] / estimated[f] for lv in levels}
        if estimated[f]
        else {lv: p[1] for lv, p in levels.items()}
        for f, levels in start.items()
    }
    rate = random_match_rate(len(records), runs, m.get(Field.BIRTH_DATE, {}).get(Level.EXACT, 0.0))
    u_final = _u_among_nonmatches_counted(
        rand_vectors,
        m,
        u_final,
        rate,
        {f: p for f, p in exact.items() if f not in UNCORRECTED_U},
        priors,
        em.u_prior_pairs,
        [f for f in u_final if f not in UNCORRECTED_U],
        NONMATCH_PASSES,
    )
    tf = term_frequencies(records, {f: m[f][Level.EXACT] for f in TERM_VALUES if f in m})
    weights = [r["match_proportion"] * r["pairs"] for r in runs]
    return MatchModel(
        m=m,
        u=u_final,
        match_proportion=sum(weights) / max(sum(r["pairs"] for r in runs), 1),
        term_frequencies=tf,
        training={
            "records": len(records),
            "random_pairs": len(rand),
            "random_pair_match_rate": rate,
            "u_corrected_for_matches": sorted(str(f) for f in u_final if f not in UNCORRECTED_U),
            "sessions": runs,
            "seed": seed,
            "m_prior_pairs": em.m_prior_pairs,
            "u_prior_pairs": em.u_prior_pairs,
            "u_estimated_by_em": em.estimate_u,
        },
        household=household,
    )
