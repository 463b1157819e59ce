"""Identity operations on a real database (SQLite, and PostgreSQL where reachable): the
link state of every source record (person, auto/manual, grade) before and after each
operation, stickiness, one person per record, versions, and what is published — link
events, AuditEvents, identity events, uncertainty headers and re-evaluated events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from pix_builders import NHS_A, NHS_B, RIVERSIDE, ST_MARYS, TOPICS, msg, observation, patient
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from hdx_patient_index.domain.identifiers import NHS_NUMBER, TrustedSystems
from hdx_patient_index.domain.identity import IDENTITY_CHANGE_EXTENSION
from hdx_patient_index.domain.matching import Matcher
from hdx_patient_index.models import (
    LinkRow,
    NoLinkRow,
    OutboxRow,
    PersonRow,
    ReviewTaskRow,
    SourceRecordRow,
)
from hdx_patient_index.operations import IdentityOperations, OperationResult
from hdx_patient_index.pipeline import IdentifyStage
from hdx_patient_index.service import PatientIndexService, VersionConflict, refresh_person
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.db import make_engine
from hdx_shared.fhir import FhirError, validate_resource
from hdx_shared.messaging import Outgoing
from hdx_shared.settings import HdxSettings

ADA_HOME = "SW1A 1AA"
GRACE: dict[str, Any] = {"family": "Hopper", "given": "Grace", "birth_date": "1906-12-09"}
P1, R9, G1 = (ST_MARYS, "p1"), (RIVERSIDE, "r9"), (ST_MARYS, "g1")
State = dict[tuple[str, str], tuple[str, str, str]]  # record → (person label, by, grade)


@dataclass
class World:
    """Ada (p1, NHS number, postcode), her possible twin (r9: same name, birth date and
    gender only — a possible match and a review task) and Grace (g1, another NHS number)."""

    store: PatientIndexStore
    service: PatientIndexService
    stage: IdentifyStage
    ops: IdentityOperations
    ada: str
    twin: str
    grace: str

    def label(self, person: str) -> str:
        return {self.ada: "ada", self.twin: "twin", self.grace: "grace"}.get(person, "new")

    def state(self) -> State:
        with self.store.reading() as s:
            links = s.exec(select(LinkRow).where(LinkRow.superseded_ms == None))  # noqa: E711
            return {(r.source, r.local_id): (self.label(r.person_id), r.by, r.grade) for r in links}

    def person(self, person_id: str) -> PersonRow:
        row = self.store.person(person_id)
        assert row is not None
        return row

    def task(self, reason: str = "possible-match", status: str = "open") -> ReviewTaskRow:
        [task] = [t for t in self.store.review_tasks(status, 1000) if t.reason == reason]
        return task

    def rows(self, model: Any) -> list[Any]:
        with self.store.reading() as s:
            return list(s.exec(select(model)))

    def outbox(self) -> list[Outgoing]:
        return [
            Outgoing(r.topic, r.value, r.key, orjson.loads(r.headers)) for r in self.rows(OutboxRow)
        ]

    def published(self) -> list[Outgoing]:
        """Flush the outbox; what it published (and it is empty after)."""
        sent: list[Outgoing] = []

        async def publish(out: Sequence[Outgoing]) -> None:
            sent.extend(out)

        asyncio.run(self.ops.flush_outbox(publish))
        assert self.rows(OutboxRow) == []
        return sent


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    store = PatientIndexStore(
        make_engine(HdxSettings(data_dir=tmp_path, database_url=database_url))
    )
    service = PatientIndexService(store, Matcher(), TrustedSystems())
    assert service.load()
    stage = IdentifyStage(service, TOPICS)
    out = stage.process(
        [
            msg(patient("p1", nhs=NHS_A, postcode=ADA_HOME)),
            msg(patient("r9"), RIVERSIDE),
            msg(patient("g1", nhs=NHS_B, **GRACE)),
        ]
    )
    ada, twin, grace = (o.headers["hdx_person"] for o in out if o.topic == TOPICS.identified)
    assert len({ada, twin, grace}) == 3
    yield World(store, service, stage, IdentityOperations(service, TOPICS), ada, twin, grace)
    store.engine.dispose()


BEFORE: State = {
    P1: ("ada", "auto", "certain"),
    R9: ("twin", "auto", "possible"),
    G1: ("grace", "auto", "certain"),
}


def resolve(resolution: str) -> Callable[[World], OperationResult]:
    return lambda w: w.ops.resolve(w.task().id, resolution, "dr-a")


def merge_grace(w: World) -> OperationResult:
    return w.ops.merge(w.ada, w.grace, "dr-a")


def then(*steps: Callable[[World], OperationResult]) -> Callable[[World], OperationResult]:
    def run(w: World) -> OperationResult:
        result = steps[0](w)
        for step in steps[1:]:
            result = step(w)
        return result

    return run


CASES: list[tuple[str, Callable[[World], OperationResult], State]] = [
    (
        "review: same person → the twin's record joins Ada",
        resolve("same-person"),
        {**BEFORE, R9: ("ada", "manual", "certain")},
    ),
    (
        "review: different person → it stays the twin's, by a person's decision",
        resolve("different-person"),
        {**BEFORE, R9: ("twin", "manual", "certain")},
    ),
    (
        "manual link of the twin's record to Ada",
        lambda w: w.ops.link(w.ada, *R9, "dr-a"),
        {**BEFORE, R9: ("ada", "manual", "certain")},
    ),
    (
        "manual link of Grace's record to Ada",
        lambda w: w.ops.link(w.ada, *G1, "dr-a"),
        {**BEFORE, G1: ("ada", "manual", "certain")},
    ),
    (
        "manual link, then unlink: a new person of its own",
        then(lambda w: w.ops.link(w.ada, *R9, "dr-a"), lambda w: w.ops.unlink(w.ada, *R9, "dr-b")),
        {**BEFORE, R9: ("new", "manual", "certain")},
    ),
    (
        "merge Grace into Ada: probable until reviewed",
        merge_grace,
        {**BEFORE, G1: ("ada", "manual", "probable")},
    ),
    (
        "merge, review confirms it",
        then(merge_grace, lambda w: w.ops.resolve(w.task("merge-review").id, "same-person", "b")),
        {**BEFORE, G1: ("ada", "manual", "certain")},
    ),
    (
        "merge, unmerge: Grace's record is Grace's again",
        then(merge_grace, lambda w: w.ops.unmerge(w.ada, "dr-b")),
        {**BEFORE, G1: ("grace", "manual", "certain")},
    ),
    (
        "merge, review says different persons: an unmerge",
        then(
            merge_grace,
            lambda w: w.ops.resolve(w.task("merge-review").id, "different-person", "dr-b"),
        ),
        {**BEFORE, G1: ("grace", "manual", "certain")},
    ),
]


@pytest.mark.parametrize(("name", "operation", "after"), CASES, ids=[c[0] for c in CASES])
def test_link_states_before_and_after_each_operation(
    world: World, name: str, operation: Callable[[World], OperationResult], after: State
) -> None:
    assert world.state() == BEFORE
    result = operation(world)
    assert world.state() == after, name
    # Never two current links, and the source records agree with them.
    with world.store.reading() as s:
        for rec in s.exec(select(SourceRecordRow)):
            current = [
                r
                for r in s.exec(
                    select(LinkRow).where(
                        LinkRow.source == rec.source, LinkRow.local_id == rec.local_id
                    )
                )
                if r.superseded_ms is None
            ]
            assert [c.person_id for c in current] == [rec.person_id]
    # Every person the operation changed has a new version, as the result says.
    for person, version in result.persons.items():
        assert world.person(person).version == version
    # The in-memory index follows the database.
    for (source, local_id), (label, _, _) in after.items():
        indexed = world.service.index.person_of((source, local_id))
        assert indexed is not None and world.label(indexed) == label


def test_a_review_said_same_person_retires_the_duplicate_person(world: World) -> None:
    task = world.task()
    world.ops.resolve(task.id, "same-person", "dr-a")
    twin = world.person(world.twin)
    assert (twin.status, twin.replaced_by) == ("merged", world.ada)
    assert orjson.loads(twin.golden)["active"] is False
    resolved = world.store.review_task(task.id)
    assert resolved is not None
    assert (resolved.status, resolved.resolution, resolved.resolved_by) == (
        "resolved",
        "same-person",
        "dr-a",
    )
    with pytest.raises(FhirError) as exc:  # resolved once, only once
        world.ops.resolve(task.id, "different-person", "dr-b")
    assert exc.value.http_status == 409


def test_the_golden_record_after_a_merge_follows_survivorship(world: World) -> None:
    world.ops.merge(world.ada, world.grace, "dr-a")
    golden = orjson.loads(world.person(world.ada).golden)
    # Demographics: the most recently updated source record's (Grace's came second).
    assert golden["name"][0]["family"] == "Hopper" and golden["birthDate"] == "1906-12-09"
    # Identifiers: the survivor's id first, then every trusted one of both.
    assert golden["identifier"][0]["value"] == world.ada
    assert [i["value"] for i in golden["identifier"][1:]] == [NHS_A, NHS_B]
    # Links: the merged person (replaces), then each source record (seealso).
    assert [(lk["type"], lk["other"]["identifier"]["value"]) for lk in golden["link"]] == [
        ("replaces", world.grace),
        ("seealso", "g1"),
        ("seealso", "p1"),
    ]
    validate_resource(golden)
    world.ops.unmerge(world.ada, "dr-b")
    golden = orjson.loads(world.person(world.ada).golden)
    assert golden["name"][0]["family"] == "Lovelace"
    assert [i["value"] for i in golden["identifier"]] == [world.ada, NHS_A]
    assert orjson.loads(world.person(world.grace).golden)["name"][0]["family"] == "Hopper"


def test_resolving_clears_the_possible_match_flag(world: World) -> None:
    assert world.person(world.twin).possible_match
    world.ops.resolve(world.task().id, "different-person", "dr-a")
    assert not world.person(world.twin).possible_match


def test_a_no_link_is_sticky_the_matcher_never_offers_that_person_again(world: World) -> None:
    world.ops.resolve(world.task().id, "different-person", "dr-a")
    [no] = world.rows(NoLinkRow)
    assert (no.source, no.local_id, no.person_id, no.reviewer) == (*R9, world.ada, "dr-a")
    # The twin's record is updated: now it matches Ada strongly (same postcode) — it keeps
    # its person, and no review offers Ada for it again.
    world.stage.process([msg(patient("r9", postcode=ADA_HOME), RIVERSIDE, event_id="upd-1")])
    assert world.state()[R9] == ("twin", "manual", "certain")
    assert world.store.review_tasks("open") == []


def test_a_manual_link_is_sticky(world: World) -> None:
    world.ops.link(world.ada, *G1, "dr-a")
    world.stage.process([msg(patient("g1", nhs=NHS_B, **GRACE), event_id="upd-2")])
    assert world.state()[G1] == ("ada", "manual", "certain")


def test_a_source_record_is_never_linked_to_two_persons_at_once(world: World) -> None:
    second_link = LinkRow(source=P1[0], local_id=P1[1], person_id=world.grace, grade="certain")
    second_record = SourceRecordRow(
        source=P1[0], local_id=P1[1], person_id=world.grace, demographics="{}", snapshot="{}"
    )
    for row in (second_link, second_record):
        with world.store.transaction() as s:
            s.add(row)
            with pytest.raises(IntegrityError):
                s.flush()
            s.rollback()
    # A superseded link is history, not a second link.
    with world.store.transaction() as s:
        s.add(
            LinkRow(
                source=P1[0],
                local_id=P1[1],
                person_id=world.grace,
                grade="certain",
                superseded_ms=1,
            )
        )
    assert world.state() == BEFORE


def test_a_stale_version_is_a_conflict_not_a_silent_merge(world: World) -> None:
    seen = world.person(world.ada).version
    world.ops.link(world.ada, *R9, "dr-a", versions={world.ada: seen})
    with pytest.raises(VersionConflict):  # the same version again: Ada changed since
        world.ops.merge(world.ada, world.grace, "dr-b", versions={world.ada: seen})
    assert world.state()[G1] == ("grace", "auto", "certain")
    world.ops.merge(world.ada, world.grace, "dr-b", versions={world.ada: seen + 1})


def test_a_concurrent_change_between_read_and_write_is_detected(world: World) -> None:
    """Two transactions read the same version; the second to write loses."""
    engine = world.store.engine
    from sqlmodel import Session

    with Session(engine) as first:
        seen = first.get(PersonRow, world.ada)  # read version n (and keep it)
        assert seen is not None
        with Session(engine) as second:
            refresh_person(second, world.ada, 1, TrustedSystems())  # n → n + 1
            second.commit()
        with pytest.raises(VersionConflict):
            refresh_person(first, world.ada, 2, TrustedSystems())
        first.rollback()


def test_operations_refuse_what_makes_no_sense(world: World) -> None:
    def status(call: Callable[[], object]) -> int:
        with pytest.raises(FhirError) as exc:
            call()
        return exc.value.http_status

    assert status(lambda: world.ops.merge(world.ada, world.ada, "x")) == 422
    assert status(lambda: world.ops.merge(world.ada, "nobody", "x")) == 404
    assert status(lambda: world.ops.unlink(world.ada, *P1, "x")) == 422  # her only record
    assert status(lambda: world.ops.unlink(world.ada, *G1, "x")) == 422  # not hers
    assert status(lambda: world.ops.link(world.ada, "urn:x", "none", "x")) == 404
    assert status(lambda: world.ops.link(world.ada, *R9, "  ")) == 422  # who decides?
    assert status(lambda: world.ops.resolve("no-task", "same-person", "x")) == 404
    assert status(lambda: world.ops.resolve(world.task().id, "perhaps", "x")) == 422
    world.ops.merge(world.ada, world.grace, "x")
    assert status(lambda: world.ops.link(world.grace, *R9, "x")) == 409  # merged away
    world.ops.unmerge(world.ada, "x")
    assert status(lambda: world.ops.unmerge(world.ada, "x")) == 404  # nothing in force
    assert world.state()[G1] == ("grace", "manual", "certain")


# ---- uncertainty and what is published ---------------------------------------------------


def candidates(o: Outgoing) -> list[dict[str, Any]]:
    value: list[dict[str, Any]] = orjson.loads(o.headers["hdx_candidate_persons"])
    return value


def test_a_possible_match_makes_both_persons_uncertain(world: World) -> None:
    out = world.stage.process(
        [msg(observation("o9", "r9"), RIVERSIDE), msg(observation("o1", "p1"))]
    )
    twin_obs, ada_obs = out
    assert twin_obs.headers["hdx_identity"] == "uncertain"
    assert candidates(twin_obs) == [
        {"person": world.twin, "identifiers": []},
        {"person": world.ada, "identifiers": [f"{NHS_NUMBER}|{NHS_A}"]},
    ]
    # Ada's side too: the twin may be her, and the twin's consents may be hers.
    assert ada_obs.headers["hdx_identity"] == "uncertain"
    assert [c["person"] for c in candidates(ada_obs)] == [world.ada, world.twin]
    # Grace is certain: no headers.
    [grace_obs] = world.stage.process([msg(observation("o7", "g1"))])
    assert "hdx_identity" not in grace_obs.headers
    assert "hdx_candidate_persons" not in grace_obs.headers


def test_identity_headers_from_upstream_are_never_trusted(world: World) -> None:
    m = msg(observation("o7", "g1"))
    forged = m.envelope.with_extra(hdx_identity="uncertain", hdx_candidate_persons="[]")
    from dataclasses import replace

    [out] = world.stage.process([replace(m, envelope=forged)])
    assert "hdx_identity" not in out.headers and "hdx_candidate_persons" not in out.headers


def test_resolving_as_different_re_emits_the_uncertain_events_once(world: World) -> None:
    world.published()  # nothing yet
    emitted = world.stage.process([msg(observation("o9", "r9"), RIVERSIDE, event_id="twin-obs")])
    result = world.ops.resolve(world.task().id, "different-person", "dr-a")
    # The twin's Patient (emitted while uncertain) and its Observation, Ada's none.
    assert set(result.reemitted) >= {"twin-obs"}
    sent = world.published()
    by_topic: dict[str, list[Outgoing]] = {}
    for o in sent:
        by_topic.setdefault(o.topic, []).append(o)

    again = [o for o in by_topic[TOPICS.identified] if o.headers.get("hdx_reevaluation") == "1"]
    obs = next(o for o in again if o.headers["ce_id"] == "twin-obs")
    assert obs.headers["hdx_resolution"] == result.operation
    assert obs.headers["hdx_person"] == world.twin and obs.key == world.twin.encode()
    assert "hdx_identity" not in obs.headers  # certain now
    assert orjson.loads(obs.value)["subject"]["identifier"]["value"] == world.twin
    assert orjson.loads(obs.value)["subject"] == orjson.loads(emitted[0].value)["subject"]

    # The links topic: the record's link is now a person's decision, with its no-link.
    [link] = by_topic[TOPICS.links]
    assert link.key == f"{RIVERSIDE}|r9".encode()
    assert orjson.loads(link.value) == {
        "person": world.twin,
        "source": RIVERSIDE,
        "local_id": "r9",
        "grade": "certain",
        "by": "manual",
        "operation": "separate",
        "no_link": [world.ada],
    }

    # An AuditEvent, ids only.
    [audit] = by_topic[TOPICS.audit]
    event = orjson.loads(audit.value)
    validate_resource(event)
    assert event["subtype"][0]["code"] == "separate"
    assert event["agent"][0]["who"]["identifier"]["value"] == "dr-a"
    assert event["entity"][0]["what"] == {"reference": f"Patient/{world.twin}"}
    assert NHS_A not in audit.value.decode() and "Lovelace" not in audit.value.decode()
    assert audit.headers["hdx_person"] == world.twin
    assert "hdx_person_identifiers" not in audit.headers

    # One identity event, for the twin (Ada's recipients learn nothing new).
    [identity] = [o for o in by_topic[TOPICS.identified] if "hdx_identity_change" in o.headers]
    patient_doc = orjson.loads(identity.value)
    validate_resource(patient_doc)
    assert identity.headers["hdx_resource_type"] == "Patient"
    assert identity.headers["hdx_person"] == world.twin
    ext = {
        e["url"]: e
        for e in next(x for x in patient_doc["extension"] if x["url"] == IDENTITY_CHANGE_EXTENSION)[
            "extension"
        ]
    }
    assert ext["action"]["valueCode"] == "separate" and ext["by"]["valueCode"] == "manual"
    assert ext["grade"]["valueCode"] == "possible" and ext["weight"]["valueDecimal"] > 18
    agreed = [
        e["valueString"]
        for e in next(x for x in patient_doc["extension"])["extension"]
        if e["url"] == "agreed"
    ]
    assert {"family", "given", "birth_date", "gender"} <= set(agreed)
    assert ext["record"]["valueIdentifier"] == {"system": RIVERSIDE, "value": "r9"}
    assert ext["other"]["valueReference"]["identifier"]["value"] == world.ada

    # Resolved once: a later batch for the twin is certain and nothing is re-emitted again.
    [later] = world.stage.process([msg(observation("o10", "r9"), RIVERSIDE)])
    assert "hdx_identity" not in later.headers
    world.ops.link(world.twin, *R9, "dr-a")
    assert [o for o in world.published() if o.headers.get("hdx_reevaluation")] == []


def test_resolving_as_same_person_re_emits_under_the_resolved_person(world: World) -> None:
    world.stage.process([msg(observation("o9", "r9"), RIVERSIDE, event_id="twin-obs")])
    world.ops.resolve(world.task().id, "same-person", "dr-a")
    sent = world.published()
    obs = next(o for o in sent if o.headers.get("ce_id") == "twin-obs")
    assert obs.headers["hdx_person"] == world.ada
    assert obs.headers["hdx_person_identifiers"] == f"{NHS_NUMBER}|{NHS_A}"
    # The twin's person is retired: its identity event says it was replaced by Ada.
    retired = next(
        o
        for o in sent
        if "hdx_identity_change" in o.headers and o.headers["hdx_person"] == world.twin
    )
    doc = orjson.loads(retired.value)
    assert doc["active"] is False
    assert {"type": "replaced-by"}.items() <= doc["link"][0].items()


def test_a_merge_is_uncertain_until_reviewed_and_an_unmerge_lists_what_was_emitted(
    world: World,
) -> None:
    world.ops.resolve(world.task().id, "different-person", "dr-a")  # the twin out of the way
    world.published()
    merged = world.ops.merge(world.ada, world.grace, "dr-a")
    assert merged.merge and merged.task
    sent = world.published()
    identity = {o.headers["hdx_person"]: o for o in sent if "hdx_identity_change" in o.headers}
    survivor_doc = orjson.loads(identity[world.ada].value)
    retired_doc = orjson.loads(identity[world.grace].value)
    for doc in (survivor_doc, retired_doc):
        validate_resource(doc)
    assert any(lk["type"] == "replaces" for lk in survivor_doc["link"])
    assert retired_doc["active"] is False
    # The retired person's event is decided on Grace's own identifiers.
    assert identity[world.grace].headers["hdx_person_identifiers"] == f"{NHS_NUMBER}|{NHS_B}"

    # During the merge: Grace's data is stamped Ada, and both persons' consents apply.
    [during] = world.stage.process([msg(observation("o5", "g1"), event_id="during-merge")])
    assert during.headers["hdx_person"] == world.ada
    assert during.headers["hdx_identity"] == "uncertain"
    assert candidates(during) == [
        {
            "person": world.ada,
            "identifiers": sorted([f"{NHS_NUMBER}|{NHS_A}", f"{NHS_NUMBER}|{NHS_B}"]),
        },
        {"person": world.ada, "identifiers": [f"{NHS_NUMBER}|{NHS_A}"]},
        {"person": world.grace, "identifiers": [f"{NHS_NUMBER}|{NHS_B}"]},
    ]
    golden = orjson.loads(world.person(world.ada).golden)
    assert {i["value"] for i in golden["identifier"]} >= {NHS_A, NHS_B, world.ada}

    unmerged = world.ops.unmerge(world.ada, "dr-b")
    assert [e["event_id"] for e in unmerged.events] == ["during-merge"]
    merge = world.store.merge(merged.merge)
    assert merge is not None and merge.status == "unmerged"
    assert [e.event_id for e in world.store.merge_events(merge)] == ["during-merge"]
    # The event emitted under the merge goes again, as Grace's now.
    again = next(o for o in world.published() if o.headers.get("ce_id") == "during-merge")
    assert again.headers["hdx_person"] == world.grace and again.headers["hdx_reevaluation"] == "1"
    # Each person is certain again, with their own identifiers.
    [after] = world.stage.process([msg(observation("o6", "g1"))])
    assert after.headers["hdx_person"] == world.grace and "hdx_identity" not in after.headers
    assert after.headers["hdx_person_identifiers"] == f"{NHS_NUMBER}|{NHS_B}"
    assert orjson.loads(world.person(world.grace).golden)["active"] is True


def test_a_confirmed_merge_is_certain_and_still_listed_for_an_unmerge(world: World) -> None:
    world.ops.resolve(world.task().id, "different-person", "dr-a")
    merged = world.ops.merge(world.ada, world.grace, "dr-a")
    world.ops.resolve(world.task("merge-review").id, "same-person", "dr-b")
    [out] = world.stage.process([msg(observation("o5", "g1"), event_id="after-confirm")])
    assert "hdx_identity" not in out.headers
    assert out.headers["hdx_person_identifiers"] == " ".join(
        sorted([f"{NHS_NUMBER}|{NHS_A}", f"{NHS_NUMBER}|{NHS_B}"])
    )
    unmerged = world.ops.unmerge(world.ada, "dr-c", merge_id=merged.merge)
    assert [e["event_id"] for e in unmerged.events] == ["after-confirm"]
    assert [e["uncertain"] for e in unmerged.events] == [False]


def test_a_record_that_joined_during_a_merge_is_reviewed_after_the_unmerge(world: World) -> None:
    world.ops.resolve(world.task().id, "different-person", "dr-a")
    world.ops.merge(world.ada, world.grace, "dr-a")
    # Grace's NHS number from another hospital: linked to the survivor by the matcher.
    [joined, _] = world.stage.process([msg(patient("x1", nhs=NHS_B, **GRACE), RIVERSIDE)])
    assert joined.headers["hdx_person"] == world.ada
    world.ops.unmerge(world.ada, "dr-b")
    task = world.task("joined-during-merge")
    assert (task.source, task.local_id, task.candidate_person_id) == (
        RIVERSIDE,
        "x1",
        world.grace,
    )
    [obs] = world.stage.process([msg(observation("o1", "p1"))])
    assert obs.headers["hdx_identity"] == "uncertain"  # until a person looks at x1
