"""The consent service's application layer: writes, the index, change events, readiness.

Writes go database → index → consents topic, in that order, before the API answers:
the replica that accepted a write decides with it from the next message on. Other
replicas learn of it from the consents topic (compacted, key = Consent id), which each
replica reads from the beginning with no consumer group, so every replica sees every
change; until a change arrives there, another replica may still decide with the previous
version (typically milliseconds; longer if the broker or that replica lags). A version
that could not be published stays marked in the database and the outbox loop sends it.
The topic is the fast path, the database the durable one: every replica also re-reads
the versions recorded lately (`reconcile`), so a change the topic lost — a broker that
restarted without its data — reaches every replica's index within seconds all the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from hdx_consent.domain import (
    Consent,
    ConsentDecision,
    ConsentIndex,
    ConsentInvalid,
    DecisionRequest,
    Policy,
    decide,
    parse_consent,
)
from hdx_consent.models import ConsentVersion
from hdx_consent.store import ConsentStore
from hdx_shared.envelope import ChangeType, Envelope, derive_event_id
from hdx_shared.messaging import Outgoing, Publish, Unavailable
from hdx_shared.topics import Topics

log = logging.getLogger(__name__)

CONSENT_SOURCE = "urn:hdx:consent"


@dataclass(frozen=True, slots=True)
class Written:
    row: ConsentVersion
    resource: dict[str, Any]
    created: bool


def change_record(topics: Topics, row: ConsentVersion) -> Outgoing:
    """A consent change on the consents topic: key = Consent id, value = the Consent JSON."""
    env = Envelope(
        event_id=derive_event_id("consent", row.consent_id, str(row.version)),
        source=CONSENT_SOURCE,
        change=ChangeType.CREATE if row.version == 1 else ChangeType.UPDATE,
        resource_type="Consent",
    )
    return Outgoing(topics.consents, row.resource, row.consent_id.encode(), env.to_headers())


class ConsentService:
    def __init__(
        self,
        store: ConsentStore,
        policy: Policy,
        topics: Topics,
        publish: Publish | None = None,
        publish_timeout: float = 10.0,
        db_probe_seconds: float = 0.0,
        db_ping_timeout: float = 5.0,
        reconcile_overlap: float = 300.0,
    ) -> None:
        self.store = store
        self.policy = policy
        self.topics = topics
        self.publish = publish
        self.publish_timeout = publish_timeout
        # A batch is decided only if the database answered within this many seconds
        # (0: it is pinged before every batch).
        self.db_probe_seconds = db_probe_seconds
        # A ping that hangs (a database host that drops packets) counts as down.
        self.db_ping_timeout = db_ping_timeout
        self.index = ConsentIndex()
        self.loaded = False
        self.db_error: str | None = None
        self._db_ok_at: float | None = None  # time.monotonic() of the last good ping
        self._load_lock = asyncio.Lock()
        # Reconciling re-reads from this time less the overlap: `recorded` comes from the
        # writing replica's clock and is stamped before its commit, so a version can land
        # with a time a little before one already read.
        self.reconcile_overlap = timedelta(seconds=reconcile_overlap)
        self._reconciled_from: datetime | None = None

    # ---- readiness ---------------------------------------------------------------------
    def readiness(self) -> str | None:
        """Why decisions cannot be taken now, or None."""
        if self.db_error:
            return f"consent database unavailable: {self.db_error}"
        if not self.loaded:
            return "consent index not loaded yet"
        return None

    def require_ready(self) -> None:
        reason = self.readiness()
        if reason:
            raise Unavailable(reason)

    async def ensure_ready(self) -> None:
        """Before the gate decides a batch: the index is loaded and the database answers
        now (or answered within `db_probe_seconds`). Unavailable otherwise — fail closed,
        even between two of the housekeeping loop's checks."""
        fresh = (
            self._db_ok_at is not None and time.monotonic() - self._db_ok_at < self.db_probe_seconds
        )
        if not (fresh and self.loaded and self.db_error is None):
            await self.check_database()
        self.require_ready()

    def _db_failed(self, exc: Unavailable) -> None:
        self.db_error = str(exc)
        self._db_ok_at = None

    async def load(self) -> None:
        """Fill the index from the database (the current version of every consent)."""
        started = datetime.now(UTC)
        try:
            await asyncio.to_thread(self.store.create_schema)
            rows = await asyncio.to_thread(self.store.latest_all)
        except Unavailable as exc:
            self._db_failed(exc)
            raise
        consents: list[Consent] = []
        for row in rows:
            try:
                consents.append(parse_consent(orjson.loads(row.resource)))
            except (ConsentInvalid, orjson.JSONDecodeError) as exc:
                # Only valid consents are stored; a row that no longer parses is a bug.
                log.error("Consent/%s v%d does not parse: %s", row.consent_id, row.version, exc)
        # Merge, never clear: a newer version already taken from the consents topic stays.
        for consent in consents:
            self.index.put(consent)
        self._reconciled_from = started
        self.loaded, self.db_error = True, None
        log.info("consent index loaded: %d consents", len(self.index))

    async def check_database(self) -> None:
        """Ping the database (and load the index if start-up could not)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.store.ping), self.db_ping_timeout)
        except (Unavailable, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                exc = Unavailable(f"consent database: no answer within {self.db_ping_timeout}s")
            if self.db_error is None:
                log.warning("consent database unavailable: %s", exc)
            self._db_failed(exc)
            return
        if not self.loaded:
            async with self._load_lock:  # the gate and the housekeeping loop may both ask
                if not self.loaded:
                    await self.load()
        self.db_error, self._db_ok_at = None, time.monotonic()

    # ---- decisions ---------------------------------------------------------------------
    def consents_for(self, person: str | None, identifiers: Sequence[str]) -> list[Consent]:
        return self.index.for_person(person, identifiers)

    def evaluate(self, request: DecisionRequest) -> ConsentDecision:
        self.require_ready()
        return decide(self.consents_for(request.person, request.identifiers), self.policy, request)

    # ---- writes ------------------------------------------------------------------------
    async def write(
        self, doc: dict[str, Any], *, consent_id: str | None = None, if_match: int | None = None
    ) -> Written:
        """Validate, store a new version, index it, publish it. ConsentInvalid if HDX cannot
        evaluate it; VersionConflict on an If-Match mismatch; Unavailable if the DB is down."""
        consent = parse_consent(doc)
        create_only = consent_id is None
        cid = consent_id or str(uuid.uuid4())
        try:
            row = await asyncio.to_thread(
                self.store.append,
                cid,
                doc,
                patient_key=consent.patient_key,
                status=consent.status,
                patient_identifier=consent.patient_identifier,
                if_match=if_match,
                create_only=create_only,
            )
        except Unavailable as exc:
            self._db_failed(exc)
            raise
        stored: dict[str, Any] = orjson.loads(row.resource)
        self.index.put(parse_consent(stored))  # before answering: effective from now on
        await self._publish([row])
        return Written(row, stored, row.version == 1)

    async def _publish(self, rows: Sequence[ConsentVersion]) -> bool:
        if self.publish is None or not rows:
            return False
        try:
            await asyncio.wait_for(
                self.publish([change_record(self.topics, r) for r in rows]), self.publish_timeout
            )
        except Exception as exc:  # the outbox loop will try again
            log.warning(
                "consent changes not published yet (%d): %s: %s", len(rows), type(exc).__name__, exc
            )
            return False
        try:
            await asyncio.to_thread(
                self.store.mark_published, [(r.consent_id, r.version) for r in rows]
            )
        except Unavailable as exc:
            self._db_failed(exc)
            return False
        return True

    async def publish_pending(self) -> int:
        """Send versions the database has not seen published (the outbox); how many sent."""
        try:
            rows = await asyncio.to_thread(self.store.unpublished)
        except Unavailable as exc:
            self._db_failed(exc)
            return 0
        return len(rows) if await self._publish(rows) else 0

    # ---- changes from other replicas ---------------------------------------------------
    async def reconcile(self) -> int:
        """Index the versions recorded lately that are newer than the index's — whatever
        the consents topic delivered. How many were newer (normally 0: the topic was
        first); Unavailable if the database is down."""
        if self._reconciled_from is None:
            return 0  # not loaded yet: load() reads everything
        started = datetime.now(UTC)
        try:
            rows = await asyncio.to_thread(
                self.store.recorded_since, self._reconciled_from - self.reconcile_overlap
            )
        except Unavailable as exc:
            self._db_failed(exc)
            raise
        newer = 0
        for row in rows:
            known = self.index.get(row.consent_id)
            if known is not None and known.version >= row.version:
                continue  # the usual case: the topic brought it first (no parse)
            try:
                newer += self.index.put(parse_consent(orjson.loads(row.resource)))
            except (ConsentInvalid, orjson.JSONDecodeError) as exc:
                log.error("Consent/%s v%d does not parse: %s", row.consent_id, row.version, exc)
        self._reconciled_from = started
        if newer:
            log.info("consent index: %d newer version(s) taken from the database", newer)
        return newer

    def apply_change(self, value: bytes | None) -> bool:
        """A record from the consents topic: index it if it is newer than what is here."""
        if not value:
            return False  # tombstone: HDX never deletes consents, so nothing to do
        try:
            consent = parse_consent(orjson.loads(value))
        except (ConsentInvalid, orjson.JSONDecodeError, ValueError) as exc:
            log.error("ignoring a consent change that does not parse: %s", exc)
            return False
        if not consent.id or consent.version < 1:
            log.error("ignoring a consent change without id or meta.versionId")
            return False
        return self.index.put(consent)
