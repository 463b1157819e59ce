"""The patient-index stage's outputs and tables for fixed traffic, canonically: run it on two
versions of the code and compare the files (they must be identical).

    .venv/bin/python bench/pix_equivalence.py --out /tmp/after.json [--database-url URL]
    PYTHONPATH=/tmp/pix-before/services/patient-index/src:/tmp/pix-before/shared/src \\
        .venv/bin/python bench/pix_equivalence.py --out /tmp/before.json
    cmp /tmp/before.json /tmp/after.json

Traffic (all seeded):

- ``region``: bench/generator.py's region and traffic (what the exchange benchmark
  publishes), with 8 % of the Encounters and Observations moved before their Patient;
- ``synthetic``: bench/mpi_generator.py's population (twins, parent/child pairs, namesakes,
  duplicate registrations), each record a Patient, 20 % updated later (a new phone, a moved
  address), two Observations a record (8 % before their Patient).

Both go through `IdentifyStage.process` in batches of 1, 37, 250 and 500 in turn, every
fourth batch processed twice (a redelivery), on a service whose clock is fixed. The dump
holds every record emitted (topic, key, headers in their order, value) and every ``pix_``
table's rows, with UUIDs (persons and review tasks, from a seeded uuid4; event ids)
numbered by first appearance, times other than the fixed clock's shown as "now", and
``pix_identifier`` rows without their autoincrement id (sorted by content).

With the synthetic population, which of two equally good candidates a record links to
depends on ``PYTHONHASHSEED``: the script runs itself with PYTHONHASHSEED=0 unless it is set.
PostgreSQL: ``--database-url postgresql://postgres@127.0.0.1:5432/test`` makes a fresh
database next to the one named (dropped after).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

if "PYTHONHASHSEED" not in os.environ:
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generator
import mpi_generator
from sqlalchemy import inspect, text

from hdx_patient_index.domain.identifiers import TrustedSystems
from hdx_patient_index.domain.matching import Matcher
from hdx_patient_index.pipeline import IdentifyStage
from hdx_patient_index.service import PatientIndexService
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.db import make_engine
from hdx_shared.envelope import ChangeType, Envelope
from hdx_shared.messaging import Inbound, Outgoing
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics

CLOCK = 1_760_000_000_000
TOPICS = Topics()
BATCH_SIZES = (1, 37, 250, 500)
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _inbound(
    offset: int, source: str, resource: dict[str, Any], patient_ref: str, event_id: str
) -> Inbound:
    env = Envelope(
        event_id=event_id,
        source=source,
        change=ChangeType.UPDATE,
        resource_type=resource["resourceType"],
        patient_ref=patient_ref,
        extra={"traceparent": TRACE},
    )
    return Inbound(
        topic=TOPICS.validated,
        partition=offset % 6,
        offset=offset,
        key=f"{source}|{patient_ref}".encode(),
        value=orjson.dumps(resource),
        envelope=env,
    )


def _move_before_patient(
    items: list[tuple[str, str, dict[str, Any], str]], rng: random.Random, share: float
) -> list[tuple[str, str, dict[str, Any], str]]:
    """Move ``share`` of the non-Patient resources to somewhere before their Patient's
    first appearance."""
    first: dict[tuple[str, str], int] = {}
    for i, (source, ref, res, _) in enumerate(items):
        if res["resourceType"] == "Patient":
            first.setdefault((source, ref), i)
    order: list[tuple[float, int]] = []
    for i, (source, ref, res, _) in enumerate(items):
        pos: float = i
        if res["resourceType"] != "Patient" and rng.random() < share:
            at = first.get((source, ref), i)
            pos = max(0, at - rng.randint(1, 300)) - 0.5
        order.append((pos, i))
    return [items[i] for _, i in sorted(order)]


def region_traffic(messages: int, moved: float = 0.08) -> list[Inbound]:
    region = generator.Region.build(persons=max(200, messages // 4))
    rng = random.Random(7)
    items = [
        (e.source, e.local_patient_id, e.resource, e.ce_id)
        for e in generator.Traffic(region).take(messages)
    ]
    items = _move_before_patient(items, rng, moved)
    return [_inbound(i, s, r, ref, ev) for i, (s, ref, r, ev) in enumerate(items)]


def synthetic_traffic(persons: int) -> list[Inbound]:
    ds = mpi_generator.generate(persons, 11)
    rng = random.Random(13)
    items: list[tuple[str, str, dict[str, Any], str]] = []
    later: list[tuple[str, str, dict[str, Any], str]] = []
    for n, rec in enumerate(ds.records):
        ev = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        items.append((rec.source, rec.local_id, rec.resource, ev))
        if rng.random() < 0.2:
            updated = orjson.loads(orjson.dumps(rec.resource))
            if rng.random() < 0.5:
                updated["telecom"] = [{"system": "phone", "value": f"07700 9{n:05d}"}]
            else:
                updated["address"] = [
                    {"use": "home", "line": [f"{n} New Road"], "postalCode": "N1 9GU"}
                ]
            later.append((rec.source, rec.local_id, updated, f"upd-{n}"))
        for k in range(2):
            obs = {
                "resourceType": "Observation",
                "id": f"obs-{n}-{k}",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
                "subject": {"reference": f"Patient/{rec.local_id}"},
                "valueQuantity": {"value": 5.4, "unit": "mmol/L"},
            }
            later.append((rec.source, rec.local_id, obs, f"obs-ev-{n}-{k}"))
        # Spread what comes later over the traffic that follows.
        if later and rng.random() < 0.5:
            items.append(later.pop(rng.randrange(len(later))))
    rng.shuffle(later)
    items.extend(later)
    items = _move_before_patient(items, rng, 0.08)
    return [_inbound(i, s, r, ref, ev) for i, (s, ref, r, ev) in enumerate(items)]


def batches(traffic: Sequence[Inbound]) -> Iterator[Sequence[Inbound]]:
    i = n = 0
    while i < len(traffic):
        size = BATCH_SIZES[n % len(BATCH_SIZES)]
        batch = traffic[i : i + size]
        yield batch
        if n % 4 == 3:
            yield batch  # redelivered
        i += size
        n += 1


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "replace")
    return v


def dump(store: PatientIndexStore, out: Sequence[Outgoing]) -> dict[str, Any]:
    emitted = [
        [o.topic, _jsonable(o.key), list(o.headers.items()), _jsonable(o.value)] for o in out
    ]
    tables: dict[str, Any] = {}
    engine = store.engine
    insp = inspect(engine)
    for table in sorted(t for t in insp.get_table_names() if t.startswith("pix_")):
        pk = insp.get_pk_constraint(table)["constrained_columns"]
        with engine.connect() as conn:
            result = conn.execute(text(f"SELECT * FROM {table} ORDER BY {', '.join(pk)}"))
            cols = list(result.keys())
            rows = []
            for row in result:
                d = dict(zip(cols, row, strict=True))
                if table == "pix_identifier":
                    d.pop("id")
                for c in cols:
                    if c.endswith("_ms") and d.get(c) not in (None, 0, CLOCK):
                        d[c] = "now"
                rows.append([_jsonable(d[c]) for c in cols if c in d])
            if table == "pix_identifier":
                rows.sort(key=lambda r: orjson.dumps(r))
        tables[table] = {
            "columns": [c for c in cols if not (table == "pix_identifier" and c == "id")],
            "rows": rows,
        }
    return {"emitted": emitted, "tables": tables}


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical(state: dict[str, Any]) -> str:
    text_ = orjson.dumps(state, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode()
    names: dict[str, str] = {}
    return _UUID.sub(lambda m: names.setdefault(m.group(0), f"U{len(names)}"), text_)


def _seeded_uuid4(seed: int) -> None:
    """Person and review-task ids from a seeded generator: table order and tie-breaks among
    persons (which go by id) are then the same from run to run."""
    rng = random.Random(seed)
    uuid.uuid4 = lambda: uuid.UUID(int=rng.getrandbits(128), version=4)


def run(database_url: str, traffic: Sequence[Inbound], data_dir: Path) -> tuple[str, float]:
    _seeded_uuid4(17)
    store = PatientIndexStore(
        make_engine(HdxSettings(data_dir=data_dir, database_url=database_url))
    )
    try:
        service = PatientIndexService(store, Matcher(), TrustedSystems(), clock=lambda: CLOCK)
        assert service.load()
        stage = IdentifyStage(service, TOPICS)
        out: list[Outgoing] = []
        started = time.process_time()
        for batch in batches(traffic):
            out.extend(stage.process(batch))
        cpu = time.process_time() - started
        return canonical(dump(store, out)), cpu
    finally:
        store.engine.dispose()


def _postgres_database(url: str, name: str, create: bool) -> str:
    import psycopg

    base = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        if create:
            conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + "/" + name


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--database-url", default="", help="PostgreSQL (default: SQLite in a temp dir)")
    ap.add_argument("--messages", type=int, default=4000, help="region traffic")
    ap.add_argument("--persons", type=int, default=600, help="synthetic population")
    args = ap.parse_args()
    scenarios = {
        "region": region_traffic(args.messages),
        "synthetic": synthetic_traffic(args.persons),
    }
    parts = []
    for name, traffic in scenarios.items():
        with tempfile.TemporaryDirectory() as tmp:
            url = ""
            db_name = f"pix_eq_{os.getpid()}"
            if args.database_url:
                url = _postgres_database(args.database_url, db_name, True)
            try:
                text_, cpu = run(url, traffic, Path(tmp))
            finally:
                if args.database_url:
                    _postgres_database(args.database_url, db_name, False)
        state = orjson.loads(text_)
        tables = state["tables"]
        print(
            f"{name}: {len(traffic)} messages, {len(state['emitted'])} records out, "
            f"{len(tables['pix_person']['rows'])} persons, "
            f"{len(tables['pix_review_task']['rows'])} review tasks, "
            f"{len(tables['pix_parked']['rows'])} parked, "
            f"{len(tables['pix_event_log']['rows'])} event-log rows; "
            f"stage CPU {cpu:.2f} s; sha256 {hashlib.sha256(text_.encode()).hexdigest()[:16]}"
        )
        parts.append(f'"{name}": {text_}')
    args.out.write_text("{\n" + ",\n".join(parts) + "\n}\n")


if __name__ == "__main__":
    main()
