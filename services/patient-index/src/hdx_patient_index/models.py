"""The patient index's tables (all prefixed ``pix_``): persons and their golden records,
source records, trusted-identifier claims, identifiers, links, review tasks and parked
messages.

Times are milliseconds since the epoch (``*_ms``): comparable the same way on SQLite and
PostgreSQL, with no time-zone conversions in between.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Index, LargeBinary, Text
from sqlmodel import Column, Field, SQLModel, UniqueConstraint

from hdx_shared.envelope import now_ms


class PersonRow(SQLModel, table=True):
    """An enterprise person: the id HDX stamps everywhere, and its golden record."""

    __tablename__ = "pix_person"

    id: str = Field(primary_key=True, max_length=36)  # UUID4
    golden: str = Field(sa_column=Column(Text, nullable=False))  # FHIR Patient JSON
    trusted_ids: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    possible_match: bool = False  # created while a possible match awaits review
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
    updated_ms: int = Field(default_factory=now_ms, index=True, sa_type=BigInteger)


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
    """The history of links: a source record's current link has no ``superseded_ms``."""

    __tablename__ = "pix_link"

    id: int | None = Field(default=None, primary_key=True)
    source: str
    local_id: str = Field(index=True)
    person_id: str = Field(index=True)
    grade: str  # certain | probable | possible
    by: str = "auto"
    weight: float | None = None
    event_id: str = ""
    created_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)
    superseded_ms: int | None = Field(default=None, sa_type=BigInteger)


class ReviewTaskBase(SQLModel):
    status: str = Field(default="open", index=True)  # open | resolved
    reason: str  # possible-match | ambiguous-match | trusted-id-conflict | …
    source: str
    local_id: str
    person_id: str  # the person the record is linked to now
    candidate_person_id: str  # the person it may (also) be
    weight: float | None = None
    probability: float | None = None
    created_ms: int = Field(default_factory=now_ms, sa_type=BigInteger)
    resolved_ms: int | None = Field(default=None, sa_type=BigInteger)


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


TABLES: tuple[Any, ...] = (
    PersonRow,
    SourceRecordRow,
    TrustedIdRow,
    IdentifierRow,
    LinkRow,
    ReviewTaskRow,
    ParkedRow,
)
