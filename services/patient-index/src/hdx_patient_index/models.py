"""The patient index's tables (all prefixed ``pix_``): persons and their golden records,
source records, trusted-identifier claims, identifiers, links, no-links, merges, review tasks,
parked messages, the log of events emitted while identity was uncertain (or a merge was in
force) and the outbox of records the HTTP operations publish.

Times are milliseconds since the epoch (``*_ms``): comparable the same way on SQLite and
PostgreSQL, with no time-zone conversions in between.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Index, LargeBinary, Text, text
from sqlmodel import Column, Field, SQLModel, UniqueConstraint

from hdx_shared.envelope import now_ms


class PersonRow(SQLModel, table=True):
    """An enterprise person: the id HDX stamps everywhere, and its golden record."""

    __tablename__ = "pix_person"

    id: str = Field(primary_key=True, max_length=36)  # UUID4
    golden: str = Field(sa_column=Column(Text, nullable=False))  # FHIR Patient JSON
    trusted_ids: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    possible_match: bool = False  # created while a possible match awaits review
    # active | merged (its records joined ``replaced_by``; kept as a tombstone)
    status: str = Field(default="active", max_length=16)
    replaced_by: str | None = Field(default=None, max_length=36)
    # Bumped by every change; the HTTP operations compare-and-set it (If-Match, 409).
    version: int = 1
    created_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)
    updated_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)


class SourceRecordRow(SQLModel, table=True):
    """One source's patient (source, local id) and the person it is linked to."""

    __tablename__ = "pix_source_record"
    __table_args__ = (UniqueConstraint("source", "local_id"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str
    local_id: str = Field(index=True)
    person_id: str = Field(index=True)
    demographics: str = Field(sa_column=Column(Text, nullable=False))  # normalised, JSON
    snapshot: str = Field(sa_column=Column(Text, nullable=False))  # the Patient's elements
    version: int = 1
    last_event_id: str = ""
    created_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)
    # When the source's Patient last changed (golden-record survivorship reads it).
    updated_ms: int = Field(default_factory=now_ms, index=True, sa_type=BigInteger)
    # When the record was last moved to another person (other replicas re-file it).
    linked_ms: int = Field(default=0, index=True, sa_type=BigInteger)


class TrustedIdRow(SQLModel, table=True):
    """A trusted identifier claimed by one person. The primary key makes the claim unique
    across replicas: two replicas creating two persons for one NHS number cannot both
    commit, and the loser's batch is retried and links to the winner."""

    __tablename__ = "pix_trusted_id"

    system: str = Field(primary_key=True)
    value: str = Field(primary_key=True)
    person_id: str = Field(index=True)
    created_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)


class IdentifierRow(SQLModel, table=True):
    """Every identifier a source record carries (normalised), for search and PIX."""

    __tablename__ = "pix_identifier"
    __table_args__ = (Index("ix_pix_identifier_system_value", "system", "value"),)

    id: int | None = Field(default=None, primary_key=True)
    system: str
    value: str
    trusted: bool = False
    record_id: int = Field(index=True)
    person_id: str = Field(index=True)


class LinkRow(SQLModel, table=True):
    """The history of links: a source record's current link has no ``superseded_ms``, and
    a partial unique index makes sure it has at most one (never two persons at once)."""

    __tablename__ = "pix_link"
    __table_args__ = (
        Index(
            "ux_pix_link_current",
            "source",
            "local_id",
            unique=True,
            sqlite_where=text("superseded_ms IS NULL"),
            postgresql_where=text("superseded_ms IS NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    source: str
    local_id: str = Field(index=True)
    person_id: str = Field(index=True)
    grade: str  # certain | probable | possible
    by: str = "auto"  # auto (the matcher) | manual (a person decided: sticky)
    operation: str | None = None  # link | unlink | merge | unmerge | review | confirm
    weight: float | None = None
    event_id: str = ""
    created_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)
    superseded_ms: int | None = Field(default=None, sa_type=BigInteger)


class ReviewTaskBase(SQLModel):
    status: str = Field(default="open", index=True)  # open | resolved
    # possible-match | ambiguous-match | trusted-id-conflict | matches-another-person |
    # merge-review (source "urn:hdx:merge", local_id = the merge id)
    reason: str
    source: str
    local_id: str
    person_id: str = Field(index=True)  # the person the record is linked to now
    candidate_person_id: str = Field(index=True)  # the person it may (also) be
    weight: float | None = None
    probability: float | None = None
    created_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)
    resolved_ms: int | None = Field(default=None, sa_type=BigInteger)
    # same-person | different-person | merged | unmerged | superseded
    resolution: str | None = None
    resolved_by: str | None = None


class ReviewTaskPublic(ReviewTaskBase):
    """A review task as the API shows it."""

    id: str
    levels: dict[str, str] = {}


class ReviewTaskRow(ReviewTaskBase, table=True):
    __tablename__ = "pix_review_task"
    __table_args__ = (UniqueConstraint("source", "local_id", "candidate_person_id", "reason"),)

    id: str = Field(primary_key=True, max_length=36)
    levels: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))


class ParkedRow(SQLModel, table=True):
    """A resource whose Patient has not arrived yet: kept, in arrival order (``id``), until
    the Patient releases it or the park timeout dead-letters it. A released row stays for a
    while with the Patient event that released it, so a redelivered Patient re-releases it."""

    __tablename__ = "pix_parked"
    __table_args__ = (
        UniqueConstraint("topic", "origin_partition", "origin_offset"),
        Index("ix_pix_parked_source_local_id", "source", "local_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    source: str
    local_id: str
    event_id: str
    topic: str
    origin_partition: int
    origin_offset: int = Field(sa_type=BigInteger)
    key: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    headers: str = Field(sa_column=Column(Text, nullable=False))  # JSON object
    parked_ms: int = Field(default_factory=now_ms, index=True, sa_type=BigInteger)
    released_ms: int | None = Field(default=None, index=True, sa_type=BigInteger)
    released_by: str | None = None  # the event id of the Patient that released it


class NoLinkRow(SQLModel, table=True):
    """A person decided this source record is *not* this person: the matcher never links
    it there again, and no review task offers that person for it."""

    __tablename__ = "pix_no_link"
    __table_args__ = (UniqueConstraint("source", "local_id", "person_id"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str
    local_id: str = Field(index=True)
    person_id: str = Field(index=True)
    by: str = "manual"
    reviewer: str = ""
    operation: str = ""  # the operation that made it (an id)
    created_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)


class MergeRow(SQLModel, table=True):
    """A merge of ``merged_id`` into ``survivor_id``: what each person was before it, and
    which source records moved, so an unmerge can put them back."""

    __tablename__ = "pix_merge"

    id: str = Field(primary_key=True, max_length=36)
    survivor_id: str = Field(index=True)
    merged_id: str = Field(index=True)
    # Each person's trusted identifiers before the merge ("system|value", space-separated).
    survivor_trusted: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    merged_trusted: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    records: str = Field(sa_column=Column(Text, nullable=False))  # JSON [[source, local id]]
    status: str = Field(default="pending-review", index=True)  # … | confirmed | unmerged
    reviewer: str = ""
    weight: float | None = None
    levels: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    merged_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)
    reviewed_ms: int | None = Field(default=None, sa_type=BigInteger)
    unmerged_ms: int | None = Field(default=None, sa_type=BigInteger)
    unmerged_by: str | None = None


class EventLogRow(SQLModel, table=True):
    """An event the stage emitted for a person whose identity was uncertain (kept with the
    validated bytes and headers, to re-emit once it is resolved) or who had a merge in force
    (its id only, for the unmerge's review list)."""

    __tablename__ = "pix_event_log"
    __table_args__ = (
        UniqueConstraint("event_id", "person_id"),
        Index("ix_pix_event_log_source_local_id", "source", "local_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    event_id: str
    person_id: str = Field(index=True)
    source: str
    local_id: str
    resource_type: str = ""
    emitted_ms: int = Field(default_factory=now_ms, index=True, sa_type=BigInteger)
    uncertain: bool = False
    candidates: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))
    value: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    headers: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    reemitted_ms: int | None = Field(default=None, index=True, sa_type=BigInteger)
    reemitted_by: str | None = None  # the operation whose resolution re-emitted it


class OutboxRow(SQLModel, table=True):
    """A record an HTTP operation wrote in its transaction, published after the commit (and
    by the outbox loop if that publish failed): link events, AuditEvents, identity events
    and re-evaluated events."""

    __tablename__ = "pix_outbox"

    id: int | None = Field(default=None, primary_key=True)
    topic: str
    key: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    headers: str = Field(sa_column=Column(Text, nullable=False))  # JSON object
    created_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)


TABLES: tuple[Any, ...] = (
    PersonRow,
    SourceRecordRow,
    TrustedIdRow,
    IdentifierRow,
    LinkRow,
    ReviewTaskRow,
    ParkedRow,
    NoLinkRow,
    MergeRow,
    EventLogRow,
    OutboxRow,
)
