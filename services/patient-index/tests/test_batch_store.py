"""The batch's Core adapter (`batch_store`): rows read as plain objects, written back once —
new rows with their ids in creation order, changed ones by id, a person's version
compared-and-set — on SQLite and PostgreSQL where reachable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pix_builders import NHS_A, demo
from sqlmodel import select

from hdx_patient_index import batch_store as bs
from hdx_patient_index.models import IdentifierRow, PersonRow, SourceRecordRow
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.db import make_engine
from hdx_shared.settings import HdxSettings


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[PatientIndexStore]:
    made = PatientIndexStore(make_engine(HdxSettings(data_dir=tmp_path, database_url=database_url)))
    made.create_schema()
    yield made
    made.engine.dispose()


def _person(pid: str, version: int = 1, read: int | None = None) -> bs.Person:
    return bs.Person(pid, "{}", "", False, "active", None, version, 5, 5, read)


def _record(local_id: str, person_id: str) -> bs.Record:
    return bs.Record(None, "urn:s", local_id, person_id, "{}", "{}", 1, "ev", 5, 5, 0)


def test_new_rows_are_inserted_with_ids_in_creation_order_and_read_back(
    store: PatientIndexStore,
) -> None:
    records = [_record(f"r{i}", "p1" if i % 2 else "p2") for i in range(7)]
    with store.engine.begin() as conn:
        assert (
            bs.flush_batch(
                conn,
                new_persons=[_person("p1"), _person("p2")],
                changed_persons=[],
                new_records=records,
                changed_records=[],
                identifiers=[(records[0], demo(nhs=NHS_A))],
            )
            is None
        )
    ids = [r.id for r in records]
    assert ids == sorted(ids) and None not in ids
    with store.engine.connect() as conn:
        got = bs.records_of_persons(conn, ["p1", "p2"])
        assert [(r.id, r.local_id) for r in got] == [(r.id, r.local_id) for r in records]
        assert bs.record_by_key(conn, "urn:s", "r3") is not None
        assert bs.record_by_key(conn, "urn:s", "nope") is None
        assert {r.local_id for r in bs.records_by_local_id(conn, ["r1", "r2"])} == {"r1", "r2"}
        [p1] = bs.persons_by_id(conn, ["p1"])
        assert (p1.version, p1.read_version, p1.possible_match) == (1, 1, False)
        assert bs.person_by_id(conn, "nobody") is None
    with store.reading() as s:
        [ident] = s.exec(select(IdentifierRow)).all()
        assert (ident.value, ident.trusted, ident.record_id) == (NHS_A, True, records[0].id)


def test_changed_rows_are_updated_and_identifiers_replaced(store: PatientIndexStore) -> None:
    rec = _record("r1", "p1")
    with store.engine.begin() as conn:
        bs.flush_batch(
            conn,
            new_persons=[_person("p1")],
            changed_persons=[],
            new_records=[rec],
            changed_records=[],
            identifiers=[(rec, demo(nhs=NHS_A))],
        )
    with store.engine.begin() as conn:
        [person] = bs.persons_by_id(conn, ["p1"])
        [held] = bs.records_by_local_id(conn, ["r1"])
        person.version, person.golden, person.possible_match = 3, '{"a":1}', True
        held.version, held.snapshot, held.last_event_id = 2, '{"b":2}', "ev-2"
        assert (
            bs.flush_batch(
                conn,
                new_persons=[],
                changed_persons=[person],
                new_records=[],
                changed_records=[held],
                identifiers=[(held, demo())],  # no identifiers now
            )
            is None
        )
    with store.reading() as s:
        row = s.get(PersonRow, "p1")
        assert row is not None and (row.version, row.golden, row.possible_match) == (
            3,
            '{"a":1}',
            True,
        )
        [r] = s.exec(select(SourceRecordRow)).all()
        assert (r.version, r.snapshot, r.last_event_id) == (2, '{"b":2}', "ev-2")
        assert s.exec(select(IdentifierRow)).all() == []


def test_a_person_changed_since_the_batch_read_it_is_a_conflict(
    store: PatientIndexStore,
) -> None:
    with store.engine.begin() as conn:
        bs.flush_batch(
            conn,
            new_persons=[_person("p1"), _person("p2")],
            changed_persons=[],
            new_records=[],
            changed_records=[],
            identifiers=[],
        )
    with store.engine.begin() as conn:
        p1, p2 = sorted(bs.persons_by_id(conn, ["p1", "p2"]), key=lambda p: p.id)
        p2.read_version = 7  # what another writer's change would leave us holding
        p1.version = p2.version = 8
        assert (
            bs.flush_batch(
                conn,
                new_persons=[],
                changed_persons=[p1, p2],
                new_records=[],
                changed_records=[],
                identifiers=[],
            )
            == "p2"
        )
