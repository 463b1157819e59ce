"""The patient index's application layer: the domain core applied to the database.

`PatientIndexService` owns the in-memory index (loaded from the database, refreshed with
what other replicas wrote) and hands the pipeline a `BatchWork` — one transaction for a
whole batch — whose operations are what the stage does with each message: link a Patient,
find the person of a (source, local id), park a resource whose Patient is not known yet.

If anything in a batch fails, the transaction rolls back and the index (which the batch
already changed) is rebuilt from the database before the next batch.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import update
from sqlmodel import Session, col, select

from hdx_patient_index import store as db
from hdx_patient_index.domain.demographics import Demographics, extract_demographics
from hdx_patient_index.domain.golden import LinkedRecord, golden_patient, snapshot, tombstone
from hdx_patient_index.domain.identifiers import Identifier, TrustedSystems
from hdx_patient_index.domain.identity import (
    MERGE_REVIEW,
    CandidatePerson,
    IdentityState,
    candidates_json,
    unique_candidates,
)
from hdx_patient_index.domain.index import PersonIndex, RecordKey
from hdx_patient_index.domain.matching import (
    Basis,
    Candidate,
    Grade,
    Matcher,
    ReviewReason,
    trusted_conflict,
)
from hdx_patient_index.models import (
    EventLogRow,
    LinkRow,
    MergeRow,
    ParkedRow,
    PersonRow,
    ReviewTaskRow,
    SourceRecordRow,
    TrustedIdRow,
)
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.envelope import now_ms
from hdx_shared.messaging import Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PersonRef:
    person_id: str
    trusted: tuple[str, ...]  # the person's trusted identifiers, "system|value"


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    source: str
    local_id: str
    event_id: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, str]

    @classmethod
    def from_row(cls, row: ParkedRow) -> ParkedMessage:
        return cls(
            source=row.source,
            local_id=row.local_id,
            event_id=row.event_id,
            topic=row.topic,
            partition=row.origin_partition,
            offset=row.origin_offset,
            key=row.key,
            value=row.value,
            headers=orjson.loads(row.headers),
        )


class VersionConflict(Exception):
    """A person changed since it was read (another operation, replica or batch): the
    change is refused, never merged silently (HTTP 409; a batch is retried)."""

    def __init__(self, person_id: str) -> None:
        self.person_id = person_id
        super().__init__(f"Patient/{person_id} was changed concurrently")


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """A new or changed link, for the compacted links topic."""

    source: str
    local_id: str
    person_id: str
    grade: Grade | str
    possible_match: bool
    by: str = "auto"
    operation: str | None = None  # manual changes: link | unlink | merge | unmerge | …
    operation_id: str | None = None
    weight: float | None = None
    no_link: tuple[str, ...] = ()  # persons a person decided this record is not


def _split(tokens: str) -> tuple[str, ...]:
    return tuple(tokens.split())


def identity_state(s: Session, person_id: str) -> IdentityState:
    """Is this person's identity uncertain (an open review task on either side, a merge
    not yet reviewed), and which persons may it be? (See domain/identity.py.)"""
    person = s.get(PersonRow, person_id)
    merges = tuple(m.id for m in db.merges_in_force(s, person_id))
    tasks = db.open_tasks_of(s, person_id)
    if not tasks:
        return IdentityState(person_id, merges=merges)
    candidates = [CandidatePerson(person_id, _split(person.trusted_ids) if person else ())]
    for t in tasks:
        if t.reason == MERGE_REVIEW:
            merge = s.get(MergeRow, t.local_id)
            if merge is not None:
                candidates.append(
                    CandidatePerson(merge.survivor_id, _split(merge.survivor_trusted))
                )
                candidates.append(CandidatePerson(merge.merged_id, _split(merge.merged_trusted)))
                continue
        other = t.candidate_person_id if t.person_id == person_id else t.person_id
        if other != person_id:
            row = s.get(PersonRow, other)
            candidates.append(CandidatePerson(other, _split(row.trusted_ids) if row else ()))
    return IdentityState(
        person_id,
        reasons=tuple(dict.fromkeys(t.reason for t in tasks)),
        candidates=unique_candidates(candidates),
        merges=merges,
    )


def refresh_person(s: Session, person_id: str, now: int, trusted: TrustedSystems) -> PersonRef:
    """Rebuild a person's golden record and trusted identifiers from its records, and bump
    its version — compare-and-set on the version it had when this session read it, so a
    concurrent change (another replica, an HTTP operation) makes this one fail instead of
    overwriting it (VersionConflict)."""
    person = s.get(PersonRow, person_id)
    if person is None:
        raise Unavailable(f"person {person_id} is missing")
    records = db.records_of(s, person_id)
    ids: dict[str, None] = {}
    for r in records:
        for token in orjson.loads(r.demographics).get("trusted", ()):
            ids[token] = None
    if person.status == "merged" and person.replaced_by:
        golden = tombstone(person_id, person.replaced_by)
    else:
        golden = golden_patient(
            person_id,
            [
                LinkedRecord(r.source, r.local_id, r.updated_ms, orjson.loads(r.snapshot))
                for r in records
            ],
            trusted,
            replaces=[m.merged_id for m in db.merges_in_force(s, person_id)],
        )
    s.flush()
    result: Any = s.execute(
        update(PersonRow)
        .where(col(PersonRow.id) == person_id, col(PersonRow.version) == person.version)
        .values(
            golden=orjson.dumps(golden).decode(),
            trusted_ids=" ".join(sorted(ids)),
            version=person.version + 1,
            updated_ms=now,
        )
        .execution_options(synchronize_session="fetch")
    )
    if result.rowcount != 1:
        raise VersionConflict(person_id)
    return PersonRef(person.id, tuple(sorted(ids)))


@dataclass(frozen=True, slots=True)
class LinkOutcome:
    person: PersonRef
    link: LinkEvent | None  # None when the source record kept the link it had
    released: tuple[ParkedMessage, ...]  # parked resources this Patient releases, in order


def _demographics_json(d: Demographics) -> str:
    return orjson.dumps(d.to_json(), option=orjson.OPT_SORT_KEYS).decode()


class PatientIndexService:
    def __init__(
        self,
        store: PatientIndexStore,
        matcher: Matcher,
        trusted: TrustedSystems,
        *,
        refresh_overlap_ms: int = 60_000,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.matcher = matcher
        self.trusted = trusted
        self.clock = clock
        self.refresh_overlap_ms = refresh_overlap_ms
        self.index = PersonIndex()
        self.loaded = False
        self.error: str | None = "index not loaded"
        self._watermark_ms = 0
        # One batch (or index refresh) at a time; HTTP readers only read the index.
        self._lock = threading.RLock()

    # The in-memory index --------------------------------------------------------------
    def load(self) -> bool:
        """Create the schema if needed and (re)build the index from the database."""
        with self._lock:
            started = self.clock()
            try:
                self.store.create_schema()
                fresh = PersonIndex()
                n = self.store.load_index(fresh)
            except Exception as exc:  # keep serving reads; readiness says why
                self.loaded = False
                self.error = f"index not loaded: {type(exc).__name__}: {exc}"[:300]
                log.warning("patient index not loaded: %s", exc)
                return False
            self.index = fresh
            self._watermark_ms = started
            self.loaded, self.error = True, None
            log.info("patient index loaded: %d source records, %d persons", n, fresh.person_count)
            return True

    def refresh(self) -> None:
        """File what other replicas wrote since the last refresh (with an overlap for
        transactions that committed late); a full load if the index is not loaded."""
        with self._lock:
            if not self.loaded:
                self.load()
                return
            started = self.clock()
            try:
                self.store.load_index(self.index, self._watermark_ms - self.refresh_overlap_ms)
            except Exception as exc:
                log.warning("patient index refresh failed: %s", exc)
                return
            self._watermark_ms = started

    def require_loaded(self) -> None:
        if not self.loaded and not self.load():
            raise Unavailable(self.error or "index not loaded")

    def ensure_persons(self, person_ids: set[str]) -> None:
        """File persons the index does not know yet (another replica created them)."""
        missing = {p for p in person_ids if not self.index.records_of(p)}
        if missing:
            with self.store.reading() as s:
                for pid in sorted(missing):
                    self.store.load_person(s, self.index, pid)

    @contextmanager
    def batch(self) -> Iterator[BatchWork]:
        """One transaction for a whole batch; on any failure the index is rebuilt."""
        with self._lock:
            self.require_loaded()
            try:
                with self.store.transaction() as s:
                    yield BatchWork(self, s)
            except BaseException:
                self.loaded, self.error = False, "index being rebuilt after a failed batch"
                raise

    # The park timeout ------------------------------------------------------------------
    def expired_parked(self, timeout_ms: int, limit: int = 500) -> list[ParkedMessage]:
        rows = self.store.expired_parked(self.clock() - timeout_ms, limit)
        return [ParkedMessage.from_row(r) for r in rows]

    def drop_parked(self, messages: list[ParkedMessage], released_before_ms: int) -> None:
        """Forget dead-lettered rows (by origin) and released rows older than the cutoff."""
        with self.store.transaction() as s:
            for m in messages:
                row = db.parked_at(s, m.topic, m.partition, m.offset)
                if row is not None and row.released_ms is None:
                    s.delete(row)
        self.store.forget_released(released_before_ms)


class BatchWork:
    """The operations of one batch, inside its transaction."""

    def __init__(self, service: PatientIndexService, session: Session) -> None:
        self.svc = service
        self.s = session
        self._people: dict[RecordKey, PersonRef | None] = {}
        self._identity: dict[str, IdentityState] = {}
        self._parked_keys: set[RecordKey] | None = None  # None: not prefetched, ask the DB

    def prefetch(self, keys: set[RecordKey], event_ids: set[str]) -> None:
        """Two queries for the whole batch instead of several per message: the persons of
        the source records it names, and which of them have parked resources."""
        if not keys:
            return
        local_ids = {k[1] for k in keys}
        for rec, person in self.s.exec(
            select(SourceRecordRow, PersonRow)
            .join(PersonRow, col(PersonRow.id) == col(SourceRecordRow.person_id))
            .where(col(SourceRecordRow.local_id).in_(local_ids))
        ):
            key = (rec.source, rec.local_id)
            if key in keys:
                self._people[key] = PersonRef(person.id, tuple(person.trusted_ids.split()))
        self._parked_keys = {
            (src, lid)
            for src, lid in self.s.exec(
                select(ParkedRow.source, ParkedRow.local_id).where(
                    col(ParkedRow.local_id).in_(local_ids),
                    col(ParkedRow.released_ms).is_(None)
                    | col(ParkedRow.released_by).in_(event_ids),
                )
            )
        }

    # Identity state ----------------------------------------------------------------------
    def identity(self, person_id: str) -> IdentityState:
        """The person's identity state (cached for the batch; a new review task clears it)."""
        state = self._identity.get(person_id)
        if state is None:
            state = self._identity[person_id] = identity_state(self.s, person_id)
        return state

    def record_event(
        self,
        state: IdentityState,
        *,
        event_id: str,
        source: str,
        local_id: str,
        resource_type: str,
        value: bytes,
        headers: dict[str, str],
    ) -> None:
        """Log an event emitted while the person was uncertain (with its validated bytes and
        headers, to re-emit once resolved) or had a merge in force (its id, for review)."""
        if not (state.uncertain or state.merges) or not event_id:
            return
        if db.logged_event(self.s, event_id, state.person) is not None:
            return
        self.s.add(
            EventLogRow(
                event_id=event_id,
                person_id=state.person,
                source=source,
                local_id=local_id,
                resource_type=resource_type,
                emitted_ms=self.svc.clock(),
                uncertain=state.uncertain,
                candidates=candidates_json(state.candidates),
                value=value if state.uncertain else None,
                headers=orjson.dumps(headers).decode() if state.uncertain else None,
            )
        )
        self.s.flush()

    # Non-Patient resources -------------------------------------------------------------
    def person_for(self, source: str, local_id: str) -> PersonRef | None:
        key = (source, local_id)
        if key not in self._people:
            rec = db.source_record(self.s, source, local_id)
            person = self.s.get(PersonRow, rec.person_id) if rec is not None else None
            self._people[key] = (
                PersonRef(person.id, tuple(person.trusted_ids.split())) if person else None
            )
        return self._people[key]

    def park(self, m: ParkedMessage) -> None:
        """Keep a resource until its Patient arrives (once: a redelivery is not parked twice)."""
        if self._parked_keys is not None:
            self._parked_keys.add((m.source, m.local_id))
        if db.parked_at(self.s, m.topic, m.partition, m.offset) is not None:
            return
        self.s.add(
            ParkedRow(
                source=m.source,
                local_id=m.local_id,
                event_id=m.event_id,
                topic=m.topic,
                origin_partition=m.partition,
                origin_offset=m.offset,
                key=m.key,
                value=m.value,
                headers=orjson.dumps(m.headers).decode(),
                parked_ms=self.svc.clock(),
            )
        )
        self.s.flush()

    # Patients ----------------------------------------------------------------------------
    def link_patient(
        self, source: str, local_id: str, patient: dict[str, Any], event_id: str
    ) -> LinkOutcome:
        """Link a Patient's (source, local id) to a person. A source record seen before
        keeps its person; its demographics are updated and re-filed."""
        svc, s = self.svc, self.s
        key = (source, local_id)
        demo = extract_demographics(patient, svc.trusted)
        snap = orjson.dumps(snapshot(patient), option=orjson.OPT_SORT_KEYS).decode()
        now = svc.clock()
        rec = db.source_record(s, source, local_id)
        link: LinkEvent | None = None
        if rec is None:
            rec, link = self._new_record(key, demo, snap, event_id, now)
            changed = True
        else:
            changed = rec.last_event_id != event_id and rec.snapshot != snap
            if rec.last_event_id != event_id:
                rec.version += 1
                rec.last_event_id = event_id
                if changed:
                    rec.updated_ms = now
                    rec.demographics = _demographics_json(demo)
                    rec.snapshot = snap
                    db.replace_identifiers(s, rec, demo)
                    svc.index.put(key, rec.person_id, demo)
                    self._claim(demo.trusted, rec.person_id, key)
                    self._check_update(key, demo, rec.person_id)
                s.add(rec)
        if changed:
            person = self._refresh_person(rec.person_id, now)
            # Other records of this person looked up earlier in the batch: their trusted
            # identifiers may have just changed.
            for k, ref in list(self._people.items()):
                if ref is not None and ref.person_id == person.person_id:
                    self._people[k] = person
        else:
            person = self._person(rec)
        self._people[key] = person
        released = tuple(self._release(source, local_id, event_id, now))
        return LinkOutcome(person, link, released)

    def _new_record(
        self, key: RecordKey, demo: Demographics, snap: str, event_id: str, now: int
    ) -> tuple[SourceRecordRow, LinkEvent]:
        svc, s = self.svc, self.s
        source, local_id = key
        # Persons another replica created with one of these identifiers: file them first.
        owners = set(db.trusted_owners(s, demo.trusted).values())
        if owners:
            for pid in owners:
                if not svc.index.records_of(pid):
                    svc.store.load_person(s, svc.index, pid)
        decision = svc.matcher.decide(demo, svc.index)
        person = s.get(PersonRow, decision.person_id) if decision.person_id else None
        if person is None:
            person = PersonRow(id=str(uuid.uuid4()), golden="{}", created_ms=now, updated_ms=now)
            s.add(person)
        rec = SourceRecordRow(
            source=source,
            local_id=local_id,
            person_id=person.id,
            demographics=_demographics_json(demo),
            snapshot=snap,
            last_event_id=event_id,
            created_ms=now,
            updated_ms=now,
        )
        s.add(rec)
        s.flush()
        db.replace_identifiers(s, rec, demo)
        best = decision.candidates[0].weight if decision.candidates else None
        s.add(
            LinkRow(
                source=source,
                local_id=local_id,
                person_id=person.id,
                grade=decision.grade.value,
                weight=best if decision.person_id else None,
                event_id=event_id,
                created_ms=now,
            )
        )
        for item in decision.review:
            self._review(key, person.id, item.candidate, item.reason)
        if decision.possible_match:
            person.possible_match = True
        svc.index.put(key, person.id, demo)
        self._claim(demo.trusted, person.id, key)
        log.debug(
            "linked a source record to %s person (%s)",
            "an existing" if decision.person_id else "a new",
            decision.grade.value,
        )
        return rec, LinkEvent(source, local_id, person.id, decision.grade, decision.possible_match)

    def _claim(self, trusted: tuple[Identifier, ...], person_id: str, key: RecordKey) -> None:
        """Claim the person's trusted identifiers; one claimed by another person → review."""
        owners = db.trusted_owners(self.s, trusted)
        for ident in trusted:
            owner = owners.get(ident)
            if owner is None:
                self.s.add(
                    TrustedIdRow(system=ident.system, value=ident.value, person_id=person_id)
                )
            elif owner != person_id:
                c = Candidate(owner, Grade.POSSIBLE, 0.0, 0.0, basis=Basis.TRUSTED_ID)
                self._review(key, person_id, c, ReviewReason.TRUSTED_ID_CONFLICT)
        self.s.flush()

    def _check_update(self, key: RecordKey, demo: Demographics, person_id: str) -> None:
        """An updated Patient keeps its person; say so when the update points elsewhere."""
        svc = self.svc
        others = [r for r in svc.index.records_of(person_id) if r.key != key]
        theirs: dict[str, set[str]] = {}
        for r in others:
            for t in r.demographics.trusted:
                theirs.setdefault(t.system, set()).add(t.value)
        if trusted_conflict(demo.trusted_by_system(), theirs):
            c = Candidate(person_id, Grade.POSSIBLE, 0.0, 0.0, basis=Basis.TRUSTED_ID)
            self._review(key, person_id, c, ReviewReason.TRUSTED_ID_CONFLICT)
        decision = svc.matcher.decide(demo, svc.index, exclude=key)
        if decision.person_id not in (None, person_id) and decision.candidates:
            self._review(key, person_id, decision.candidates[0], ReviewReason.ANOTHER_PERSON)

    def _review(
        self, key: RecordKey, person_id: str, candidate: Candidate, reason: ReviewReason
    ) -> None:
        source, local_id = key
        if db.existing_review(self.s, source, local_id, candidate.person_id, reason.value):
            return
        # Sticky: a person said this record is not that person; a merged person is no one.
        if db.no_link(self.s, source, local_id, candidate.person_id) is not None:
            return
        other = self.s.get(PersonRow, candidate.person_id)
        if other is not None and other.status != "active":
            return
        self._identity.pop(person_id, None)
        self._identity.pop(candidate.person_id, None)
        self.s.add(
            ReviewTaskRow(
                id=str(uuid.uuid4()),
                reason=reason.value,
                source=source,
                local_id=local_id,
                person_id=person_id,
                candidate_person_id=candidate.person_id,
                weight=round(candidate.weight, 3),
                probability=candidate.probability,
                levels=orjson.dumps(
                    {str(f): str(lv) for f, lv in candidate.levels.items()}
                ).decode(),
                created_ms=self.svc.clock(),
            )
        )
        self.s.flush()

    def _person(self, rec: SourceRecordRow) -> PersonRef:
        person = self.s.get(PersonRow, rec.person_id)
        if person is None:  # a source record always has its person; never guess
            raise Unavailable(f"person {rec.person_id} of a source record is missing")
        return PersonRef(person.id, tuple(person.trusted_ids.split()))

    def _refresh_person(self, person_id: str, now: int) -> PersonRef:
        """Rebuild the golden record and trusted identifiers from the person's records."""
        self._identity.pop(person_id, None)
        return refresh_person(self.s, person_id, now, self.svc.trusted)

    def _release(self, source: str, local_id: str, event_id: str, now: int) -> list[ParkedMessage]:
        if self._parked_keys is not None and (source, local_id) not in self._parked_keys:
            return []  # the batch's prefetch found nothing parked for this patient
        out = []
        for row in db.parked_for(self.s, source, local_id, event_id):
            if row.released_ms is None:
                row.released_ms = now
                row.released_by = event_id
                self.s.add(row)
            out.append(ParkedMessage.from_row(row))
        return out
