"""The exchange's database adapter: publishers, subscriptions and event numbering."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Table, bindparam, delete, insert, or_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, col, select

from hdx_exchange.domain.audit_chain import GENESIS, Anchor, ChainedRecord, chain_hash
from hdx_exchange.domain.ingress import Publisher, topic_name_for
from hdx_exchange.domain.routing import (
    ChannelType,
    Criteria,
    PayloadContent,
    Subscription,
)
from hdx_exchange.models import (
    AssertionJtiRow,
    AuditHeadRow,
    AuditLogRow,
    ClientRow,
    DeliveryRow,
    PublisherRow,
    RegistryVersionRow,
    ResourceOwnerRow,
    SubscriptionRow,
)
from hdx_shared.db import migrate, write_locked
from hdx_shared.messaging import Unavailable

T = TypeVar("T")
# How often numbering is tried again when another process numbered the same event at once.
NUMBERING_ATTEMPTS = 5


def _table(model: type[Any]) -> Table:
    """A table model's Core table, for the pipeline's bulk statements."""
    table: Table = model.__table__
    return table


# The pipeline's statements, built once: Core on a plain connection (no ORM session, no
# unit of work) and executemany for the rows, so SQLAlchemy compiles each statement once
# and caches it (a multi-row VALUES clause is compiled again for every batch size).
_AUDIT = _table(AuditLogRow)
_HEAD = _table(AuditHeadRow)
_DELIVERY = _table(DeliveryRow)
_SUBSCRIPTION = _table(SubscriptionRow)
_REGISTRY_VERSION = _table(RegistryVersionRow)
_READ_REGISTRY_VERSION = select(_REGISTRY_VERSION.c.version).where(_REGISTRY_VERSION.c.id == 1)
# Raised in the transaction of every change to a publisher or a subscription.
_RAISE_REGISTRY_VERSION = (
    update(_REGISTRY_VERSION)
    .where(_REGISTRY_VERSION.c.id == 1)
    .values(version=_REGISTRY_VERSION.c.version + 1)
)
_OWNER = _table(ResourceOwnerRow)
_HEAD_FOR_UPDATE = select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1).with_for_update()
_AUDIT_KNOWN = select(_AUDIT.c.audit_id).where(
    _AUDIT.c.audit_id.in_(bindparam("ids", expanding=True))
)
_HEAD_SET = (
    update(_HEAD).where(_HEAD.c.id == 1).values(seq=bindparam("b_seq"), hash=bindparam("b_hash"))
)
_NUMBERED = select(
    _DELIVERY.c.subscription_id, _DELIVERY.c.event_id, _DELIVERY.c.event_number
).where(
    _DELIVERY.c.subscription_id.in_(bindparam("subs", expanding=True)),
    _DELIVERY.c.event_id.in_(bindparam("events", expanding=True)),
)
_RESERVE = (
    update(_SUBSCRIPTION)
    .where(_SUBSCRIPTION.c.id == bindparam("b_id"))
    .values(event_count=_SUBSCRIPTION.c.event_count + bindparam("b_count"))
    .returning(_SUBSCRIPTION.c.event_count)
)


def _owner_upsert(dialect: str) -> Any:
    """Insert or update a resource's owner (one row per executemany parameter set)."""
    upsert: Any = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = upsert(_OWNER)
    return stmt.on_conflict_do_update(
        index_elements=["source", "resource_type", "resource_id"],
        set_={"patient_ref": stmt.excluded.patient_ref, "updated_at": stmt.excluded.updated_at},
    )


@dataclass(frozen=True, slots=True)
class Numbering:
    """An event to number for a subscription."""

    subscription_id: str
    event_id: str
    resource_type: str
    focus: str | None = None


def _subscription(row: SubscriptionRow) -> Subscription:
    return Subscription(
        id=row.id,
        subscriber=row.subscriber,
        recipient=row.recipient,
        purpose=row.purpose,
        criteria=Criteria.parse(row.criteria),
        channel=ChannelType(row.channel),
        endpoint=row.endpoint,
        headers=tuple(h for h in row.headers.split("\n") if h),
        payload=PayloadContent(row.payload),
        active=row.status in ("active", "error"),
    )


class TopicTaken(Exception):
    """Another publisher already has this inbound topic name."""

    def __init__(self, topic_name: str, source: str) -> None:
        super().__init__(f"the inbound topic name '{topic_name}' is {source}'s")
        self.topic_name, self.source = topic_name, source


def _head_create(dialect: str) -> Any:
    """Create the chain's head row unless it exists (another process may be creating it)."""
    ins: Any = pg_insert if dialect == "postgresql" else sqlite_insert
    return ins(_HEAD).values(id=1, seq=0, hash=GENESIS).on_conflict_do_nothing()


class ExchangeStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Read-modify-write transactions: on SQLite they take the write lock at BEGIN, as
        # other exchange processes (stages run apart, replicas) write the same file.
        self._writer = write_locked(engine)
        self._owner_stmt = _owner_upsert(engine.dialect.name)
        self._head_create = _head_create(engine.dialect.name)

    def create_schema(self) -> None:
        """Bring the database to the newest schema (Alembic migrations in the package)."""
        migrate(self.engine, Path(__file__).with_name("migrations"))

    # Publishers -----------------------------------------------------------------------
    def publishers(self) -> dict[str, Publisher]:
        with Session(self.engine) as s:
            return {
                r.source: Publisher(
                    r.source, r.name, r.patient_identifier_system, r.active, r.topic_name or ""
                )
                for r in s.exec(select(PublisherRow))
            }

    def put_publisher(self, p: Publisher) -> None:
        """Register or update a publisher; TopicTaken if another source has its topic."""
        with Session(self._writer) as s:
            for other in s.exec(select(PublisherRow).where(PublisherRow.source != p.source)):
                if (other.topic_name or topic_name_for(other.source)) == p.topic_name:
                    raise TopicTaken(p.topic_name, other.source)
            s.merge(
                PublisherRow(
                    source=p.source,
                    name=p.name,
                    patient_identifier_system=p.patient_identifier_system,
                    active=p.active,
                    topic_name=p.topic_name,
                )
            )
            s.execute(_RAISE_REGISTRY_VERSION)
            try:
                s.commit()
            except IntegrityError as exc:  # registered concurrently under the same name
                raise TopicTaken(p.topic_name, "another source") from exc

    # OAuth clients --------------------------------------------------------------------
    def clients(self) -> list[ClientRow]:
        with Session(self.engine) as s:
            return list(s.exec(select(ClientRow).order_by(col(ClientRow.client_id))))

    def client(self, client_id: str) -> ClientRow | None:
        with Session(self.engine) as s:
            return s.get(ClientRow, client_id)

    def put_client(self, row: ClientRow) -> None:
        """Create or replace a registration. Deactivating a client or replacing its keys
        revokes every token it holds (`tokens_not_before`)."""
        with Session(self._writer) as s:
            existing = s.get(ClientRow, row.client_id)
            now = datetime.now(UTC)
            if existing is not None:
                row.created_at = existing.created_at
                row.tokens_not_before = existing.tokens_not_before
                if (existing.active and not row.active) or existing.jwks != row.jwks:
                    row.tokens_not_before = int(now.timestamp() * 1000)
            row.updated_at = now
            s.merge(row)
            s.commit()

    def revoked_tokens(self) -> dict[str, int]:
        """Client id → tokens issued before this (epoch milliseconds) are revoked."""
        with Session(self.engine) as s:
            q = select(ClientRow.client_id, ClientRow.tokens_not_before).where(
                col(ClientRow.tokens_not_before).is_not(None)
            )
            return {client_id: int(t) for client_id, t in s.exec(q) if t is not None}

    def use_assertion_jti(self, client_id: str, jti: str, expires_at: datetime) -> bool:
        """Record a client assertion's jti; False if it was used before (a replay). Expired
        ones are forgotten: an assertion past its exp is refused anyway."""
        with Session(self.engine) as s:
            s.execute(
                delete(AssertionJtiRow).where(col(AssertionJtiRow.expires_at) < datetime.now(UTC))
            )
            s.add(AssertionJtiRow(client_id=client_id, jti=jti, expires_at=expires_at))
            try:
                s.commit()
            except IntegrityError:
                return False
            return True

    # Subscriptions --------------------------------------------------------------------
    def subscriptions(self) -> list[Subscription]:
        with Session(self.engine) as s:
            return [_subscription(r) for r in s.exec(select(SubscriptionRow))]

    def subscription_rows(self, subscriber: str | None = None) -> list[SubscriptionRow]:
        with Session(self.engine) as s:
            q = select(SubscriptionRow)
            if subscriber:
                q = q.where(SubscriptionRow.subscriber == subscriber)
            return list(s.exec(q))

    def subscription_row(self, sid: str) -> SubscriptionRow | None:
        with Session(self.engine) as s:
            return s.get(SubscriptionRow, sid)

    def save_subscription(self, row: SubscriptionRow) -> None:
        with Session(self._writer) as s:
            s.merge(row)
            s.execute(_RAISE_REGISTRY_VERSION)
            s.commit()

    def registry_version(self) -> int:
        """The number that every change to publishers or subscriptions raises."""
        with self.engine.connect() as conn:
            found = conn.execute(_READ_REGISTRY_VERSION).scalar()
        return int(found or 0)

    # Audit log ------------------------------------------------------------------------
    def append_audit(self, events: Sequence[tuple[str, str | None, bytes]]) -> Anchor:
        """Append (audit id, patient, AuditEvent bytes) to the hash chain; ids already in the
        log are skipped. Returns the head after the append."""
        return self._guarded(self._append_audit, events)

    def _append_audit(self, events: Sequence[tuple[str, str | None, bytes]]) -> Anchor:
        # One transaction holding the head until the commit (SQLite: the write lock taken at
        # BEGIN; PostgreSQL: the head row locked), so two processes never extend the chain
        # from the same head.
        with self._writer.begin() as conn:
            found = conn.execute(_HEAD_FOR_UPDATE).first()
            if found is None:
                # The first append: another process may be making the head row right now.
                # Whoever inserts second does nothing and then waits for the row's lock.
                conn.execute(self._head_create)
                found = conn.execute(_HEAD_FOR_UPDATE).one()
            seq, digest = int(found[0]), str(found[1])
            ids = sorted({e[0] for e in events})
            known = set(conn.execute(_AUDIT_KNOWN, {"ids": ids}).scalars())
            rows: list[dict[str, Any]] = []
            now = datetime.now(UTC)
            for audit_id, patient, body in events:
                if audit_id in known:
                    continue
                known.add(audit_id)
                prev, seq = digest, seq + 1
                digest = chain_hash(prev, seq, body)
                rows.append(
                    {
                        "seq": seq,
                        "audit_id": audit_id,
                        "patient": patient,
                        "recorded_at": now,
                        "body": body,
                        "prev_hash": prev,
                        "hash": digest,
                    }
                )
            if rows:
                conn.execute(insert(_AUDIT), rows)  # executemany, one statement
                conn.execute(_HEAD_SET, {"b_seq": seq, "b_hash": digest})
            return Anchor(seq, digest)

    def audit_chain(self, chunk: int = 5000) -> Iterator[ChainedRecord]:
        """The whole log in sequence order, read in chunks."""
        after = 0
        while True:
            with Session(self.engine) as s:
                rows = list(
                    s.exec(
                        select(AuditLogRow)
                        .where(AuditLogRow.seq > after)
                        .order_by(col(AuditLogRow.seq))
                        .limit(chunk)
                    )
                )
            if not rows:
                return
            for r in rows:
                yield ChainedRecord(r.seq, r.audit_id, r.body, r.prev_hash, r.hash)
            after = rows[-1].seq

    def audit_for_patient(self, person: str, limit: int = 100) -> list[bytes]:
        with Session(self.engine) as s:
            return [
                r.body
                for r in s.exec(
                    select(AuditLogRow)
                    .where(AuditLogRow.patient == person)
                    .order_by(col(AuditLogRow.seq).desc())
                    .limit(limit)
                )
            ]

    # Resource owners ------------------------------------------------------------------
    def remember_owners(self, owners: Sequence[tuple[str, str, str, str]]) -> None:
        """(source, resource type, resource id, local patient id) of accepted resources."""
        self._guarded(self._remember_owners, owners)

    def _remember_owners(self, owners: Sequence[tuple[str, str, str, str]]) -> None:
        if not owners:
            return
        latest = {(src, t, i): p for src, t, i, p in owners}
        now = datetime.now(UTC)
        rows = [
            {
                "source": k[0],
                "resource_type": k[1],
                "resource_id": k[2],
                "patient_ref": p,
                "updated_at": now,
            }
            for k, p in latest.items()
        ]
        with self.engine.begin() as conn:
            # One upsert statement, compiled once, executed for every row (executemany).
            conn.execute(self._owner_stmt, rows)

    def owner_of(self, source: str, resource_type: str, resource_id: str) -> str | None:
        with Session(self.engine) as s:
            row = s.get(ResourceOwnerRow, (source, resource_type, resource_id))
            return row.patient_ref if row else None

    # Deliveries -----------------------------------------------------------------------
    def number_events(self, wanted: Sequence[Numbering]) -> dict[tuple[str, str], int]:
        """Event numbers for (subscription, event), in the order given.

        An event numbered before keeps its number; new ones take the subscription's next
        numbers. One transaction: numbers are never handed out twice or skipped.
        """
        attempt = 1
        while True:
            try:
                return self._guarded(self._number_events, wanted)
            except IntegrityError:
                # PostgreSQL: another process numbered one of these events since we looked
                # (a batch redelivered to another member). Ours rolled back, its block of
                # numbers with it; the next attempt finds the event's number.
                if attempt >= NUMBERING_ATTEMPTS:
                    raise
                attempt += 1

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except OperationalError as exc:
            raise Unavailable(f"exchange database: {exc.orig!s}"[:200]) from exc

    def _number_events(self, wanted: Sequence[Numbering]) -> dict[tuple[str, str], int]:
        numbers: dict[tuple[str, str], int] = {}
        if not wanted:
            return numbers
        with self._writer.begin() as conn:
            subs = sorted({w.subscription_id for w in wanted})
            events = sorted({w.event_id for w in wanted})
            for sub, event, number in conn.execute(_NUMBERED, {"subs": subs, "events": events}):
                numbers[(sub, event)] = number
            fresh: dict[str, dict[str, Numbering]] = {}
            for w in wanted:
                if (w.subscription_id, w.event_id) not in numbers:
                    fresh.setdefault(w.subscription_id, {}).setdefault(w.event_id, w)
            rows: list[dict[str, Any]] = []
            # Subscriptions in one order in every process: their rows are locked as they
            # are reserved, and two processes locking them in other orders could deadlock.
            for sub, items in sorted(fresh.items()):
                # One atomic increment per subscription reserves a block of numbers, so two
                # replicas numbering for the same subscription never collide.
                last = conn.execute(_RESERVE, {"b_id": sub, "b_count": len(items)}).scalar_one()
                first = last - len(items) + 1
                now = datetime.now(UTC)
                for n, w in enumerate(items.values(), start=first):
                    numbers[(sub, w.event_id)] = n
                    rows.append(
                        {
                            "subscription_id": sub,
                            "event_id": w.event_id,
                            "event_number": n,
                            "resource_type": w.resource_type,
                            "focus": w.focus,
                            "created_at": now,
                            "state": "numbered",
                            "attempts": 0,
                        }
                    )
            if rows:
                conn.execute(insert(_DELIVERY), rows)  # executemany, one statement
        return numbers

    def queue_notifications(self, payloads: Sequence[tuple[str, str, bytes]]) -> None:
        """Keep rest-hook notifications (subscription, event, Bundle) until they are sent.

        A notification already sent or given up on stays as it is: a redelivered event
        does not send it again.
        """
        self._guarded(self._queue_notifications, payloads)

    def _queue_notifications(self, payloads: Sequence[tuple[str, str, bytes]]) -> None:
        if not payloads:
            return
        with Session(self.engine) as s:
            for sub, event, payload in payloads:
                s.execute(
                    update(DeliveryRow)
                    .where(
                        col(DeliveryRow.subscription_id) == sub,
                        col(DeliveryRow.event_id) == event,
                        col(DeliveryRow.state) == "numbered",
                    )
                    .values(state="pending", payload=payload)
                )
            s.commit()

    def deliveries(
        self, subscription_id: str, since: int = 0, until: int | None = None, limit: int = 1000
    ) -> list[DeliveryRow]:
        with Session(self.engine) as s:
            q = select(DeliveryRow).where(
                DeliveryRow.subscription_id == subscription_id,
                DeliveryRow.event_number > since,
            )
            if until is not None:
                q = q.where(DeliveryRow.event_number <= until)
            return list(s.exec(q.order_by(col(DeliveryRow.event_number)).limit(limit)))

    # rest-hook dispatch -----------------------------------------------------------------
    def subscriptions_with_pending(self) -> list[str]:
        with Session(self.engine) as s:
            rows = s.exec(
                select(DeliveryRow.subscription_id).where(DeliveryRow.state == "pending").distinct()
            )
            return list(rows)

    def claim_dispatch(self, sid: str, owner: str, lease_seconds: float) -> bool:
        """Take (or renew) the right to send this subscription's notifications."""
        now = datetime.now(UTC)
        with Session(self.engine) as s:
            result = s.execute(
                update(SubscriptionRow)
                .where(
                    col(SubscriptionRow.id) == sid,
                    or_(
                        col(SubscriptionRow.dispatch_owner).is_(None),
                        col(SubscriptionRow.dispatch_owner) == owner,
                        col(SubscriptionRow.dispatch_lease_until) < now,
                    ),
                )
                .values(
                    dispatch_owner=owner,
                    dispatch_lease_until=now + timedelta(seconds=lease_seconds),
                )
            )
            s.commit()
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def release_dispatch(self, sid: str, owner: str) -> None:
        with Session(self.engine) as s:
            s.execute(
                update(SubscriptionRow)
                .where(col(SubscriptionRow.id) == sid, col(SubscriptionRow.dispatch_owner) == owner)
                .values(dispatch_owner=None, dispatch_lease_until=None)
            )
            s.commit()

    def next_pending(self, sid: str) -> DeliveryRow | None:
        """The oldest notification not yet sent: rest-hooks are delivered in order."""
        with Session(self.engine) as s:
            return s.exec(
                select(DeliveryRow)
                .where(DeliveryRow.subscription_id == sid, DeliveryRow.state == "pending")
                .order_by(col(DeliveryRow.event_number))
                .limit(1)
            ).first()

    def record_attempt(
        self, delivery_id: int, *, state: str, error: str | None, next_at: datetime | None
    ) -> None:
        with Session(self._writer) as s:
            row = s.get(DeliveryRow, delivery_id)
            if row is None:
                return
            row.attempts += 1
            row.state = state
            row.last_error = error
            row.next_attempt_at = next_at
            if state in ("delivered", "failed"):
                row.payload = None if state == "delivered" else row.payload
            s.add(row)
            s.commit()

    def set_subscription_status(self, sid: str, status: str, error: str | None) -> None:
        with Session(self.engine) as s:
            s.execute(
                update(SubscriptionRow)
                .where(col(SubscriptionRow.id) == sid)
                .values(status=status, error=error)
            )
            s.execute(_RAISE_REGISTRY_VERSION)  # an errored subscription is routed no more
            s.commit()
