"""A batch answers from what it loaded at its start (`BatchWork.prefetch`) and writes links,
identifiers and trusted identifiers in bulk at its end: the same results as one message at a
time, on SQLite and PostgreSQL where reachable."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from pix_builders import NHS_A, NHS_B, RIVERSIDE, ST_MARYS, TOPICS, msg, observation, patient
from sqlalchemy import inspect
from sqlmodel import select

from hdx_patient_index.domain.identifiers import TrustedSystems
from hdx_patient_index.domain.matching import Matcher
from hdx_patient_index.models import (
    IdentifierRow,
    LinkRow,
    ParkedRow,
    PersonRow,
    ReviewTaskRow,
    SourceRecordRow,
    TrustedIdRow,
)
from hdx_patient_index.pipeline import IdentifyStage
from hdx_patient_index.service import PatientIndexService
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.db import make_engine
from hdx_shared.messaging import Inbound, Outgoing
from hdx_shared.settings import HdxSettings

GP = "urn:hdx:org:gp-1"
CARE = "urn:hdx:org:care-1"
WALK_IN = "urn:hdx:org:walk-in"
ADA: dict[str, Any] = {"postcode": "SW1A 1AA"}


class Index:
    """A database and stages (replicas) on it."""

    def __init__(self, database_url: str, tmp_path: Path) -> None:
        self.store = PatientIndexStore(
            make_engine(HdxSettings(data_dir=tmp_path, database_url=database_url))
        )

    def stage(self) -> IdentifyStage:
        service = PatientIndexService(self.store, Matcher(), TrustedSystems(), clock=lambda: 1)
        assert service.load()
        return IdentifyStage(service, TOPICS)

    def rows(self, model: Any) -> list[Any]:
        with self.store.reading() as s:
            return list(s.exec(select(model)))

    def clear(self) -> None:
        """Empty every table (the schema stays), for a second run on the same database."""
        tables = [t for t in inspect(self.store.engine).get_table_names() if t.startswith("pix_")]
        with self.store.engine.begin() as conn:
            for table in tables:
                conn.exec_driver_sql(f"DELETE FROM {table}")


@pytest.fixture
def index(database_url: str, tmp_path: Path) -> Iterator[Index]:
    made = Index(database_url, tmp_path)
    yield made
    made.store.engine.dispose()


def _canonical(index: Index, out: Sequence[Outgoing]) -> dict[str, Any]:
    """What the index emitted and stored, with person ids numbered by first appearance."""
    persons: dict[str, str] = {}

    def p(person_id: str) -> str:
        return persons.setdefault(person_id, f"P{len(persons)}")

    emitted = []
    for o in out:
        doc = orjson.loads(o.value)
        person = o.headers.get("hdx_person") or doc.get("person")
        emitted.append(
            (
                o.topic,
                doc.get("id") or doc.get("local_id"),
                p(person),
                o.headers.get("hdx_person_identifiers"),
                o.headers.get("hdx_identity"),
            )
        )
    records = sorted(
        (r.source, r.local_id, p(r.person_id), r.version, r.last_event_id, r.demographics)
        for r in index.rows(SourceRecordRow)
    )
    keys = {r.id: (r.source, r.local_id) for r in index.rows(SourceRecordRow)}
    goldens = {}
    for row in index.rows(PersonRow):
        golden = orjson.loads(row.golden)
        golden.pop("id")
        golden["identifier"] = golden["identifier"][1:]  # the first is the person's own
        goldens[p(row.id)] = (golden, row.trusted_ids, row.version, row.possible_match)
    return {
        "emitted": emitted,
        "records": records,
        "persons": dict(sorted(goldens.items())),
        "links": sorted(
            (r.source, r.local_id, p(r.person_id), r.grade, r.weight, r.event_id)
            for r in index.rows(LinkRow)
        ),
        "tasks": sorted(
            (t.reason, t.source, t.local_id, p(t.person_id), p(t.candidate_person_id))
            for t in index.rows(ReviewTaskRow)
        ),
        "trusted": sorted((t.system, t.value, p(t.person_id)) for t in index.rows(TrustedIdRow)),
        "identifiers": sorted(
            (keys[i.record_id], i.system, i.value, i.trusted, p(i.person_id))
            for i in index.rows(IdentifierRow)
        ),
        "parked": sorted((r.local_id, r.released_by) for r in index.rows(ParkedRow)),
    }


def _traffic() -> list[Inbound]:
    """Many records of one person across sources, updates, a possible match, a trusted-id
    conflict, resources before their Patient, and one Patient twice in the batch."""
    return [
        msg(observation("o1", "p1")),  # before its Patient: parked, then released
        msg(patient("p1", nhs=NHS_A, **ADA), event_id="p1-a"),
        msg(patient("r1", nhs=NHS_A, family="LOVELACE"), RIVERSIDE, event_id="r1-a"),
        msg(observation("o2", "r1"), RIVERSIDE),
        msg(patient("g1", **ADA), GP, event_id="g1-a"),  # no NHS number: demographics
        msg(patient("c1", nhs=NHS_A, given="Augusta Ada", **ADA), CARE, event_id="c1-a"),
        msg(patient("p1", nhs=NHS_A, phone="020 7946 0000", **ADA), event_id="p1-b"),
        msg(patient("w1"), WALK_IN, event_id="w1-a"),  # a possible match: review task
        msg(observation("o3", "w1"), WALK_IN),  # uncertain from here on
        msg(patient("b1", family="Babbage", given="Charles", nhs=NHS_B), event_id="b1-a"),
        msg(patient("r1", nhs=NHS_B, family="LOVELACE"), RIVERSIDE, event_id="r1-b"),  # conflict
        msg(observation("o4", "p1")),
        msg(observation("o5", "c1"), CARE),
        msg(observation("o6", "nobody")),  # parked, stays parked
    ]


def _run(index: Index, batches: Sequence[Sequence[Inbound]]) -> list[Outgoing]:
    stage = index.stage()
    out: list[Outgoing] = []
    for batch in batches:
        out.extend(stage.process(batch))
    return out


def _one_by_one_then_batched(index: Index, traffic: list[Inbound]) -> tuple[Any, Any]:
    expected = _canonical(index, _run(index, [[m] for m in traffic]))
    index.clear()
    return _canonical(index, _run(index, [traffic])), expected


def test_one_batch_gives_what_one_message_at_a_time_gives(index: Index) -> None:
    got, expected = _one_by_one_then_batched(index, _traffic())
    assert got == expected
    # The traffic did what it is meant to: one person for p1/r1/g1/c1, a review task for
    # the walk-in and for r1's new NHS number, o6 still parked.
    assert len({r[2] for r in got["records"] if r[1] in ("p1", "r1", "g1", "c1")}) == 1
    assert {t[0] for t in got["tasks"]} == {"possible-match", "trusted-id-conflict"}
    assert got["parked"] == [("nobody", None), ("p1", "p1-a")]


def test_a_redelivered_batch_emits_to_the_same_persons_and_writes_nothing_new(
    index: Index,
) -> None:
    traffic = _traffic()
    stage = index.stage()
    first = stage.process(traffic)
    before = _canonical(index, first)
    again = stage.process(traffic)
    # No new link events; every resource goes to the person it went to the first time
    # (a resource parked the first time is now forwarded directly, and released again by
    # its redelivered Patient); the database is as it was.
    assert [o for o in again if o.topic == TOPICS.links] == []
    person_of = {orjson.loads(o.value)["id"]: o.key for o in first if o.topic == TOPICS.identified}
    assert {orjson.loads(o.value)["id"]: o.key for o in again} == person_of
    after = _canonical(index, first)
    # A record updated twice in the batch (p1, r1) is updated twice again (its last event
    # is not the first one redelivered): versions move on, nothing else changes.
    for state in (before, after):
        state["records"] = [r[:3] + r[4:] for r in state["records"]]
        state["persons"] = {p: (g, t, m) for p, (g, t, _, m) in state["persons"].items()}
    assert after == before


def test_a_redelivered_batch_on_another_replica_releases_again(index: Index) -> None:
    """A partition moved to another replica: what the first one parked and released is found
    from the database, not from a replica's memory."""
    a, b = index.stage(), index.stage()
    assert a.process([msg(observation("o1", "p1")), msg(observation("o2", "p1"))]) == []
    # The partition is reassigned: b gets the Patient and releases what a parked.
    out = b.process([msg(patient("p1", nhs=NHS_A), event_id="pat-1")])
    assert [orjson.loads(o.value)["id"] for o in out if o.topic == TOPICS.identified] == [
        "p1",
        "o1",
        "o2",
    ]
    # …and back to a, which sees the Patient redelivered (b's batch was not committed to
    # Kafka): released again, in order; and a new resource for p1 is not parked.
    again = a.process([msg(patient("p1", nhs=NHS_A), event_id="pat-1")])
    assert [orjson.loads(o.value)["id"] for o in again] == ["p1", "o1", "o2"]
    later = a.process([msg(observation("o3", "p1"))])
    assert [orjson.loads(o.value)["id"] for o in later] == ["o3"]
    assert {r.local_id for r in index.rows(ParkedRow) if r.released_ms is None} == set()


def test_resources_parked_by_another_replica_in_the_same_run_are_released(
    index: Index,
) -> None:
    a, b = index.stage(), index.stage()
    # b's first batch saw nothing parked for p1; a parks one afterwards.
    assert b.process([msg(observation("x1", "q1"))]) == []
    assert a.process([msg(observation("o1", "p1"))]) == []
    out = b.process([msg(patient("p1", nhs=NHS_A), event_id="pat-1")])
    assert [orjson.loads(o.value)["id"] for o in out if o.topic == TOPICS.identified] == [
        "p1",
        "o1",
    ]


def test_many_records_of_one_person_in_one_batch(index: Index) -> None:
    sources = [f"urn:hdx:org:site-{i}" for i in range(12)]
    traffic = [msg(patient(f"s{i}", nhs=NHS_A, **ADA), src) for i, src in enumerate(sources)]
    traffic += [msg(observation(f"o{i}", f"s{i}"), src) for i, src in enumerate(sources)]
    traffic += [
        msg(patient(f"s{i}", nhs=NHS_A, phone=f"020 7946 00{i:02d}", **ADA), src)
        for i, src in enumerate(sources)
    ]
    got, expected = _one_by_one_then_batched(index, traffic)
    assert got == expected
    assert len({p for topic, _, p, _, _ in got["emitted"] if topic == TOPICS.identified}) == 1
    [person] = index.rows(PersonRow)
    golden = orjson.loads(person.golden)
    assert len(golden["link"]) == len(sources)
    assert golden["telecom"][0]["value"] == "020 7946 0011"  # the latest update's
    assert person.version == 1 + 2 * len(sources)  # created, then 12 links and 12 updates
    assert len(index.rows(LinkRow)) == len(sources)
    assert len(index.rows(TrustedIdRow)) == 1
    assert len(index.rows(IdentifierRow)) == len(sources)


def test_a_review_task_opened_mid_batch_makes_the_rest_of_the_batch_uncertain(
    index: Index,
) -> None:
    stage = index.stage()
    stage.process([msg(patient("p1", nhs=NHS_A, **ADA))])
    out = stage.process(
        [
            msg(observation("o1", "p1")),  # certain
            msg(patient("w1"), WALK_IN),  # a possible match of p1's person
            msg(observation("o2", "p1")),  # now uncertain
        ]
    )
    identity = {
        orjson.loads(o.value)["id"]: o.headers.get("hdx_identity")
        for o in out
        if o.topic == TOPICS.identified
    }
    assert identity == {"o1": None, "w1": "uncertain", "o2": "uncertain"}


def test_a_trusted_id_claimed_earlier_in_the_batch_is_not_claimed_twice(
    index: Index,
) -> None:
    out = _run(
        index,
        [
            [
                msg(patient("p1", nhs=NHS_A, **ADA)),
                msg(patient("r1", nhs=NHS_A), RIVERSIDE),
                msg(patient("b1", family="Babbage", given="Charles", nhs=NHS_B)),
                msg(patient("b2", family="Babbage", given="Charles", nhs=NHS_B), RIVERSIDE),
            ]
        ],
    )
    persons = [o.headers["hdx_person"] for o in out if o.topic == TOPICS.identified]
    assert persons[0] == persons[1] and persons[2] == persons[3] and persons[0] != persons[2]
    assert sorted((t.value, t.person_id) for t in index.rows(TrustedIdRow)) == sorted(
        [(NHS_A, persons[0]), (NHS_B, persons[2])]
    )
    assert index.rows(ReviewTaskRow) == []
    assert {r.source for r in index.rows(SourceRecordRow)} == {ST_MARYS, RIVERSIDE}


def test_a_resource_twice_in_one_batch_is_parked_once_and_released_once(index: Index) -> None:
    """Parked rows of the batch are held until its end: the second copy of a resource (the
    same origin) is not parked again, and a Patient later in the batch releases it once."""
    obs = msg(observation("o1", "p1"))
    out = _run(index, [[obs, obs, msg(patient("p1", nhs=NHS_A), event_id="pat-1")]])
    identified = [orjson.loads(o.value)["id"] for o in out if o.topic == TOPICS.identified]
    assert identified == ["p1", "o1"]
    [row] = index.rows(ParkedRow)
    assert (row.local_id, row.released_by) == ("p1", "pat-1")
