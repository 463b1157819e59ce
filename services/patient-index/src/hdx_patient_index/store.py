"""The patient index's database adapter (SQLModel; SQLite or PostgreSQL).

Reads for the HTTP API open their own short sessions. The pipeline's writes go through
`transaction()`: one session, one commit for a whole batch. A database that cannot be
reached surfaces as `Unavailable`, so the stage waits instead of deciding without its state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Table, delete, func, insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel, col, select

from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.identifiers import Identifier
from hdx_patient_index.domain.index import PersonIndex
from hdx_patient_index.models import (
    EventLogRow,
    IdentifierRow,
    LinkRow,
    MergeRow,
    NoLinkRow,
    OutboxRow,
    ParkedRow,
    PersonRow,
    ReviewTaskRow,
    SourceRecordRow,
    TrustedIdRow,
)
from hdx_shared.db import migrate
from hdx_shared.messaging import Unavailable


def _unavailable(exc: OperationalError) -> Unavailable:
    return Unavailable(f"patient-index database: {exc.orig!s}"[:200])


class PatientIndexStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create_schema(self) -> None:
        """Bring the database to the newest schema (Alembic migrations in the package)."""
        migrate(self.engine, Path(__file__).with_name("migrations"))

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One session committed at the end; OperationalError → Unavailable."""
        try:
            with Session(self.engine, expire_on_commit=False) as s:
                yield s
                s.commit()
        except OperationalError as exc:
            raise _unavailable(exc) from exc

    @contextmanager
    def reading(self) -> Iterator[Session]:
        try:
            with Session(self.engine, expire_on_commit=False) as s:
                yield s
        except OperationalError as exc:
            raise _unavailable(exc) from exc

    # The in-memory index --------------------------------------------------------------
    def load_index(self, index: PersonIndex, since_ms: int | None = None) -> int:
        """File every source record (changed since ``since_ms``) in the index; the count."""
        n = 0
        with self.reading() as s:
            q = select(
                SourceRecordRow.source,
                SourceRecordRow.local_id,
                SourceRecordRow.person_id,
                SourceRecordRow.demographics,
            )
            if since_ms is not None:
                q = q.where(
                    (col(SourceRecordRow.updated_ms) >= since_ms)
                    | (col(SourceRecordRow.linked_ms) >= since_ms)
                )
            for source, local_id, person_id, demographics in s.exec(q):
                index.put(
                    (source, local_id),
                    person_id,
                    Demographics.from_json(orjson.loads(demographics)),
                )
                n += 1
        return n

    @staticmethod
    def load_person(s: Session, index: PersonIndex, person_id: str) -> None:
        """File one person's records (written by another replica, maybe) in the index."""
        for rec in records_of(s, person_id):
            index.put(
                (rec.source, rec.local_id),
                rec.person_id,
                Demographics.from_json(orjson.loads(rec.demographics)),
            )

    # Reads the HTTP API uses -----------------------------------------------------------
    def person(self, person_id: str) -> PersonRow | None:
        with self.reading() as s:
            return s.get(PersonRow, person_id)

    def persons(self, person_ids: Iterable[str]) -> list[PersonRow]:
        ids = sorted(set(person_ids))
        if not ids:
            return []
        with self.reading() as s:
            return list(s.exec(select(PersonRow).where(col(PersonRow.id).in_(ids))))

    def persons_by_identifier(self, system: str, value: str) -> list[str]:
        """Persons with this identifier: a carried identifier, or ``source|local id``.

        An empty system matches the value in any system.
        """
        with self.reading() as s:
            q = select(IdentifierRow.person_id).where(IdentifierRow.value == value)
            if system:
                q = q.where(IdentifierRow.system == system)
            found = set(s.exec(q))
            r = select(SourceRecordRow.person_id).where(SourceRecordRow.local_id == value)
            if system:
                r = r.where(SourceRecordRow.source == system)
            found.update(s.exec(r))
        return sorted(found)

    def trusted_owner_ids(self, identifiers: Sequence[Identifier]) -> set[str]:
        with self.reading() as s:
            return set(trusted_owners(s, identifiers).values())

    def review_tasks(
        self, status: str | None = None, limit: int = 100, person: str | None = None
    ) -> list[ReviewTaskRow]:
        with self.reading() as s:
            q = select(ReviewTaskRow).order_by(col(ReviewTaskRow.created_ms).desc()).limit(limit)
            if status:
                q = q.where(ReviewTaskRow.status == status)
            if person:
                q = q.where(
                    (col(ReviewTaskRow.person_id) == person)
                    | (col(ReviewTaskRow.candidate_person_id) == person)
                )
            return list(s.exec(q))

    def review_task(self, task_id: str) -> ReviewTaskRow | None:
        with self.reading() as s:
            return s.get(ReviewTaskRow, task_id)

    def merge(self, merge_id: str) -> MergeRow | None:
        with self.reading() as s:
            return s.get(MergeRow, merge_id)

    def merges(self, person: str | None = None, limit: int = 100) -> list[MergeRow]:
        with self.reading() as s:
            q = select(MergeRow).order_by(col(MergeRow.merged_ms).desc()).limit(limit)
            if person:
                q = q.where(
                    (col(MergeRow.survivor_id) == person) | (col(MergeRow.merged_id) == person)
                )
            return list(s.exec(q))

    def merge_events(self, merge: MergeRow) -> list[EventLogRow]:
        with self.reading() as s:
            return merge_events_in(s, merge)

    def links_of(self, source: str, local_id: str) -> list[LinkRow]:
        """A source record's link history, oldest first."""
        with self.reading() as s:
            return list(
                s.exec(
                    select(LinkRow)
                    .where(LinkRow.source == source, LinkRow.local_id == local_id)
                    .order_by(col(LinkRow.id))
                )
            )

    # The outbox ------------------------------------------------------------------------
    def outbox(self, limit: int = 500) -> list[OutboxRow]:
        with self.reading() as s:
            return list(s.exec(select(OutboxRow).order_by(col(OutboxRow.id)).limit(limit)))

    def delete_outbox(self, ids: Sequence[int]) -> None:
        if ids:
            with self.transaction() as s:
                s.execute(delete(OutboxRow).where(col(OutboxRow.id).in_(list(ids))))

    # The park timeout ------------------------------------------------------------------
    def expired_parked(self, cutoff_ms: int, limit: int = 500) -> list[ParkedRow]:
        with self.reading() as s:
            return list(
                s.exec(
                    select(ParkedRow)
                    .where(
                        col(ParkedRow.released_ms).is_(None),
                        col(ParkedRow.parked_ms) < cutoff_ms,
                    )
                    .order_by(col(ParkedRow.id))
                    .limit(limit)
                )
            )

    def count_parked(self) -> int:
        """Resources waiting for their Patient (parked, not released)."""
        with self.reading() as s:
            return int(
                s.exec(
                    select(func.count())
                    .select_from(ParkedRow)
                    .where(col(ParkedRow.released_ms).is_(None))
                ).one()
            )

    def delete_parked(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self.transaction() as s:
            s.execute(delete(ParkedRow).where(col(ParkedRow.id).in_(list(ids))))

    def forget_released(self, before_ms: int) -> int:
        """Drop released rows older than ``before_ms`` (kept only for redelivered Patients)."""
        with self.transaction() as s:
            result: Any = s.execute(
                delete(ParkedRow).where(
                    col(ParkedRow.released_ms).is_not(None),
                    col(ParkedRow.released_ms) < before_ms,
                )
            )
            return int(result.rowcount or 0)


# In-transaction helpers (they take the batch's session) ------------------------------------
def table_of(model: type[SQLModel]) -> Table:
    """A table model's Core table, for bulk statements that bypass the unit of work."""
    table: Table = model.__table__  # type: ignore[attr-defined]
    return table


def source_record(s: Session, source: str, local_id: str) -> SourceRecordRow | None:
    return s.exec(
        select(SourceRecordRow).where(
            SourceRecordRow.source == source, SourceRecordRow.local_id == local_id
        )
    ).first()


def records_of(s: Session, person_id: str) -> list[SourceRecordRow]:
    return list(
        s.exec(
            select(SourceRecordRow)
            .where(SourceRecordRow.person_id == person_id)
            .order_by(col(SourceRecordRow.id))
        )
    )


def trusted_owners(s: Session, identifiers: Sequence[Identifier]) -> dict[Identifier, str]:
    """Which person claimed each of these trusted identifiers (those claimed)."""
    out: dict[Identifier, str] = {}
    for ident in identifiers:
        row = s.get(TrustedIdRow, (ident.system, ident.value))
        if row is not None:
            out[ident] = row.person_id
    return out


def replace_identifiers(
    s: Session, record: SourceRecordRow, demographics: Demographics, *, new: bool = False
) -> None:
    """The record's identifier rows, in one bulk insert (``new``: the record was just
    created, so it has none to delete)."""
    assert record.id is not None
    table = table_of(IdentifierRow)  # Core: nothing in the session holds these rows
    conn = s.connection()
    if not new:
        conn.execute(delete(table).where(table.c.record_id == record.id))
    rows = [
        {
            "system": ident.system,
            "value": ident.value,
            "trusted": trusted,
            "record_id": record.id,
            "person_id": record.person_id,
        }
        for ident, trusted in [(i, True) for i in demographics.trusted]
        + [(i, False) for i in demographics.identifiers]
    ]
    if rows:
        conn.execute(insert(table), rows)


def current_link(s: Session, source: str, local_id: str) -> LinkRow | None:
    return s.exec(
        select(LinkRow).where(
            LinkRow.source == source,
            LinkRow.local_id == local_id,
            col(LinkRow.superseded_ms).is_(None),
        )
    ).first()


def parked_for(s: Session, source: str, local_id: str, event_id: str) -> list[ParkedRow]:
    """Parked rows waiting for this patient, plus those this same Patient event released
    before (a redelivered Patient re-releases them: the first release may not have been
    published)."""
    return list(
        s.exec(
            select(ParkedRow)
            .where(
                ParkedRow.source == source,
                ParkedRow.local_id == local_id,
                col(ParkedRow.released_ms).is_(None) | (col(ParkedRow.released_by) == event_id),
            )
            .order_by(col(ParkedRow.id))
        )
    )


def parked_at(s: Session, topic: str, partition: int, offset: int) -> ParkedRow | None:
    return s.exec(
        select(ParkedRow).where(
            ParkedRow.topic == topic,
            ParkedRow.origin_partition == partition,
            ParkedRow.origin_offset == offset,
        )
    ).first()


def existing_review(
    s: Session, source: str, local_id: str, candidate: str, reason: str
) -> ReviewTaskRow | None:
    return s.exec(
        select(ReviewTaskRow).where(
            ReviewTaskRow.source == source,
            ReviewTaskRow.local_id == local_id,
            ReviewTaskRow.candidate_person_id == candidate,
            ReviewTaskRow.reason == reason,
        )
    ).first()


def headers_json(headers: dict[str, str]) -> str:
    return orjson.dumps(headers).decode()


def merge_events_in(s: Session, merge: MergeRow) -> list[EventLogRow]:
    """What the stage emitted for the survivor while the merge was in force (from the merge
    to the unmerge, or to now)."""
    q = (
        select(EventLogRow)
        .where(
            EventLogRow.person_id == merge.survivor_id,
            col(EventLogRow.emitted_ms) >= merge.merged_ms,
        )
        .order_by(col(EventLogRow.id))
    )
    if merge.unmerged_ms is not None:
        q = q.where(col(EventLogRow.emitted_ms) <= merge.unmerged_ms)
    return list(s.exec(q))


def open_tasks_of(s: Session, person_id: str) -> list[ReviewTaskRow]:
    """Open review tasks this person is on either side of, oldest first."""
    return list(
        s.exec(
            select(ReviewTaskRow)
            .where(
                ReviewTaskRow.status == "open",
                (col(ReviewTaskRow.person_id) == person_id)
                | (col(ReviewTaskRow.candidate_person_id) == person_id),
            )
            .order_by(col(ReviewTaskRow.created_ms), col(ReviewTaskRow.id))
        )
    )


def open_tasks_of_record(s: Session, source: str, local_id: str) -> list[ReviewTaskRow]:
    return list(
        s.exec(
            select(ReviewTaskRow).where(
                ReviewTaskRow.status == "open",
                ReviewTaskRow.source == source,
                ReviewTaskRow.local_id == local_id,
            )
        )
    )


def merges_in_force(s: Session, survivor_id: str) -> list[MergeRow]:
    """Merges into this person that were not undone, oldest first."""
    return list(
        s.exec(
            select(MergeRow)
            .where(MergeRow.survivor_id == survivor_id, MergeRow.status != "unmerged")
            .order_by(col(MergeRow.merged_ms))
        )
    )


def no_link(s: Session, source: str, local_id: str, person_id: str) -> NoLinkRow | None:
    return s.exec(
        select(NoLinkRow).where(
            NoLinkRow.source == source,
            NoLinkRow.local_id == local_id,
            NoLinkRow.person_id == person_id,
        )
    ).first()


def no_links_of(s: Session, source: str, local_id: str) -> list[NoLinkRow]:
    return list(
        s.exec(
            select(NoLinkRow)
            .where(NoLinkRow.source == source, NoLinkRow.local_id == local_id)
            .order_by(col(NoLinkRow.id))
        )
    )


def logged_event(s: Session, event_id: str, person_id: str) -> EventLogRow | None:
    return s.exec(
        select(EventLogRow).where(
            EventLogRow.event_id == event_id, EventLogRow.person_id == person_id
        )
    ).first()


def pending_reemission(s: Session, source: str, local_id: str) -> list[EventLogRow]:
    """Events of this source record emitted while its identity was uncertain and not yet
    re-emitted, in the order they were emitted."""
    return list(
        s.exec(
            select(EventLogRow)
            .where(
                EventLogRow.source == source,
                EventLogRow.local_id == local_id,
                col(EventLogRow.uncertain).is_(True),
                col(EventLogRow.reemitted_ms).is_(None),
            )
            .order_by(col(EventLogRow.id))
        )
    )
