"""The stage handler on a real database (SQLite, and PostgreSQL where reachable), no broker."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from pix_builders import NHS_A, NHS_B, NHS_C, RIVERSIDE, ST_MARYS, TOPICS, msg, observation, patient
from sqlmodel import select

from hdx_patient_index.domain.identifiers import NHS_NUMBER, PERSON_SYSTEM, TrustedSystems
from hdx_patient_index.domain.matching import Matcher
from hdx_patient_index.models import LinkRow, ParkedRow, PersonRow, SourceRecordRow
from hdx_patient_index.pipeline import IdentifyStage
from hdx_patient_index.service import PatientIndexService
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.db import make_engine
from hdx_shared.messaging import Inbound, Outgoing, Unavailable
from hdx_shared.settings import HdxSettings

ADA: dict[str, Any] = {"postcode": "SW1A 1AA"}


@dataclass
class Clock:
    now: int = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


@dataclass
class Harness:
    store: PatientIndexStore
    clock: Clock
    services: list[PatientIndexService] = field(default_factory=list)

    def stage(self) -> IdentifyStage:
        service = PatientIndexService(self.store, Matcher(), TrustedSystems(), clock=self.clock)
        assert service.load()
        self.services.append(service)
        return IdentifyStage(service, TOPICS)

    def rows(self, model: Any) -> list[Any]:
        with self.store.reading() as s:
            return list(s.exec(select(model)))


@pytest.fixture
def harness(database_url: str, tmp_path: Path) -> Iterator[Harness]:
    store = PatientIndexStore(
        make_engine(HdxSettings(data_dir=tmp_path, database_url=database_url))
    )
    yield Harness(store, Clock())
    store.engine.dispose()


@pytest.fixture
def stage(harness: Harness) -> IdentifyStage:
    return harness.stage()


def on(topic: str, out: Sequence[Outgoing]) -> list[Outgoing]:
    return [o for o in out if o.topic == topic]


def person_of(o: Outgoing) -> str:
    return o.headers["hdx_person"]


def test_a_patient_gets_a_person_id_and_a_link_event(stage: IdentifyStage) -> None:
    out = stage.process([msg(patient("p1", nhs=NHS_A, **ADA))])
    assert [o.topic for o in out] == [TOPICS.identified, TOPICS.links]
    ident, link = out
    doc = orjson.loads(ident.value)
    person = person_of(ident)
    assert doc["identifier"][-1] == {"system": PERSON_SYSTEM, "value": person}
    assert doc["identifier"][0] == {"system": NHS_NUMBER, "value": NHS_A}
    assert ident.key == person.encode()
    assert ident.headers["hdx_person_identifiers"] == f"{NHS_NUMBER}|{NHS_A}"
    assert ident.headers["ce_source"] == ST_MARYS and ident.headers["hdx_patient_ref"] == "p1"
    assert ident.headers["traceparent"].startswith("00-0af7")
    assert link.key == f"{ST_MARYS}|p1".encode()
    assert orjson.loads(link.value) == {
        "person": person,
        "source": ST_MARYS,
        "local_id": "p1",
        "grade": "certain",
        "by": "auto",
    }


def test_a_redelivered_or_updated_patient_keeps_its_person_without_a_new_link(
    harness: Harness, stage: IdentifyStage
) -> None:
    first = stage.process([msg(patient("p1", nhs=NHS_A), event_id="e1")])
    person = person_of(first[0])
    again = stage.process([msg(patient("p1", nhs=NHS_A), event_id="e1")])
    assert [o.topic for o in again] == [TOPICS.identified] and person_of(again[0]) == person
    # An update that changes everything but the record: still the same person.
    renamed = patient("p1", family="King", given="Augusta", birth_date="1816-01-01", nhs=NHS_A)
    updated = stage.process([msg(renamed, event_id="e2")])
    assert [o.topic for o in updated] == [TOPICS.identified] and person_of(updated[0]) == person
    [row] = harness.rows(PersonRow)
    golden = orjson.loads(row.golden)
    assert golden["name"][0]["family"] == "King" and golden["birthDate"] == "1816-01-01"
    [rec] = harness.rows(SourceRecordRow)
    assert rec.version == 2 and rec.last_event_id == "e2"
    assert len(harness.rows(LinkRow)) == 1


def test_the_same_nhs_number_from_another_source_is_the_same_person(stage: IdentifyStage) -> None:
    a = stage.process([msg(patient("p1", nhs=NHS_A, **ADA))])
    b = stage.process([msg(patient("x-77", family="LOVELACE", nhs=NHS_A), RIVERSIDE)])
    assert person_of(b[0]) == person_of(a[0])
    link = orjson.loads(on(TOPICS.links, b)[0].value)
    assert link["grade"] == "certain" and link["source"] == RIVERSIDE


def test_different_nhs_numbers_are_different_people_whatever_the_demographics(
    harness: Harness, stage: IdentifyStage
) -> None:
    a = stage.process([msg(patient("p1", nhs=NHS_A, **ADA))])
    b = stage.process([msg(patient("p2", nhs=NHS_B, **ADA))])
    assert person_of(a[0]) != person_of(b[0])
    assert harness.services[0].store.review_tasks() == []


def test_strong_demographics_link_without_an_nhs_number(stage: IdentifyStage) -> None:
    a = stage.process([msg(patient("p1", nhs=NHS_A, **ADA))])
    b = stage.process([msg(patient("r9", **ADA), RIVERSIDE)])
    assert person_of(b[0]) == person_of(a[0])
    assert orjson.loads(on(TOPICS.links, b)[0].value)["grade"] == "probable"
    # The person's trusted identifiers travel with the record that had none.
    assert b[0].headers["hdx_person_identifiers"] == f"{NHS_NUMBER}|{NHS_A}"


def test_a_possible_match_is_a_new_person_with_a_review_task(
    harness: Harness, stage: IdentifyStage
) -> None:
    a = stage.process([msg(patient("p1", nhs=NHS_A, **ADA))])
    b = stage.process([msg(patient("r9"), RIVERSIDE)])  # name, birth date, gender only
    assert person_of(b[0]) != person_of(a[0])
    link = orjson.loads(on(TOPICS.links, b)[0].value)
    assert link["grade"] == "possible" and link["possible_match"] is True
    [task] = harness.services[0].store.review_tasks()
    assert task.reason == "possible-match" and task.source == RIVERSIDE
    assert task.person_id == person_of(b[0]) and task.candidate_person_id == person_of(a[0])
    assert "birth_date" in orjson.loads(task.levels)
    rows = {r.id: r for r in harness.rows(PersonRow)}
    assert rows[person_of(b[0])].possible_match and not rows[person_of(a[0])].possible_match
    # Redelivered: no second task.
    stage.process([msg(patient("r9"), RIVERSIDE)])
    assert len(harness.services[0].store.review_tasks()) == 1


def test_an_observation_is_stamped_with_the_person(stage: IdentifyStage) -> None:
    person = person_of(stage.process([msg(patient("p1", nhs=NHS_A))])[0])
    [out] = stage.process([msg(observation("o1", "p1"))])
    doc = orjson.loads(out.value)
    assert doc["subject"] == {
        "reference": "Patient/p1",
        "display": "the patient",
        "identifier": {"system": PERSON_SYSTEM, "value": person},
    }
    assert out.topic == TOPICS.identified and out.key == person.encode()
    assert out.headers["hdx_person"] == person
    assert out.headers["hdx_person_identifiers"] == f"{NHS_NUMBER}|{NHS_A}"
    assert out.headers["hdx_resource_type"] == "Observation"


def test_the_patient_element_is_stamped_too(stage: IdentifyStage) -> None:
    person = person_of(stage.process([msg(patient("p1", nhs=NHS_A))])[0])
    allergy = {
        "resourceType": "AllergyIntolerance",
        "id": "a1",
        "patient": {"reference": "Patient/p1"},
    }
    [out] = stage.process([msg(allergy)])
    assert orjson.loads(out.value)["patient"]["identifier"]["value"] == person


def test_resources_wait_for_their_patient_and_follow_it_in_order(
    harness: Harness, stage: IdentifyStage
) -> None:
    assert stage.process([msg(observation("o1", "p1"))]) == []
    assert stage.process([msg(observation("o2", "p1"))]) == []
    assert [r.local_id for r in harness.rows(ParkedRow)] == ["p1", "p1"]
    out = stage.process([msg(patient("p1", nhs=NHS_A), event_id="pat-1")])
    idents = on(TOPICS.identified, out)
    assert [orjson.loads(o.value)["id"] for o in idents] == ["p1", "o1", "o2"]
    person = person_of(idents[0])
    for o in idents[1:]:
        assert o.key == person.encode() and person_of(o) == person
        assert orjson.loads(o.value)["subject"]["identifier"]["value"] == person
    assert all(r.released_by == "pat-1" for r in harness.rows(ParkedRow))
    # The Patient redelivered (its batch was not committed to Kafka): released again.
    again = stage.process([msg(patient("p1", nhs=NHS_A), event_id="pat-1")])
    assert [orjson.loads(o.value)["id"] for o in again] == ["p1", "o1", "o2"]
    # A later update of the Patient releases nothing.
    later = stage.process([msg(patient("p1", nhs=NHS_A, given="Augusta"), event_id="pat-2")])
    assert [orjson.loads(o.value)["id"] for o in later] == ["p1"]


def test_a_patient_later_in_the_same_batch_releases_what_came_before_it(
    stage: IdentifyStage,
) -> None:
    out = stage.process(
        [
            msg(observation("o1", "p1")),
            msg(patient("p1", nhs=NHS_A)),
            msg(observation("o2", "p1")),
        ]
    )
    ids = [orjson.loads(o.value)["id"] for o in on(TOPICS.identified, out)]
    assert ids == ["p1", "o1", "o2"]


def test_a_redelivered_resource_is_parked_once(harness: Harness, stage: IdentifyStage) -> None:
    m = msg(observation("o1", "p1"))
    stage.process([m])
    stage.process([m])
    assert len(harness.rows(ParkedRow)) == 1


def test_parked_resources_are_dead_lettered_after_the_timeout(
    harness: Harness, stage: IdentifyStage
) -> None:
    m = msg(observation("o1", "p1"))
    stage.process([m])
    published: list[Outgoing] = []

    async def publish(out: Sequence[Outgoing]) -> None:
        published.extend(out)

    import asyncio

    hour = 3_600_000
    assert asyncio.run(stage.expire_parked(publish, 24 * hour)) == 0
    harness.clock.now += 24 * hour + 1
    assert asyncio.run(stage.expire_parked(publish, 24 * hour)) == 1
    [dead] = published
    assert dead.topic == TOPICS.deadletter and dead.value == m.value
    assert dead.headers["hdx_reason"] == "patient-unknown"
    assert dead.headers["hdx_origin"] == m.origin
    outcome = orjson.loads(dead.headers["hdx_outcome"])
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "not-found"
    assert harness.rows(ParkedRow) == []
    out = stage.process([msg(patient("p1", nhs=NHS_A))])
    assert [orjson.loads(o.value)["id"] for o in on(TOPICS.identified, out)] == ["p1"]


def test_a_resource_without_a_patient_reference_is_dead_lettered(stage: IdentifyStage) -> None:
    orphan = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}}
    group = observation("o2", "p1")
    group["subject"] = {"reference": "Group/g1"}
    out = stage.process([msg(orphan), msg(group), msg({"resourceType": "Patient"})])
    assert [o.topic for o in out] == [TOPICS.deadletter] * 3
    assert {o.headers["hdx_reason"] for o in out} == {"no-patient"}
    outcome = orjson.loads(out[0].headers["hdx_outcome"])
    assert outcome["resourceType"] == "OperationOutcome"


def test_a_failed_batch_leaves_no_trace(harness: Harness, stage: IdentifyStage) -> None:
    class Boom(Exception):
        pass

    original = stage._one

    def failing(work: Any, m: Inbound, doc: Any) -> list[Outgoing]:
        if m.envelope.event_id == "boom":
            raise Boom
        return original(work, m, doc)

    stage._one = failing  # type: ignore[method-assign]
    with pytest.raises(Boom):
        stage.process([msg(patient("p1", nhs=NHS_A)), msg(patient("p2"), event_id="boom")])
    assert harness.rows(PersonRow) == [] and harness.rows(SourceRecordRow) == []
    assert not stage.service.loaded  # the index saw p1: it is rebuilt before the next batch
    out = stage.process([msg(patient("p1", nhs=NHS_A))])
    assert stage.service.loaded and len(harness.rows(PersonRow)) == 1
    assert len(stage.service.index) == 1 and person_of(out[0]) == harness.rows(PersonRow)[0].id


def test_the_index_is_loaded_from_the_database_at_start_up(harness: Harness) -> None:
    first = harness.stage()
    person = person_of(first.process([msg(patient("p1", nhs=NHS_A, **ADA))])[0])
    restarted = harness.stage()
    assert len(restarted.service.index) == 1
    out = restarted.process([msg(patient("r9", **ADA), RIVERSIDE)])
    assert person_of(out[0]) == person


def test_replicas_agree_on_a_trusted_id_the_other_one_linked(harness: Harness) -> None:
    a, b = harness.stage(), harness.stage()
    person = person_of(a.process([msg(patient("p1", nhs=NHS_A))])[0])
    # b's index has never seen p1; the trusted-id claim in the database is found anyway.
    out = b.process([msg(patient("z1", family="Byron", nhs=NHS_A), RIVERSIDE)])
    assert person_of(out[0]) == person
    # And b's refresh picks up what a writes from now on.
    c_person = person_of(a.process([msg(patient("p3", nhs=NHS_C, **ADA, given="Grace"))])[0])
    b.service.refresh()
    assert b.service.index.person_of((ST_MARYS, "p3")) == c_person


def test_an_update_that_conflicts_with_the_persons_trusted_id_is_flagged(
    harness: Harness, stage: IdentifyStage
) -> None:
    stage.process([msg(patient("p1", nhs=NHS_A))])
    stage.process([msg(patient("r1", nhs=NHS_A), RIVERSIDE)])
    stage.process([msg(patient("r1", nhs=NHS_B), RIVERSIDE, event_id="upd")])
    reasons = {t.reason for t in harness.services[0].store.review_tasks()}
    assert reasons == {"trusted-id-conflict"}


def test_a_database_that_cannot_be_opened_makes_the_stage_wait(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}"
    store = PatientIndexStore(make_engine(HdxSettings(data_dir=tmp_path, database_url=url)))
    service = PatientIndexService(store, Matcher(), TrustedSystems())
    assert not service.load() and service.error and "OperationalError" in service.error
    with pytest.raises(Unavailable):
        IdentifyStage(service, TOPICS).process([msg(patient("p1"))])


def test_a_database_lost_mid_run_is_unavailable_not_a_poison_message(tmp_path: Path) -> None:
    store = PatientIndexStore(
        make_engine(HdxSettings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/p.db"))
    )
    service = PatientIndexService(store, Matcher(), TrustedSystems())
    assert service.load()
    stage = IdentifyStage(service, TOPICS)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE pix_source_record")
    with pytest.raises(Unavailable):
        stage.process([msg(patient("p1"))])


def test_person_identifiers_follow_a_trusted_id_learnt_mid_batch(stage: IdentifyStage) -> None:
    out = stage.process(
        [
            msg(patient("p1", **ADA)),  # no NHS number yet
            msg(observation("o1", "p1")),
            msg(patient("r9", nhs=NHS_A, **ADA), RIVERSIDE),  # same person, with one
            msg(observation("o2", "p1")),
        ]
    )
    idents = on(TOPICS.identified, out)
    assert len({person_of(o) for o in idents}) == 1
    by_id = {orjson.loads(o.value)["id"]: o.headers.get("hdx_person_identifiers") for o in idents}
    assert by_id == {
        "p1": None,
        "o1": None,
        "r9": f"{NHS_NUMBER}|{NHS_A}",
        "o2": f"{NHS_NUMBER}|{NHS_A}",
    }
