"""`hdx-patient-index train-model`: estimate a match model and write it to a file.

The records come from the patient index's own database (every source record's demographics
snapshot, as the matcher sees them: HDX_DATABASE_URL, or SQLite under HDX_DATA_DIR) or, with
``--patients``, from FHIR JSON files (a Patient, a Bundle, a JSON array of them, or NDJSON:
one per line). `estimate_model` (domain/em.py) learns m and u from those records alone — u
from random pairs, m by EM over blocked pairs with the documented priors as pseudo-counts,
term frequencies of names — never from labels. Point HDX_MATCH_MODEL at the file to run the
service on it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from hdx_patient_index.domain.demographics import Demographics, extract_demographics
from hdx_patient_index.domain.em import MatchModel, estimate_model
from hdx_patient_index.domain.identifiers import TrustedSystems
from hdx_patient_index.domain.index import PersonIndex
from hdx_patient_index.domain.matching import MatchConfig
from hdx_patient_index.match_model import write_model
from hdx_patient_index.settings import PatientIndexSettings
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.db import make_engine

# Fewer records than this say too little about chance agreement to train on.
MIN_RECORDS = 100


class TrainingError(Exception):
    """The records could not be read (the message says why)."""


def _patients(doc: Any) -> Iterator[dict[str, Any]]:
    if isinstance(doc, list):
        for item in doc:
            yield from _patients(item)
    elif isinstance(doc, dict):
        if doc.get("resourceType") == "Patient":
            yield doc
        elif doc.get("resourceType") == "Bundle":
            for entry in doc.get("entry") or ():
                if isinstance(entry, dict):
                    yield from _patients(entry.get("resource"))


def patients_in(path: Path) -> list[dict[str, Any]]:
    """The FHIR Patients in a JSON file (a resource, a Bundle or an array) or NDJSON."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrainingError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    try:
        if path.suffix in (".ndjson", ".jsonl"):
            docs = [orjson.loads(line) for line in data.splitlines() if line.strip()]
        else:
            docs = [orjson.loads(data)]
    except orjson.JSONDecodeError as exc:
        raise TrainingError(f"{path}: not JSON: {exc}") from exc
    return [p for doc in docs for p in _patients(doc)]


def records_from_files(paths: Sequence[Path], trusted: TrustedSystems) -> list[Demographics]:
    return [extract_demographics(p, trusted) for path in paths for p in patients_in(path)]


def records_from_index(settings: PatientIndexSettings) -> tuple[list[Demographics], int]:
    """(every source record's demographics, the number of persons) from the database."""
    store = PatientIndexStore(make_engine(settings))
    index = PersonIndex()
    try:
        store.load_index(index)
    except Exception as exc:
        raise TrainingError(
            f"the patient index's database ({settings.sqlalchemy_url()}) cannot be read: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        store.engine.dispose()
    return [r.demographics for r in index.records()], index.person_count


def train(
    records: Sequence[Demographics], source: str, seed: int, persons: int | None = None
) -> MatchModel:
    model = estimate_model(records, seed=seed)
    return replace(
        model,
        training=dict(model.training)
        | {
            "source": source,
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **({"persons": persons} if persons is not None else {}),
        },
    )


def summary(model: MatchModel, persons: int) -> str:
    """What to check before using the model: convergence, weights, suggested thresholds."""
    lines = [f"trained on {model.describe()}"]
    for s in model.training.get("sessions", ()):
        lines.append(
            f"  EM over pairs sharing {s['keys']!r}: {s['pairs']:,} pairs, λ "
            f"{s['match_proportion']:.4f}, {s['iterations']} iterations, "
            f"{'converged' if s['converged'] else 'NOT converged'}"
        )
    weights = model.weights(term_frequencies=False)
    for f, levels in weights.table.items():
        text = "  ".join(f"{lv} {w:+.1f}" for lv, w in levels.items())
        lines.append(f"  {f:<11} {text}")
    config = MatchConfig.for_population(max(persons, 2), weights)
    lines.append(
        f"thresholds for {persons:,} persons (a link at a 99 % posterior, review from 1 %): "
        f"HDX_MATCH_UPPER_THRESHOLD={config.upper:.1f} "
        f"HDX_MATCH_LOWER_THRESHOLD={config.lower:.1f} "
        f"HDX_MATCH_PRIOR_LOG2_ODDS={config.prior_log2_odds:.1f}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hdx-patient-index train-model",
        description="Estimate a match model (EM, no labels) and write it as JSON; "
        "HDX_MATCH_MODEL=<file> makes the service use it.",
    )
    parser.add_argument("out", type=Path, help="the model file to write (JSON)")
    parser.add_argument(
        "--patients",
        type=Path,
        nargs="+",
        help="FHIR JSON/NDJSON files of Patients to train on "
        "(default: the patient index's own database)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random pairs and samples")
    parser.add_argument("--min-records", type=int, default=MIN_RECORDS)
    args = parser.parse_args(argv)
    settings = PatientIndexSettings()
    try:
        if args.patients:
            records = records_from_files(
                args.patients, TrustedSystems.of(settings.trusted_identifier_systems)
            )
            source = "files: " + ", ".join(p.name for p in args.patients)
            persons = len(records)  # not known: as if every record were its own person
        else:
            records, persons = records_from_index(settings)
            source = "the patient index's database"
    except TrainingError as exc:
        print(f"train-model: {exc}", file=sys.stderr)
        return 1
    if len(records) < args.min_records:
        print(
            f"train-model: {len(records)} records in {source}; at least {args.min_records} "
            "are needed (--min-records)",
            file=sys.stderr,
        )
        return 1
    model = train(records, source, args.seed, persons if not args.patients else None)
    digest = write_model(model, args.out)
    print(summary(model, persons))
    print(
        f"wrote {args.out} (sha256 {digest[:16]}); run the service with HDX_MATCH_MODEL={args.out}"
    )
    return 0
