"""The stage's rows without the ORM: plain objects for the source records and persons a
batch reads and writes, and the Core statements (built once, so SQLAlchemy compiles each
once and caches it) that read them and write them back at the end of the batch.

A batch holds every source record and person it touched in memory for its whole length —
nothing else writes them meanwhile (the service's lock keeps the HTTP operations out; another
replica's change to a person fails the compare-and-set on its version) — and writes them in
`flush_batch`: new persons and records with one multi-row insert each, changed ones with one
executemany update each, the identifier rows of every changed record. The tables and their
contents are those the ORM wrote, one row at a time, before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.models import IdentifierRow, PersonRow, SourceRecordRow
from hdx_patient_index.store import table_of

RecordKey = tuple[str, str]

_RECORDS = table_of(SourceRecordRow)
_PERSONS = table_of(PersonRow)
_IDENTIFIERS = table_of(IdentifierRow)

_RECORD_COLUMNS = (
    "id",
    "source",
    "local_id",
    "person_id",
    "demographics",
    "snapshot",
    "version",
    "last_event_id",
    "created_ms",
    "updated_ms",
    "linked_ms",
)
_PERSON_COLUMNS = (
    "id",
    "golden",
    "trusted_ids",
    "possible_match",
    "status",
    "replaced_by",
    "version",
    "created_ms",
    "updated_ms",
)


@dataclass(slots=True, eq=False)
class Record:
    """A `pix_source_record` row as the batch holds it (``id`` None until inserted)."""

    id: int | None
    source: str
    local_id: str
    person_id: str
    demographics: str
    snapshot: str
    version: int
    last_event_id: str
    created_ms: int
    updated_ms: int
    linked_ms: int

    @property
    def key(self) -> RecordKey:
        return (self.source, self.local_id)


@dataclass(slots=True, eq=False)
class Person:
    """A `pix_person` row as the batch holds it; ``read_version`` is the version it had in
    the database (None: created by this batch), compared-and-set when it is written."""

    id: str
    golden: str
    trusted_ids: str
    possible_match: bool
    status: str
    replaced_by: str | None
    version: int
    created_ms: int
    updated_ms: int
    read_version: int | None = None


def _record(row: Any) -> Record:
    return Record(*row)


def _person(row: Any) -> Person:
    p = Person(*row)
    p.possible_match = bool(p.possible_match)
    p.read_version = p.version
    return p


_RECORD_COLS = [_RECORDS.c[name] for name in _RECORD_COLUMNS]
_PERSON_COLS = [_PERSONS.c[name] for name in _PERSON_COLUMNS]

RECORDS_BY_LOCAL_ID = select(*_RECORD_COLS).where(
    _RECORDS.c.local_id.in_(bindparam("local_ids", expanding=True))
)
RECORDS_OF_PERSONS = (
    select(*_RECORD_COLS)
    .where(_RECORDS.c.person_id.in_(bindparam("person_ids", expanding=True)))
    .order_by(_RECORDS.c.id)
)
RECORD_BY_KEY = select(*_RECORD_COLS).where(
    _RECORDS.c.source == bindparam("source"), _RECORDS.c.local_id == bindparam("local_id")
)
PERSONS_BY_ID = select(*_PERSON_COLS).where(
    _PERSONS.c.id.in_(bindparam("person_ids", expanding=True))
)
PERSON_BY_ID = select(*_PERSON_COLS).where(_PERSONS.c.id == bindparam("person_id"))

# Inserted in the order the batch created them, so that ids come out as one insert per
# record would have given them (the records of a person are read in id order).
_INSERT_RECORDS = insert(_RECORDS).returning(_RECORDS.c.id, sort_by_parameter_order=True)
_UPDATE_RECORDS = (
    update(_RECORDS)
    .where(_RECORDS.c.id == bindparam("b_id"))
    .values(
        demographics=bindparam("b_demographics"),
        snapshot=bindparam("b_snapshot"),
        version=bindparam("b_version"),
        last_event_id=bindparam("b_last_event_id"),
        updated_ms=bindparam("b_updated_ms"),
    )
)
_INSERT_PERSONS = insert(_PERSONS)
# Compare-and-set on the version the batch read.
_UPDATE_PERSONS = (
    update(_PERSONS)
    .where(_PERSONS.c.id == bindparam("b_id"), _PERSONS.c.version == bindparam("b_read"))
    .values(
        golden=bindparam("b_golden"),
        trusted_ids=bindparam("b_trusted_ids"),
        possible_match=bindparam("b_possible_match"),
        version=bindparam("b_version"),
        updated_ms=bindparam("b_updated_ms"),
    )
)
_PERSON_VERSIONS = select(_PERSONS.c.id, _PERSONS.c.version).where(
    _PERSONS.c.id.in_(bindparam("person_ids", expanding=True))
)
_DELETE_IDENTIFIERS = delete(_IDENTIFIERS).where(
    _IDENTIFIERS.c.record_id.in_(bindparam("record_ids", expanding=True))
)
_INSERT_IDENTIFIERS = insert(_IDENTIFIERS)


def records_by_local_id(conn: Connection, local_ids: Sequence[str]) -> list[Record]:
    return [_record(r) for r in conn.execute(RECORDS_BY_LOCAL_ID, {"local_ids": local_ids})]


def records_of_persons(conn: Connection, person_ids: Sequence[str]) -> list[Record]:
    """Every record of these persons, in id order."""
    return [_record(r) for r in conn.execute(RECORDS_OF_PERSONS, {"person_ids": person_ids})]


def record_by_key(conn: Connection, source: str, local_id: str) -> Record | None:
    row = conn.execute(RECORD_BY_KEY, {"source": source, "local_id": local_id}).first()
    return _record(row) if row is not None else None


def persons_by_id(conn: Connection, person_ids: Sequence[str]) -> list[Person]:
    return [_person(r) for r in conn.execute(PERSONS_BY_ID, {"person_ids": person_ids})]


def person_by_id(conn: Connection, person_id: str) -> Person | None:
    row = conn.execute(PERSON_BY_ID, {"person_id": person_id}).first()
    return _person(row) if row is not None else None


def _record_params(r: Record) -> dict[str, Any]:
    return {name: getattr(r, name) for name in _RECORD_COLUMNS if name != "id"}


def _identifier_rows(r: Record, d: Demographics) -> list[dict[str, Any]]:
    assert r.id is not None
    return [
        {
            "system": ident.system,
            "value": ident.value,
            "trusted": trusted,
            "record_id": r.id,
            "person_id": r.person_id,
        }
        for ident, trusted in [(i, True) for i in d.trusted] + [(i, False) for i in d.identifiers]
    ]


def flush_batch(
    conn: Connection,
    *,
    new_persons: Iterable[Person],
    changed_persons: Iterable[Person],
    new_records: Iterable[Record],
    changed_records: Iterable[Record],
    identifiers: Iterable[tuple[Record, Demographics]],
) -> str | None:
    """Write what a batch changed; a person another writer changed since the batch read it
    is returned (its id) instead, and nothing of its change is written."""
    changed = list(changed_persons)
    if changed:
        result: Any = conn.execute(
            _UPDATE_PERSONS,
            [
                {
                    "b_id": p.id,
                    "b_read": p.read_version,
                    "b_golden": p.golden,
                    "b_trusted_ids": p.trusted_ids,
                    "b_possible_match": p.possible_match,
                    "b_version": p.version,
                    "b_updated_ms": p.updated_ms,
                }
                for p in changed
            ],
        )
        if result.rowcount != len(changed):
            # The rows written carry the batch's new version; a row that was not is the
            # person another writer changed (the batch rolls back either way).
            written = {p.id: p.version for p in changed}
            now = {
                row[0]: row[1]
                for row in conn.execute(_PERSON_VERSIONS, {"person_ids": sorted(written)})
            }
            return next((pid for pid, v in written.items() if now.get(pid) != v), changed[0].id)
    created = [{name: getattr(p, name) for name in _PERSON_COLUMNS} for p in new_persons]
    if created:
        conn.execute(_INSERT_PERSONS, created)
    fresh = list(new_records)
    touched = list(identifiers)
    old = sorted(r.id for r, _ in touched if r.id is not None)  # before the new get theirs
    if fresh:
        ids = conn.execute(_INSERT_RECORDS, [_record_params(r) for r in fresh]).scalars().all()
        for r, rid in zip(fresh, ids, strict=True):
            r.id = rid
    updates = [
        {
            "b_id": r.id,
            "b_demographics": r.demographics,
            "b_snapshot": r.snapshot,
            "b_version": r.version,
            "b_last_event_id": r.last_event_id,
            "b_updated_ms": r.updated_ms,
        }
        for r in changed_records
    ]
    if updates:
        conn.execute(_UPDATE_RECORDS, updates)
    if old:
        conn.execute(_DELETE_IDENTIFIERS, {"record_ids": old})
    rows = [row for r, d in touched for row in _identifier_rows(r, d)]
    if rows:
        conn.execute(_INSERT_IDENTIFIERS, rows)
    return None
