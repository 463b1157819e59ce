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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import bindparam, insert, update
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, select

from hdx_patient_index import batch_store as bs
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


def _trusted_in(s: Session) -> Callable[[str], tuple[str, ...] | None]:
    def trusted(person_id: str) -> tuple[str, ...] | None:
        row = s.get(PersonRow, person_id)
        return _split(row.trusted_ids) if row is not None else None

    return trusted


def identity_state(
    s: Session,
    person_id: str,
    trusted_of: Callable[[str], tuple[str, ...] | None] | None = None,
) -> IdentityState:
    """Is this person's identity uncertain (an open review task on either side, a merge
    not yet reviewed), and which persons may it be? (See domain/identity.py.)

    ``trusted_of``: a person's trusted identifiers (None: no such person), by default as the
    session reads them; a batch passes those it holds."""
    trusted_of = trusted_of or _trusted_in(s)
    merges = tuple(m.id for m in db.merges_in_force(s, person_id))
    tasks = db.open_tasks_of(s, person_id)
    if not tasks:
        return IdentityState(person_id, merges=merges)
    candidates = [CandidatePerson(person_id, trusted_of(person_id) or ())]
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
            candidates.append(CandidatePerson(other, trusted_of(other) or ()))
    return IdentityState(
        person_id,
        reasons=tuple(dict.fromkeys(t.reason for t in tasks)),
        candidates=unique_candidates(candidates),
        merges=merges,
    )


_PERSONS = db.table_of(PersonRow)
# Compare-and-set on the version; one Core statement, compiled once.
_REFRESH_PERSON = (
    update(_PERSONS)
    .where(_PERSONS.c.id == bindparam("b_id"), _PERSONS.c.version == bindparam("b_version"))
    .values(
        golden=bindparam("b_golden"),
        trusted_ids=bindparam("b_trusted_ids"),
        version=bindparam("b_version_new"),
        updated_ms=bindparam("b_updated_ms"),
    )
)


_TRUSTED = db.table_of(TrustedIdRow)
_TASKS = db.table_of(ReviewTaskRow)
_MERGES = db.table_of(MergeRow)
# Has a person an open review task (either side) / a merge in force: what `prefetch` asks
# for the batch's persons, for one the batch did not load (a person the matcher chose).
# On the batch's connection without an autoflush: `_review` flushes each task it opens,
# and a batch makes no merges.
_HAS_OPEN_TASK = (
    select(_TASKS.c.id)
    .where(
        _TASKS.c.status == "open",
        (_TASKS.c.person_id == bindparam("p")) | (_TASKS.c.candidate_person_id == bindparam("p")),
    )
    .limit(1)
)
_HAS_MERGE = (
    select(_MERGES.c.id)
    .where(_MERGES.c.survivor_id == bindparam("p"), _MERGES.c.status != "unmerged")
    .limit(1)
)
# What `prefetch` asks for the batch: which of its patients have parked resources (waiting,
# or released by one of its events), which of its persons have open review tasks / merges.
_PARKED = db.table_of(ParkedRow)
_PARKED_KEYS = select(_PARKED.c.source, _PARKED.c.local_id).where(
    _PARKED.c.local_id.in_(bindparam("local_ids", expanding=True)),
    _PARKED.c.released_ms.is_(None)
    | _PARKED.c.released_by.in_(bindparam("event_ids", expanding=True)),
)
_OPEN_TASKS_OF = select(_TASKS.c.person_id, _TASKS.c.candidate_person_id).where(
    _TASKS.c.status == "open",
    _TASKS.c.person_id.in_(bindparam("persons", expanding=True))
    | _TASKS.c.candidate_person_id.in_(bindparam("persons", expanding=True)),
)
_MERGED_OF = select(_MERGES.c.survivor_id).where(
    _MERGES.c.survivor_id.in_(bindparam("persons", expanding=True)),
    _MERGES.c.status != "unmerged",
)
_PARKED_AT = (
    select(_PARKED.c.id)
    .where(
        _PARKED.c.topic == bindparam("topic"),
        _PARKED.c.origin_partition == bindparam("partition"),
        _PARKED.c.origin_offset == bindparam("offset"),
    )
    .limit(1)
)
_EVENT_LOG = db.table_of(EventLogRow)
_LOGGED = (
    select(_EVENT_LOG.c.id)
    .where(
        _EVENT_LOG.c.event_id == bindparam("event_id"),
        _EVENT_LOG.c.person_id == bindparam("person"),
    )
    .limit(1)
)
# Who claimed trusted identifiers: compiled once, run on the batch's connection. No
# autoflush is needed before it — a batch writes its claims at the end (`finish`) and
# answers its own from `BatchWork._owners` — so it does not flush the session either.
_TRUSTED_OWNERS = select(_TRUSTED.c.system, _TRUSTED.c.value, _TRUSTED.c.person_id).where(
    _TRUSTED.c.system.in_(bindparam("systems", expanding=True)),
    _TRUSTED.c.value.in_(bindparam("values", expanding=True)),
)


def refresh_person(
    s: Session,
    person_id: str,
    now: int,
    trusted: TrustedSystems,
    *,
    records: Sequence[SourceRecordRow] | None = None,
    replaces: Sequence[str] | None = None,
    loads: Callable[[str], Any] = orjson.loads,
) -> PersonRef:
    """Rebuild a person's golden record and trusted identifiers from its records, and bump
    its version — compare-and-set on the version it had when this session read it, so a
    concurrent change (another replica, an HTTP operation) makes this one fail instead of
    overwriting it (VersionConflict).

    A batch passes what it already holds: the person's ``records`` (all of them, in id
    order), the persons merged into it (``replaces``) and a caching JSON ``loads``."""
    person = s.get(PersonRow, person_id)
    if person is None:
        raise Unavailable(f"person {person_id} is missing")
    if records is None:
        records = db.records_of(s, person_id)
    ids: dict[str, None] = {}
    for r in records:
        for token in loads(r.demographics).get("trusted", ()):
            ids[token] = None
    if person.status == "merged" and person.replaced_by:
        golden = tombstone(person_id, person.replaced_by)
    else:
        if replaces is None:
            replaces = [m.merged_id for m in db.merges_in_force(s, person_id)]
        golden = golden_patient(
            person_id,
            [LinkedRecord(r.source, r.local_id, r.updated_ms, loads(r.snapshot)) for r in records],
            trusted,
            replaces=replaces,
        )
    s.flush()
    values = {
        "golden": orjson.dumps(golden).decode(),
        "trusted_ids": " ".join(sorted(ids)),
        "version": person.version + 1,
        "updated_ms": now,
    }
    params = {f"b_{k}": v for k, v in values.items() if k != "version"}
    result: Any = s.connection().execute(
        _REFRESH_PERSON,
        {
            **params,
            "b_id": person_id,
            "b_version": person.version,
            "b_version_new": values["version"],
        },
    )
    if result.rowcount != 1:
        raise VersionConflict(person_id)
    for name, value in values.items():  # the row as written, without reading it back
        set_committed_value(person, name, value)
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
                    work = BatchWork(self, s)
                    yield work
                    work.finish()
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


@dataclass(slots=True)
class _Parked:
    message: ParkedMessage
    row: dict[str, Any]  # the pix_parked row `finish` inserts


class BatchWork:
    """The operations of one batch, inside its transaction.

    The batch answers from what it loaded (`prefetch`) or looked up once: source records by
    key, trusted identifiers' owners, each person's records and parsed JSON, and which
    persons have no open review task or merge in force. Only this batch writes those rows
    for its keys while it runs (the service's lock keeps the HTTP operations out; another
    replica's concurrent change to a person fails the batch's compare-and-set on the
    person's version, and the batch is retried).

    Source records and persons are plain objects (`batch_store.Record`, `Person`), read
    with Core statements and written back once, in `finish` (`batch_store.flush_batch`):
    new ones with one multi-row insert each, changed ones with one executemany update each;
    a person's golden record is built once, from its records as the batch leaves them.
    Link, identifier and trusted-identifier rows are written in bulk there too. The ORM
    session keeps only the rare rows (review tasks, parked resources, the event log).
    """

    def __init__(self, service: PatientIndexService, session: Session) -> None:
        self.svc = service
        self.s = session
        self.conn = session.connection()
        self._people: dict[RecordKey, PersonRef | None] = {}
        self._identity: dict[str, IdentityState] = {}
        self._parked_keys: set[RecordKey] | None = None  # None: not prefetched, ask the DB
        # Source records looked up (None: there is none), by key: one object per record.
        self._records: dict[RecordKey, bs.Record | None] = {}
        # Each person's source records in id order (persons whose records were loaded).
        self._records_of: dict[str, list[bs.Record]] = {}
        # Trusted identifiers' owners as known to this batch (None: unclaimed).
        self._owners: dict[Identifier, str | None] = {}
        # Persons known to have no merge in force / no open review task.
        self._no_merges: set[str] = set()
        self._no_tasks: set[str] = set()
        self._json: dict[str, Any] = {}  # parsed demographics and snapshots, by their JSON
        self._persons: dict[str, bs.Person | None] = {}  # persons read or created
        self._links: list[dict[str, Any]] = []
        self._trusted_rows: list[dict[str, Any]] = []
        # What `finish` writes: created and changed records and persons (insertion order),
        # and the demographics whose identifier rows replace a record's.
        self._new_records: list[bs.Record] = []
        self._changed_records: dict[RecordKey, bs.Record] = {}
        self._new_persons: dict[str, bs.Person] = {}
        self._changed_persons: dict[str, bs.Person] = {}
        self._identifiers: dict[RecordKey, tuple[bs.Record, Demographics]] = {}
        # Events logged by this batch, by (event id, person).
        self._logged: dict[tuple[str, str], dict[str, Any]] = {}
        # Resources parked by this batch, by origin (topic, partition, offset).
        self._parked: dict[tuple[str, int, int], _Parked] = {}
        # Demographics of the batch's Patients, extracted by `prefetch`, by resource.
        self._demos: dict[int, tuple[dict[str, Any], Demographics]] = {}

    def prefetch(
        self,
        keys: set[RecordKey],
        event_ids: set[str],
        patient_keys: set[RecordKey] | None = None,
        patients: Sequence[dict[str, Any]] = (),
    ) -> None:
        """A few queries for the whole batch instead of several per message: the source
        records it names and their persons, which of them have parked resources, which
        persons have open review tasks or merges in force, and — for the Patients in it
        (``patient_keys``; ``patients``, the parsed resources) — every record of their
        persons and who claimed their trusted identifiers."""
        conn = self.conn
        if patients:
            self._prefetch_owners(patients)
        if not keys:
            return
        local_ids = sorted({k[1] for k in keys})
        for rec in bs.records_by_local_id(conn, local_ids):
            key = (rec.source, rec.local_id)
            if key in keys:
                self._records[key] = rec
        for key in keys:
            self._records.setdefault(key, None)
        person_ids = sorted({r.person_id for r in self._records.values() if r is not None})
        persons: dict[str, bs.Person] = {}
        if person_ids:
            persons = {p.id: p for p in bs.persons_by_id(conn, person_ids)}
        self._persons.update(persons)
        for key, found in self._records.items():
            if found is not None and found.person_id in persons:
                person = persons[found.person_id]
                self._people[key] = PersonRef(person.id, tuple(person.trusted_ids.split()))
        self._parked_keys = {
            (src, lid)
            for src, lid in conn.execute(
                _PARKED_KEYS, {"local_ids": local_ids, "event_ids": sorted(event_ids)}
            )
        }
        if not persons:
            return
        known = sorted(persons)
        tasked: set[str] = set()
        for pid, cid in conn.execute(_OPEN_TASKS_OF, {"persons": known}):
            tasked.update((pid, cid))
        merged = {pid for (pid,) in conn.execute(_MERGED_OF, {"persons": known})}
        self._no_tasks.update(p for p in known if p not in tasked)
        self._no_merges.update(p for p in known if p not in merged)
        of_patients = sorted(
            {
                r.person_id
                for k in patient_keys or ()
                if (r := self._records.get(k)) is not None and r.person_id in persons
            }
        )
        if of_patients:
            for pid in of_patients:
                self._records_of[pid] = []
            for rec in self._known(bs.records_of_persons(conn, of_patients)):
                self._records_of[rec.person_id].append(rec)

    def _prefetch_owners(self, patients: Sequence[dict[str, Any]]) -> None:
        """The Patients' demographics (kept for `link_patient`) and, in one query, who
        claimed their trusted identifiers."""
        trusted: set[Identifier] = set()
        for doc in patients:
            try:
                demo = extract_demographics(doc, self.svc.trusted)
            except Exception:
                continue
            self._demos[id(doc)] = (doc, demo)
            trusted.update(demo.trusted)
        if trusted:
            self._trusted_owners(sorted(trusted, key=lambda i: (i.system, i.value)))

    def _known(self, records: list[bs.Record]) -> list[bs.Record]:
        """Records as the batch holds them: the object it already has for a key, else the
        one just read (kept from now on)."""
        out = []
        for rec in records:
            key = (rec.source, rec.local_id)
            held = self._records.get(key)
            if held is None:
                self._records[key] = held = rec
            out.append(held)
        return out

    def finish(self) -> None:
        """Write what the batch kept for the end, in bulk (before its commit)."""
        conn = self.conn
        for person in [*self._new_persons.values(), *self._changed_persons.values()]:
            person.golden = self._golden(person)
        conflict = bs.flush_batch(
            conn,
            new_persons=self._new_persons.values(),
            changed_persons=self._changed_persons.values(),
            new_records=self._new_records,
            changed_records=[r for r in self._changed_records.values() if r.id is not None],
            identifiers=self._identifiers.values(),
        )
        if conflict is not None:
            raise VersionConflict(conflict)
        self._new_persons, self._changed_persons = {}, {}
        self._new_records, self._changed_records, self._identifiers = [], {}, {}
        if self._links:
            conn.execute(insert(db.table_of(LinkRow)), self._links)
            self._links = []
        if self._trusted_rows:
            conn.execute(insert(db.table_of(TrustedIdRow)), self._trusted_rows)
            self._trusted_rows = []
        if self._parked:
            conn.execute(insert(_PARKED), [p.row for p in self._parked.values()])
            self._parked = {}
        if self._logged:
            conn.execute(insert(_EVENT_LOG), list(self._logged.values()))
            self._logged = {}

    def _golden(self, person: bs.Person) -> str:
        """The person's golden record from its records as the batch leaves them (what
        `refresh_person` builds)."""
        if person.status == "merged" and person.replaced_by:
            golden = tombstone(person.id, person.replaced_by)
        else:
            replaces = (
                ()
                if person.id in self._no_merges
                else [m.merged_id for m in db.merges_in_force(self.s, person.id)]
            )
            golden = golden_patient(
                person.id,
                [
                    LinkedRecord(r.source, r.local_id, r.updated_ms, self._loads(r.snapshot))
                    for r in self._person_records(person.id)
                ],
                self.svc.trusted,
                replaces=replaces,
            )
        return orjson.dumps(golden).decode()

    # Lookups, answered from the batch where it can -----------------------------------------
    def _record(self, key: RecordKey) -> bs.Record | None:
        if key not in self._records:
            self._records[key] = bs.record_by_key(self.conn, *key)
        return self._records[key]

    def _person_row(self, person_id: str) -> bs.Person | None:
        if person_id in self._persons:
            return self._persons[person_id]
        person = self._persons[person_id] = bs.person_by_id(self.conn, person_id)
        return person

    def _person_records(self, person_id: str) -> list[bs.Record]:
        records = self._records_of.get(person_id)
        if records is None:
            records = self._records_of[person_id] = self._known(
                bs.records_of_persons(self.conn, [person_id])
            )
        return records

    def _loads(self, text: str) -> Any:
        parsed = self._json.get(text)
        if parsed is None:
            parsed = self._json[text] = orjson.loads(text)
        return parsed

    def _trusted_owners(self, identifiers: Sequence[Identifier]) -> dict[Identifier, str]:
        """Which person claimed each of these trusted identifiers (those claimed): one
        query for those the batch has not looked up yet."""
        missing = {i for i in identifiers if i not in self._owners}
        if missing:
            for i in missing:
                self._owners[i] = None
            for system, value, person_id in self.s.connection().execute(
                _TRUSTED_OWNERS,
                {
                    "systems": sorted({i.system for i in missing}),
                    "values": sorted({i.value for i in missing}),
                },
            ):
                ident = Identifier(system, value)
                if ident in missing:
                    self._owners[ident] = person_id
        out: dict[Identifier, str] = {}
        for i in identifiers:
            owner = self._owners[i]
            if owner is not None:
                out[i] = owner
        return out

    # Identity state ----------------------------------------------------------------------
    def identity(self, person_id: str) -> IdentityState:
        """The person's identity state (cached for the batch; a new review task clears it)."""
        state = self._identity.get(person_id)
        if state is None:
            self._learn_state(person_id)
            if person_id in self._no_tasks and person_id in self._no_merges:
                state = IdentityState(person_id)  # what identity_state says, without asking
            else:
                state = identity_state(self.s, person_id, self._trusted_of)
                if not state.reasons:  # no open review task (until `_review` opens one)
                    self._no_tasks.add(person_id)
                if not state.merges:  # no merge in force (the batch makes none)
                    self._no_merges.add(person_id)
            self._identity[person_id] = state
        return state

    def _trusted_of(self, person_id: str) -> tuple[str, ...] | None:
        """A person's trusted identifiers as the batch holds them (None: no such person)."""
        person = self._person_row(person_id)
        return _split(person.trusted_ids) if person is not None else None

    def _learn_state(self, person_id: str) -> None:
        """Find out (two precompiled queries) whether a person the batch has not asked about
        has an open review task or a merge in force; `identity` and `_refresh_person` then
        answer a person with neither without loading its rows."""
        if person_id in self._no_tasks and person_id in self._no_merges:
            return
        conn = self.conn
        params = {"p": person_id}
        if person_id not in self._no_tasks and conn.execute(_HAS_OPEN_TASK, params).first() is None:
            self._no_tasks.add(person_id)
        if person_id not in self._no_merges and conn.execute(_HAS_MERGE, params).first() is None:
            self._no_merges.add(person_id)

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
        logged = (event_id, state.person)
        if logged in self._logged:
            return
        if self.conn.execute(_LOGGED, {"event_id": event_id, "person": state.person}).first():
            return
        # Written in `finish`, in the order logged (ids in emission order, as before).
        self._logged[logged] = {
            "event_id": event_id,
            "person_id": state.person,
            "source": source,
            "local_id": local_id,
            "resource_type": resource_type,
            "emitted_ms": self.svc.clock(),
            "uncertain": state.uncertain,
            "candidates": candidates_json(state.candidates),
            "value": value if state.uncertain else None,
            "headers": orjson.dumps(headers).decode() if state.uncertain else None,
            "reemitted_ms": None,
            "reemitted_by": None,
        }

    # Non-Patient resources -------------------------------------------------------------
    def person_for(self, source: str, local_id: str) -> PersonRef | None:
        key = (source, local_id)
        if key not in self._people:
            rec = self._record(key)
            person = self._person_row(rec.person_id) if rec is not None else None
            self._people[key] = (
                PersonRef(person.id, tuple(person.trusted_ids.split())) if person else None
            )
        return self._people[key]

    def park(self, m: ParkedMessage) -> None:
        """Keep a resource until its Patient arrives (once: a redelivery is not parked twice)."""
        if self._parked_keys is not None:
            self._parked_keys.add((m.source, m.local_id))
        origin = (m.topic, m.partition, m.offset)
        if origin in self._parked:
            return
        params = {"topic": m.topic, "partition": m.partition, "offset": m.offset}
        if self.conn.execute(_PARKED_AT, params).first() is not None:
            return
        # Written in `finish`, in the order parked (ids in arrival order, as before).
        self._parked[origin] = _Parked(
            m,
            {
                "source": m.source,
                "local_id": m.local_id,
                "event_id": m.event_id,
                "topic": m.topic,
                "origin_partition": m.partition,
                "origin_offset": m.offset,
                "key": m.key,
                "value": m.value,
                "headers": orjson.dumps(m.headers).decode(),
                "parked_ms": self.svc.clock(),
                "released_ms": None,
                "released_by": None,
            },
        )

    # Patients ----------------------------------------------------------------------------
    def link_patient(
        self, source: str, local_id: str, patient: dict[str, Any], event_id: str
    ) -> LinkOutcome:
        """Link a Patient's (source, local id) to a person. A source record seen before
        keeps its person; its demographics are updated and re-filed."""
        svc = self.svc
        key = (source, local_id)
        cached = self._demos.get(id(patient))
        if cached is not None and cached[0] is patient:
            demo = cached[1]
        else:
            demo = extract_demographics(patient, svc.trusted)
        snap = orjson.dumps(snapshot(patient), option=orjson.OPT_SORT_KEYS).decode()
        now = svc.clock()
        rec = self._record(key)
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
                    self._identifiers[key] = (rec, demo)
                    svc.index.put(key, rec.person_id, demo)
                    self._claim(demo.trusted, rec.person_id, key)
                    self._check_update(key, demo, rec.person_id)
                self._changed_records[key] = rec
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
    ) -> tuple[bs.Record, LinkEvent]:
        svc = self.svc
        source, local_id = key
        # Persons another replica created with one of these identifiers: file them first.
        owners = set(self._trusted_owners(demo.trusted).values())
        if owners:
            for pid in owners:
                if not svc.index.records_of(pid):
                    svc.store.load_person(self.s, svc.index, pid)
        decision = svc.matcher.decide(demo, svc.index)
        person = self._person_row(decision.person_id) if decision.person_id else None
        if person is None:
            person = bs.Person(
                id=str(uuid.uuid4()),
                golden="{}",
                trusted_ids="",
                possible_match=False,
                status="active",
                replaced_by=None,
                version=1,
                created_ms=now,
                updated_ms=now,
            )
            self._persons[person.id] = person
            self._new_persons[person.id] = person
            # A new person: no records yet, no review task, no merge.
            self._records_of[person.id] = []
            self._no_tasks.add(person.id)
            self._no_merges.add(person.id)
        records = self._person_records(person.id)  # read before the new record joins them
        rec = bs.Record(
            id=None,
            source=source,
            local_id=local_id,
            person_id=person.id,
            demographics=_demographics_json(demo),
            snapshot=snap,
            version=1,
            last_event_id=event_id,
            created_ms=now,
            updated_ms=now,
            linked_ms=0,
        )
        self._new_records.append(rec)
        self._records[key] = rec
        records.append(rec)  # the newest id: the end of the list
        self._identifiers[key] = (rec, demo)
        best = decision.candidates[0].weight if decision.candidates else None
        self._links.append(
            {
                "source": source,
                "local_id": local_id,
                "person_id": person.id,
                "grade": decision.grade.value,
                "by": "auto",
                "operation": None,
                "weight": best if decision.person_id else None,
                "event_id": event_id,
                "created_ms": now,
                "superseded_ms": None,
            }
        )
        for item in decision.review:
            self._review(key, person.id, item.candidate, item.reason)
        if decision.possible_match:
            person.possible_match = True
            if person.read_version is not None:
                self._changed_persons[person.id] = person
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
        owners = self._trusted_owners(trusted)
        for ident in trusted:
            owner = owners.get(ident)
            if owner is None:
                self._owners[ident] = person_id
                self._trusted_rows.append(
                    {
                        "system": ident.system,
                        "value": ident.value,
                        "person_id": person_id,
                        "created_ms": now_ms(),
                    }
                )
            elif owner != person_id:
                c = Candidate(owner, Grade.POSSIBLE, 0.0, 0.0, basis=Basis.TRUSTED_ID)
                self._review(key, person_id, c, ReviewReason.TRUSTED_ID_CONFLICT)

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
        other = self._person_row(candidate.person_id)
        if other is not None and other.status != "active":
            return
        self._identity.pop(person_id, None)
        self._identity.pop(candidate.person_id, None)
        self._no_tasks.discard(person_id)
        self._no_tasks.discard(candidate.person_id)
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

    def _person(self, rec: bs.Record) -> PersonRef:
        person = self._person_row(rec.person_id)
        if person is None:  # a source record always has its person; never guess
            raise Unavailable(f"person {rec.person_id} of a source record is missing")
        return PersonRef(person.id, tuple(person.trusted_ids.split()))

    def _refresh_person(self, person_id: str, now: int) -> PersonRef:
        """Rebuild the trusted identifiers from the person's records and bump its version
        (what `refresh_person` does; its golden record is built once, in `finish`, and the
        version compared-and-set there)."""
        self._identity.pop(person_id, None)
        person = self._person_row(person_id)
        if person is None:
            raise Unavailable(f"person {person_id} is missing")
        self._learn_state(person_id)
        ids: dict[str, None] = {}
        for r in self._person_records(person_id):
            for token in self._loads(r.demographics).get("trusted", ()):
                ids[token] = None
        trusted = tuple(sorted(ids))
        person.trusted_ids = " ".join(trusted)
        person.version += 1
        person.updated_ms = now
        if person.read_version is not None:
            self._changed_persons[person_id] = person
        return PersonRef(person.id, trusted)

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
        # Parked by this batch (not written yet): after those in the database, in order.
        for parked in self._parked.values():
            m, values = parked.message, parked.row
            if (m.source, m.local_id) != (source, local_id):
                continue
            if values["released_ms"] is None:
                values["released_ms"], values["released_by"] = now, event_id
            elif values["released_by"] != event_id:
                continue
            out.append(m)
        return out
