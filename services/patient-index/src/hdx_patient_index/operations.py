"""What a person does to the index through the HTTP API: resolve a review task, link or
unlink a source record by hand, merge two persons, unmerge them.

Every operation is one database transaction that
- checks the versions it was given (If-Match; ``VersionConflict`` → HTTP 409) and bumps
  every person it changes with a compare-and-set, so two concurrent changes to one person
  never both succeed;
- keeps a source record linked to exactly one person (one current link row, a partial
  unique index in the database);
- records the decision as *manual*, so the matcher never overrides it: a manual link is
  never relinked, a no-link (``pix_no_link``) keeps the matcher from offering that person
  for that record again;
- writes to the outbox, in the same transaction: a link event per record that moved (links
  topic), an AuditEvent (hdx.audit), an identity event per person concerned
  (hdx.identified, a ``Patient``, see domain/identity.py), and — for every person whose
  identity is no longer uncertain — the events emitted while it was, again, with their
  original ids, the resolved person and ``hdx_reevaluation: 1``.

The outbox is published right after the commit (and by the outbox loop if that fails), so a
committed change is never lost and a publish never runs ahead of its commit. The in-memory
index is changed only after the commit.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from hdx_patient_index import store as db
from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.identity import (
    JOINED_DURING_MERGE,
    MERGE_REVIEW,
    MERGE_SOURCE,
    Action,
    Evidence,
    IdentityChange,
    identity_patient,
)
from hdx_patient_index.models import (
    IdentifierRow,
    LinkRow,
    MergeRow,
    NoLinkRow,
    OutboxRow,
    PersonRow,
    ReviewTaskRow,
    SourceRecordRow,
    TrustedIdRow,
)
from hdx_patient_index.outgoing import audit_outgoing, identity_outgoing, link_outgoing, reemitted
from hdx_patient_index.service import (
    LinkEvent,
    PatientIndexService,
    PersonRef,
    VersionConflict,
    identity_state,
    refresh_person,
)
from hdx_shared.fhir import FhirError, Issue
from hdx_shared.messaging import Outgoing
from hdx_shared.topics import Topics

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[Outgoing]], Awaitable[None]]

SAME = "same-person"
DIFFERENT = "different-person"
RESOLUTIONS = (SAME, DIFFERENT)
CERTAIN, PROBABLE = "certain", "probable"


def _error(status: int, reason: str, message: str, code: str) -> FhirError:
    return FhirError(reason, [Issue(message, code=code)], http_status=status)


def not_found(message: str) -> FhirError:
    return _error(404, "not-found", message, "not-found")


def conflict(message: str) -> FhirError:
    return _error(409, "conflict", message, "conflict")


def unprocessable(message: str) -> FhirError:
    return _error(422, "invalid-operation", message, "business-rule")


@dataclass(frozen=True)
class OperationResult:
    operation: str
    action: str
    persons: dict[str, int]  # every person changed → its version now
    records: list[dict[str, str]]  # the records concerned: source, local_id, person
    task: str | None = None  # the review task resolved (or opened, by a merge)
    merge: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # unmerge: emitted meanwhile
    reemitted: list[str] = field(default_factory=list)  # event ids re-emitted

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "operation": self.operation,
            "action": self.action,
            "persons": self.persons,
            "records": self.records,
            "reemitted": self.reemitted,
        }
        if self.task:
            out["task"] = self.task
        if self.merge:
            out["merge"] = self.merge
        if self.action == Action.UNMERGE.value:
            out["events"] = self.events
        return out


def event_json(row: Any) -> dict[str, Any]:
    return {
        "event_id": row.event_id,
        "source": row.source,
        "local_id": row.local_id,
        "resource_type": row.resource_type,
        "emitted_ms": row.emitted_ms,
        "uncertain": row.uncertain,
    }


class _Op:
    """One operation's transaction: what it changed, and what it will publish."""

    def __init__(
        self,
        ops: IdentityOperations,
        s: Session,
        action: Action,
        reviewer: str,
        versions: Mapping[str, int],
    ) -> None:
        self.ops, self.s, self.action, self.reviewer = ops, s, action, reviewer
        self.versions = dict(versions)
        self.id = str(uuid.uuid4())
        self.now = ops.service.clock()
        self.touched: dict[str, None] = {}
        self.moved: list[SourceRecordRow] = []
        self.links: list[LinkEvent] = []
        self.records: dict[tuple[str, str], None] = {}
        self.reemitted: list[str] = []

    # Reading, with the caller's versions checked ------------------------------------------
    def person(self, person_id: str, *, active: bool = True) -> PersonRow:
        row = self.s.get(PersonRow, person_id)
        if row is None:
            raise not_found(f"Patient/{person_id} is not known")
        expected = self.versions.get(person_id)
        if expected is not None and expected != row.version:
            raise VersionConflict(person_id)
        if active and row.status != "active":
            raise conflict(
                f"Patient/{person_id} was merged into Patient/{row.replaced_by}; "
                "operate on that person (or unmerge it first)"
            )
        return row

    def record(self, source: str, local_id: str) -> SourceRecordRow:
        rec = db.source_record(self.s, source, local_id)
        if rec is None:
            raise not_found(f"no source record Patient/{local_id} from {source}")
        return rec

    def evidence(self, rec: SourceRecordRow, person_id: str) -> Evidence:
        """How well the record matches the person's other records (the best of them)."""
        demo = Demographics.from_json(orjson.loads(rec.demographics))
        best: tuple[float, dict[str, str]] | None = None
        for other in db.records_of(self.s, person_id):
            if (other.source, other.local_id) == (rec.source, rec.local_id):
                continue
            theirs = Demographics.from_json(orjson.loads(other.demographics))
            weight, levels = self.ops.service.matcher.weigh(demo, theirs)
            if best is None or weight > best[0]:
                best = (weight, {str(f): str(lv) for f, lv in levels.items()})
        if best is None:
            return Evidence()
        grade = self.ops.service.matcher.grade_of(best[0])
        return Evidence(grade.value if grade else "certainly-not", round(best[0], 3), best[1])

    # Changing ----------------------------------------------------------------------------
    def touch(self, *person_ids: str) -> None:
        for p in person_ids:
            self.touched[p] = None

    def relink(
        self,
        rec: SourceRecordRow,
        to: str,
        *,
        grade: str,
        weight: float | None,
        operation: Action,
    ) -> None:
        """Make ``to`` the record's person (a manual link); supersede its current link."""
        s, now = self.s, self.now
        previous = rec.person_id
        current = db.current_link(s, rec.source, rec.local_id)
        if current is not None:
            current.superseded_ms = now
            s.add(current)
            s.flush()  # one current link per record: the old one goes first
        s.add(
            LinkRow(
                source=rec.source,
                local_id=rec.local_id,
                person_id=to,
                grade=grade,
                by="manual",
                weight=weight,
                event_id=self.id,
                operation=operation.value,
                created_ms=now,
            )
        )
        if previous != to:
            rec.person_id = to
            rec.linked_ms = now
            s.add(rec)
            assert rec.id is not None
            for ident in s.exec(select(IdentifierRow).where(IdentifierRow.record_id == rec.id)):
                ident.person_id = to
                s.add(ident)
            self._reclaim(rec, previous, to)
            self.moved.append(rec)
            self.touch(previous)
        s.flush()
        self.touch(to)
        self.records[(rec.source, rec.local_id)] = None
        no = tuple(n.person_id for n in db.no_links_of(s, rec.source, rec.local_id))
        self.links.append(
            LinkEvent(
                rec.source,
                rec.local_id,
                to,
                grade,
                False,
                by="manual",
                operation=operation.value,
                operation_id=self.id,
                weight=weight,
                no_link=no,
            )
        )

    def _reclaim(self, rec: SourceRecordRow, previous: str, to: str) -> None:
        """The record's trusted identifiers follow it (claims the old person held)."""
        for token in orjson.loads(rec.demographics).get("trusted", ()):
            system, _, value = str(token).partition("|")
            claim = self.s.get(TrustedIdRow, (system, value))
            if claim is None:
                self.s.add(TrustedIdRow(system=system, value=value, person_id=to))
            elif claim.person_id == previous:
                claim.person_id = to
                self.s.add(claim)

    def no_link(self, rec: SourceRecordRow, person_id: str) -> None:
        if db.no_link(self.s, rec.source, rec.local_id, person_id) is None:
            self.s.add(
                NoLinkRow(
                    source=rec.source,
                    local_id=rec.local_id,
                    person_id=person_id,
                    reviewer=self.reviewer,
                    operation=self.id,
                    created_ms=self.now,
                )
            )
            self.s.flush()

    def resolve_task(self, task: ReviewTaskRow, resolution: str) -> None:
        task.status = "resolved"
        task.resolution = resolution
        task.resolved_by = self.reviewer
        task.resolved_ms = self.now
        self.s.add(task)
        self.touch(task.person_id, task.candidate_person_id)

    def repoint_tasks(self, gone: str, to: str) -> None:
        """Open tasks about a person that no longer exists on its own: tasks between the
        two are settled by the operation, the others now concern ``to``."""
        for task in db.open_tasks_of(self.s, gone):
            if task.reason == MERGE_REVIEW:
                continue
            pair = {task.person_id, task.candidate_person_id}
            if pair <= {gone, to}:
                self.resolve_task(task, "merged")
                continue
            person = to if task.person_id == gone else task.person_id
            candidate = to if task.candidate_person_id == gone else task.candidate_person_id
            clash = db.existing_review(self.s, task.source, task.local_id, candidate, task.reason)
            if clash is not None and clash.id != task.id:
                self.resolve_task(task, "superseded")
                continue
            task.person_id, task.candidate_person_id = person, candidate
            self.s.add(task)
            self.touch(person, candidate)
        self.s.flush()

    def retire(self, person: PersonRow, into: str) -> None:
        person.status = "merged"
        person.replaced_by = into
        self.s.add(person)
        self.touch(person.id, into)

    def open_task(
        self,
        reason: str,
        source: str,
        local_id: str,
        person_id: str,
        candidate: str,
        evidence: Evidence,
    ) -> ReviewTaskRow:
        task = ReviewTaskRow(
            id=str(uuid.uuid4()),
            reason=reason,
            source=source,
            local_id=local_id,
            person_id=person_id,
            candidate_person_id=candidate,
            weight=evidence.weight,
            levels=orjson.dumps(dict(evidence.levels)).decode(),
            created_ms=self.now,
        )
        self.s.add(task)
        self.s.flush()
        self.touch(person_id, candidate)
        return task


class IdentityOperations:
    """The index's manual operations (see the module doc)."""

    def __init__(self, service: PatientIndexService, topics: Topics) -> None:
        self.service = service
        self.topics = topics
        self._flush_lock = asyncio.Lock()

    # The transaction around one operation -------------------------------------------------
    @contextmanager
    def _operation(
        self, action: Action, reviewer: str, versions: Mapping[str, int] | None
    ) -> Iterator[_Op]:
        svc = self.service
        reviewer = reviewer.strip()
        if not reviewer:
            raise unprocessable("say who decides: 'reviewer' is required")
        with svc._lock:
            svc.require_loaded()
            try:
                with svc.store.transaction() as s:
                    op = _Op(self, s, action, reviewer, versions or {})
                    yield op
            except IntegrityError as exc:
                # A unique constraint another writer got to first (two current links for
                # one record, one trusted identifier claimed twice): a concurrent change.
                raise conflict(f"a concurrent change got there first: {exc.orig!s}"[:300]) from exc
            # Committed: only now does the in-memory index follow.
            for rec in op.moved:
                svc.index.put(
                    (rec.source, rec.local_id),
                    rec.person_id,
                    Demographics.from_json(orjson.loads(rec.demographics)),
                )

    def _finish(
        self,
        op: _Op,
        change: IdentityChange,
        *,
        identifiers: Mapping[str, Sequence[str]] | None = None,
        task: str | None = None,
        merge: str | None = None,
        events: list[dict[str, Any]] | None = None,
        announce: Sequence[str] | None = None,
    ) -> OperationResult:
        """Refresh every person touched, then write the outbox: links, audit, identity
        events (for ``announce``, default every person of the change), and the
        re-evaluated events of every person no longer uncertain."""
        s, now = op.s, op.now
        refs: dict[str, PersonRef] = {}
        for pid in op.touched:
            row = s.get(PersonRow, pid)
            if row is not None:
                row.possible_match = bool(db.open_tasks_of(s, pid))
                s.add(row)
                refs[pid] = refresh_person(s, pid, now, self.service.trusted)
        out: list[Outgoing] = [link_outgoing(self.topics, link, {}) for link in op.links]
        out.append(audit_outgoing(self.topics, change, now))
        for pid in change.persons if announce is None else announce:
            row = s.get(PersonRow, pid)
            if row is None:
                continue
            ids = (identifiers or {}).get(pid, refs[pid].trusted if pid in refs else ())
            records = [(r.source, r.local_id) for r in db.records_of(s, pid)]
            merges = db.merges_in_force(s, pid)
            patient = identity_patient(
                pid,
                ids,
                records,
                change,
                active=row.status == "active",
                replaces=[m.merged_id for m in merges],
                replaced_by=row.replaced_by,
            )
            out.append(
                identity_outgoing(
                    self.topics, patient, pid, ids, change, identity_state(s, pid), now
                )
            )
        out += self._reemit(op, refs)
        for o in out:
            s.add(
                OutboxRow(
                    topic=o.topic,
                    key=o.key,
                    value=o.value,
                    headers=db.headers_json(o.headers),
                    created_ms=now,
                )
            )
        s.flush()
        versions = {pid: row.version for pid in refs if (row := s.get(PersonRow, pid))}
        return OperationResult(
            operation=op.id,
            action=change.action.value,
            persons=versions,
            records=[
                {"source": src, "local_id": lid, "person": rec.person_id}
                for src, lid in op.records
                if (rec := db.source_record(s, src, lid)) is not None
            ],
            task=task,
            merge=merge,
            events=events or [],
            reemitted=op.reemitted,
        )

    def _reemit(self, op: _Op, refs: Mapping[str, PersonRef]) -> list[Outgoing]:
        """Events emitted while a person touched here was uncertain, for each one that is
        certain now: again, with the resolved identity, in the order they were emitted."""
        s = op.s
        out: list[Outgoing] = []
        for pid, ref in refs.items():
            row = s.get(PersonRow, pid)
            if row is None or row.status != "active":
                continue
            state = identity_state(s, pid)
            if state.uncertain:
                continue  # still uncertain: its events wait for the next resolution
            for rec in db.records_of(s, pid):
                for ev in db.pending_reemission(s, rec.source, rec.local_id):
                    if ev.value is None or ev.headers is None:
                        continue
                    out.append(
                        reemitted(
                            self.topics,
                            ev.value,
                            orjson.loads(ev.headers),
                            rec.local_id,
                            ref,
                            state,
                            op.id,
                        )
                    )
                    ev.reemitted_ms = op.now
                    ev.reemitted_by = op.id
                    s.add(ev)
                    op.reemitted.append(ev.event_id)
        return out

    # Resolve a review task ---------------------------------------------------------------
    def resolve(
        self,
        task_id: str,
        resolution: str,
        reviewer: str,
        versions: Mapping[str, int] | None = None,
    ) -> OperationResult:
        """``same-person``: the record joins the candidate (a merge review: the merge
        stands). ``different-person``: a sticky no-link (a merge review: unmerge)."""
        if resolution not in RESOLUTIONS:
            raise unprocessable(f"resolution must be one of {', '.join(RESOLUTIONS)}")
        action = {SAME: Action.LINK, DIFFERENT: Action.SEPARATE}[resolution]
        with self._operation(action, reviewer, versions) as op:
            task = op.s.get(ReviewTaskRow, task_id)
            if task is None:
                raise not_found(f"review task {task_id} is not known")
            if task.status != "open":
                raise conflict(
                    f"review task {task_id} was already resolved ({task.resolution}) "
                    f"by {task.resolved_by}"
                )
            if task.reason == MERGE_REVIEW:
                merge = op.s.get(MergeRow, task.local_id)
                if merge is None:
                    raise conflict(f"the merge {task.local_id} of this task is gone")
                if resolution == SAME:
                    return self._confirm(op, task, merge)
                op.action = Action.UNMERGE
                op.resolve_task(task, DIFFERENT)
                return self._unmerge(op, merge, task=task.id)
            rec = op.record(task.source, task.local_id)
            own = op.person(rec.person_id)
            cand = op.person(task.candidate_person_id, active=False)
            if cand.status != "active":
                raise conflict(
                    f"the candidate Patient/{cand.id} was merged into Patient/"
                    f"{cand.replaced_by}; that task is out of date"
                )
            evidence = op.evidence(rec, cand.id) if cand.id != own.id else Evidence()
            if task.weight is not None:
                levels = orjson.loads(task.levels) if task.levels else {}
                grade = op.ops.service.matcher.grade_of(task.weight)
                evidence = Evidence(grade.value if grade else None, task.weight, levels)
            op.resolve_task(task, resolution)
            if resolution == SAME:
                if cand.id == own.id:  # "is this record really this person?" — yes
                    op.relink(rec, own.id, grade=CERTAIN, weight=None, operation=Action.LINK)
                    persons: tuple[str, ...] = (own.id,)
                else:
                    self._link(op, rec, cand, evidence)
                    persons = (cand.id, own.id)
            else:
                if cand.id == own.id:  # "is this record really this person?" — no
                    new = self._unlink(op, rec, own)
                    persons = (own.id, new)
                else:
                    op.no_link(rec, cand.id)
                    op.relink(rec, own.id, grade=CERTAIN, weight=None, operation=Action.SEPARATE)
                    persons = (own.id, cand.id)
            change = IdentityChange(
                op.id,
                op.action,
                op.reviewer,
                records=((rec.source, rec.local_id),),
                persons=persons,
                evidence=evidence,
                task=task.id,
            )
            # The other side of a "different" resolution learns nothing: only the record's
            # person gets an identity event (nothing the candidate's recipients hold changed).
            announce = (own.id,) if resolution == DIFFERENT and cand.id != own.id else None
            return self._finish(op, change, task=task.id, announce=announce)

    # Manual link and unlink ----------------------------------------------------------------
    def link(
        self,
        person_id: str,
        source: str,
        local_id: str,
        reviewer: str,
        versions: Mapping[str, int] | None = None,
    ) -> OperationResult:
        """Link a source record to this person by hand (it leaves the person it had)."""
        with self._operation(Action.LINK, reviewer, versions) as op:
            target = op.person(person_id)
            rec = op.record(source, local_id)
            own = op.person(rec.person_id)
            evidence = op.evidence(rec, target.id)
            if own.id == target.id:
                op.relink(rec, target.id, grade=CERTAIN, weight=None, operation=Action.LINK)
                persons: tuple[str, ...] = (target.id,)
            else:
                self._link(op, rec, target, evidence)
                persons = (target.id, own.id)
            change = IdentityChange(
                op.id,
                Action.LINK,
                op.reviewer,
                records=((source, local_id),),
                persons=persons,
                evidence=evidence,
            )
            return self._finish(op, change)

    def _link(self, op: _Op, rec: SourceRecordRow, target: PersonRow, ev: Evidence) -> None:
        previous = op.person(rec.person_id)
        existing = db.no_link(op.s, rec.source, rec.local_id, target.id)
        if existing is not None:  # a person overrides what a person decided before
            op.s.delete(existing)
            op.s.flush()
        op.relink(rec, target.id, grade=CERTAIN, weight=ev.weight, operation=Action.LINK)
        for task in db.open_tasks_of_record(op.s, rec.source, rec.local_id):
            if task.candidate_person_id == target.id:
                op.resolve_task(task, SAME)
            elif task.person_id == previous.id:
                task.person_id = target.id
                op.s.add(task)
        if not db.records_of(op.s, previous.id):
            # Nothing left of the old person: it was this record's duplicate.
            op.retire(previous, target.id)
            op.repoint_tasks(previous.id, target.id)

    def unlink(
        self,
        person_id: str,
        source: str,
        local_id: str,
        reviewer: str,
        versions: Mapping[str, int] | None = None,
    ) -> OperationResult:
        """Take a source record away from this person: it becomes a person of its own, and
        is never linked to this one again by the matcher (a no-link)."""
        with self._operation(Action.UNLINK, reviewer, versions) as op:
            person = op.person(person_id)
            rec = op.record(source, local_id)
            if rec.person_id != person.id:
                raise unprocessable(f"Patient/{local_id} from {source} is not Patient/{person_id}")
            evidence = op.evidence(rec, person.id)
            new = self._unlink(op, rec, person)
            change = IdentityChange(
                op.id,
                Action.UNLINK,
                op.reviewer,
                records=((source, local_id),),
                persons=(person.id, new),
                evidence=evidence,
            )
            return self._finish(op, change)

    def _unlink(self, op: _Op, rec: SourceRecordRow, person: PersonRow) -> str:
        if len(db.records_of(op.s, person.id)) < 2:
            raise unprocessable(
                f"Patient/{rec.local_id} from {rec.source} is Patient/{person.id}'s only record"
            )
        new = PersonRow(id=str(uuid.uuid4()), golden="{}", created_ms=op.now, updated_ms=op.now)
        op.s.add(new)
        op.s.flush()
        op.no_link(rec, person.id)
        op.relink(rec, new.id, grade=CERTAIN, weight=None, operation=Action.UNLINK)
        for task in db.open_tasks_of_record(op.s, rec.source, rec.local_id):
            if task.candidate_person_id == person.id:
                op.resolve_task(task, DIFFERENT)
            elif task.person_id == person.id:
                task.person_id = new.id
                op.s.add(task)
                op.touch(task.candidate_person_id)
        return new.id

    # Merge and unmerge -------------------------------------------------------------------
    def merge(
        self,
        survivor_id: str,
        merged_id: str,
        reviewer: str,
        versions: Mapping[str, int] | None = None,
    ) -> OperationResult:
        """Merge ``merged_id`` into ``survivor_id``: its records join the survivor, it stays
        as a tombstone, and a merge-review task keeps both persons' consents applying (deny
        wins) until a second person confirms the merge."""
        with self._operation(Action.MERGE, reviewer, versions) as op:
            if survivor_id == merged_id:
                raise unprocessable("a person cannot be merged with itself")
            survivor = op.person(survivor_id)
            merged = op.person(merged_id)
            records = db.records_of(op.s, merged.id)
            if not records:
                raise unprocessable(f"Patient/{merged_id} has no source records to merge")
            evidence = max(
                (op.evidence(r, survivor.id) for r in records),
                key=lambda e: e.weight if e.weight is not None else float("-inf"),
            )
            merge = MergeRow(
                id=str(uuid.uuid4()),
                survivor_id=survivor.id,
                merged_id=merged.id,
                survivor_trusted=survivor.trusted_ids,
                merged_trusted=merged.trusted_ids,
                records=orjson.dumps([[r.source, r.local_id] for r in records]).decode(),
                reviewer=op.reviewer,
                weight=evidence.weight,
                levels=orjson.dumps(dict(evidence.levels)).decode(),
                merged_ms=op.now,
            )
            op.s.add(merge)
            op.s.flush()
            for rec in records:
                op.relink(
                    rec, survivor.id, grade=PROBABLE, weight=evidence.weight, operation=Action.MERGE
                )
            op.retire(merged, survivor.id)
            op.repoint_tasks(merged.id, survivor.id)
            task = op.open_task(
                MERGE_REVIEW, MERGE_SOURCE, merge.id, survivor.id, merged.id, evidence
            )
            change = IdentityChange(
                op.id,
                Action.MERGE,
                op.reviewer,
                records=tuple((r.source, r.local_id) for r in records),
                persons=(survivor.id, merged.id),
                evidence=evidence,
                task=task.id,
                merge=merge.id,
            )
            return self._finish(
                op,
                change,
                identifiers={merged.id: merge.merged_trusted.split()},
                task=task.id,
                merge=merge.id,
            )

    def _confirm(self, op: _Op, task: ReviewTaskRow, merge: MergeRow) -> OperationResult:
        op.action = Action.CONFIRM
        survivor = op.person(merge.survivor_id)
        op.person(merge.merged_id, active=False)
        op.resolve_task(task, SAME)
        merge.status = "confirmed"
        merge.reviewed_ms = op.now
        op.s.add(merge)
        for source, local_id in orjson.loads(merge.records):
            rec = db.source_record(op.s, source, local_id)
            if rec is not None and rec.person_id == survivor.id:
                op.relink(
                    rec, survivor.id, grade=CERTAIN, weight=merge.weight, operation=Action.CONFIRM
                )
        change = IdentityChange(
            op.id,
            Action.CONFIRM,
            op.reviewer,
            records=tuple(op.records),
            persons=(survivor.id, merge.merged_id),
            evidence=_merge_evidence(merge),
            task=task.id,
            merge=merge.id,
        )
        return self._finish(
            op,
            change,
            identifiers={merge.merged_id: merge.merged_trusted.split()},
            task=task.id,
            merge=merge.id,
        )

    def unmerge(
        self,
        survivor_id: str,
        reviewer: str,
        *,
        merge_id: str | None = None,
        merged_id: str | None = None,
        versions: Mapping[str, int] | None = None,
    ) -> OperationResult:
        """Undo a merge: the merged person's records go back to it, each person's own
        consents apply again, and the result lists every event emitted for the survivor
        while the merge was in force, for review."""
        with self._operation(Action.UNMERGE, reviewer, versions) as op:
            merge: MergeRow | None = None
            if merge_id is not None:
                merge = op.s.get(MergeRow, merge_id)
            else:
                found = [
                    m
                    for m in db.merges_in_force(op.s, survivor_id)
                    if merged_id is None or m.merged_id == merged_id
                ]
                merge = found[-1] if found else None
            if merge is None or merge.survivor_id != survivor_id:
                raise not_found(f"no such merge into Patient/{survivor_id}")
            task = op.s.exec(
                select(ReviewTaskRow).where(
                    ReviewTaskRow.reason == MERGE_REVIEW,
                    ReviewTaskRow.local_id == merge.id,
                    ReviewTaskRow.status == "open",
                )
            ).first()
            if task is not None:
                op.resolve_task(task, "unmerged")
            return self._unmerge(op, merge, task=task.id if task else None)

    def _unmerge(self, op: _Op, merge: MergeRow, task: str | None) -> OperationResult:
        s = op.s
        if merge.status == "unmerged":
            raise conflict(f"merge {merge.id} was undone already")
        survivor = op.person(merge.survivor_id)
        merged = op.person(merge.merged_id, active=False)
        if merged.status != "merged" or merged.replaced_by != survivor.id:
            raise conflict(f"Patient/{merged.id} is no longer merged into Patient/{survivor.id}")
        merged.status, merged.replaced_by = "active", None
        s.add(merged)
        back: list[tuple[str, str]] = []
        for source, local_id in orjson.loads(merge.records):
            rec = db.source_record(s, source, local_id)
            if rec is None or rec.person_id != survivor.id:
                continue  # moved on by hand since: left where a person put it
            op.no_link(rec, survivor.id)
            op.relink(rec, merged.id, grade=CERTAIN, weight=None, operation=Action.UNMERGE)
            back.append((source, local_id))
        merge.status = "unmerged"
        merge.unmerged_ms = op.now
        merge.unmerged_by = op.reviewer
        s.add(merge)
        # Tasks the merge moved onto the survivor that are about the merged person's records
        # go back with them.
        for source, local_id in back:
            for t in db.open_tasks_of_record(s, source, local_id):
                if t.person_id == survivor.id:
                    t.person_id = merged.id
                    s.add(t)
                    op.touch(t.candidate_person_id)
        # Records that joined the survivor while the merge was in force may be either
        # person's: a person looks at them, and until then both persons' consents apply.
        moved = {(src, lid) for src, lid in orjson.loads(merge.records)}
        joined = s.exec(
            select(SourceRecordRow).where(
                SourceRecordRow.person_id == survivor.id,
                col(SourceRecordRow.created_ms) >= merge.merged_ms,
            )
        )
        for rec in joined:
            if (rec.source, rec.local_id) not in moved:
                op.open_task(
                    JOINED_DURING_MERGE,
                    rec.source,
                    rec.local_id,
                    survivor.id,
                    merged.id,
                    _merge_evidence(merge),
                )
        s.flush()
        events = [event_json(e) for e in db.merge_events_in(s, merge)]
        change = IdentityChange(
            op.id,
            Action.UNMERGE,
            op.reviewer,
            records=tuple(back),
            persons=(survivor.id, merged.id),
            evidence=_merge_evidence(merge),
            task=task,
            merge=merge.id,
        )
        return self._finish(op, change, task=task, merge=merge.id, events=events)

    # The outbox --------------------------------------------------------------------------
    async def flush_outbox(self, publish: Publish, batch: int = 500) -> int:
        """Publish what committed operations left in the outbox, oldest first; the count.

        Published first, deleted after: a crash in between publishes some twice, which
        every consumer tolerates (ids are derived; the exchange numbers by event id)."""
        sent = 0
        async with self._flush_lock:
            while True:
                rows = await asyncio.to_thread(self.service.store.outbox, batch)
                if not rows:
                    return sent
                await publish(
                    [Outgoing(r.topic, r.value, r.key, orjson.loads(r.headers)) for r in rows]
                )
                await asyncio.to_thread(
                    self.service.store.delete_outbox, [r.id for r in rows if r.id is not None]
                )
                sent += len(rows)


def _merge_evidence(merge: MergeRow) -> Evidence:
    levels = orjson.loads(merge.levels) if merge.levels else {}
    return Evidence(PROBABLE if merge.weight is not None else None, merge.weight, levels)
