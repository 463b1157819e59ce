"""The exchange's tables: publishers, subscriptions, the deliveries it numbered, the audit
log, and the OAuth clients of its authorization server."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel, UniqueConstraint


def _now() -> datetime:
    return datetime.now(UTC)


class PublisherRow(SQLModel, table=True):
    __tablename__ = "publisher"

    source: str = Field(primary_key=True)  # the ce_source a publisher sends
    name: str
    patient_identifier_system: str
    active: bool = True
    updated_at: datetime = Field(default_factory=_now)
    # Its own inbound topic is <prefix>inbound.<topic_name>; unique, so a topic names one
    # publisher. Nullable for rows from before it existed: those use topic_name_for(source).
    topic_name: str | None = Field(default=None, unique=True)


class RegistryVersionRow(SQLModel, table=True):
    """One row whose number every change to a publisher or a subscription raises, in the
    change's own transaction: a process tells with one read whether its in-memory registry
    is current (the router reads it before every batch)."""

    __tablename__ = "registry_version"

    id: int = Field(default=1, primary_key=True)
    version: int = Field(default=0, sa_type=BigInteger)


class SubscriptionRow(SQLModel, table=True):
    __tablename__ = "subscription"

    id: str = Field(primary_key=True)
    subscriber: str = Field(index=True)
    recipient: str
    purpose: str
    criteria: str
    channel: str
    endpoint: str | None = None
    headers: str = ""  # newline-separated "Name: value" lines for rest-hook
    payload: str = "full-resource"
    status: str = "active"  # requested | active | error | off
    error: str | None = None
    event_count: int = 0  # the last event number handed out
    resource: bytes  # the Subscription as the subscriber sent it
    updated_at: datetime = Field(default_factory=_now)
    # Which exchange replica sends this subscription's rest-hook notifications, until when.
    dispatch_owner: str | None = None
    dispatch_lease_until: datetime | None = None


class DeliveryRow(SQLModel, table=True):
    """One event numbered for one subscription. The unique key makes numbering idempotent:
    a redelivered event gets the number it had, so a subscriber sees a retransmission."""

    __tablename__ = "delivery"
    __table_args__ = (UniqueConstraint("subscription_id", "event_id"),)

    id: int | None = Field(default=None, primary_key=True)
    subscription_id: str = Field(index=True)
    event_id: str
    event_number: int
    resource_type: str
    focus: str | None = None  # e.g. Observation/o1, for $events
    created_at: datetime = Field(default_factory=_now)
    # rest-hook only: the notification waiting to be sent, and how sending went.
    state: str = "numbered"  # numbered (Kafka feed) | pending | delivered | failed
    payload: bytes | None = None
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime | None = None


class ResourceOwnerRow(SQLModel, table=True):
    """Which patient a published resource is about, so a later DELETE (which has no body)
    can be routed like the resource was."""

    __tablename__ = "resource_owner"

    source: str = Field(primary_key=True)
    resource_type: str = Field(primary_key=True)
    resource_id: str = Field(primary_key=True)
    patient_ref: str
    updated_at: datetime = Field(default_factory=_now)


class AuditLogRow(SQLModel, table=True):
    """One AuditEvent, as received, in the hash chain (see domain.audit_chain)."""

    __tablename__ = "audit_log"

    seq: int = Field(primary_key=True)
    audit_id: str = Field(unique=True)  # a redelivered AuditEvent is not appended twice
    patient: str | None = Field(default=None, index=True)  # enterprise person id
    recorded_at: datetime = Field(default_factory=_now)
    body: bytes
    prev_hash: str
    hash: str


class AuditHeadRow(SQLModel, table=True):
    """The chain's head: one row, locked while appending so appends never interleave."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = 0
    hash: str = "0" * 64


class ClientRow(SQLModel, table=True):
    """A registered OAuth client (SMART Backend Services): its public keys, the scopes it
    may be granted, and what it is bound to."""

    __tablename__ = "oauth_client"

    client_id: str = Field(primary_key=True)
    name: str
    jwks: bytes  # the client's public keys, a JWKS as JSON
    scope: str  # space-separated: the most it may be granted
    source: str | None = None  # publishes only as this ce_source
    subscriber: str | None = None  # subscribes only for this organization (id)
    active: bool = True
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)
    # Tokens issued before this (epoch milliseconds) are revoked: set when the client is
    # deactivated or its keys are replaced, and kept (a reactivated client's old tokens stay
    # void). Served at GET /auth/revoked to every service that checks tokens.
    tokens_not_before: int | None = Field(default=None, sa_type=BigInteger)


class AssertionJtiRow(SQLModel, table=True):
    """A client assertion's jti, kept until the assertion expires: a replay is refused."""

    __tablename__ = "oauth_assertion_jti"

    client_id: str = Field(primary_key=True)
    jti: str = Field(primary_key=True)
    expires_at: datetime = Field(index=True)


# Every table of the exchange (what its migrations must build).
TABLES: tuple[Any, ...] = (
    PublisherRow,
    RegistryVersionRow,
    SubscriptionRow,
    DeliveryRow,
    ResourceOwnerRow,
    AuditLogRow,
    AuditHeadRow,
    ClientRow,
    AssertionJtiRow,
)
