"""The exchange's three Kafka stages — thin adapters from records to the domain and back.

- ingress:  hdx.inbound and each publisher's hdx.inbound.<name> → hdx.validated (or
            hdx.deadletter with an OperationOutcome; a message on a publisher's own topic
            that claims another source also leaves a security-alert AuditEvent)
- router:   hdx.identified → hdx.routed (the subscriptions whose criteria match)
- delivery: hdx.decided → hdx.feed.<subscriber> (notification Bundles, numbered per subscription)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import orjson

from hdx_exchange.domain.ingress import Publisher, accept_message, bind_to_topic
from hdx_exchange.domain.notification import build_notification
from hdx_exchange.domain.routing import ChannelType, Subscription, match_subscriptions
from hdx_exchange.store import ExchangeStore, Numbering
from hdx_shared.envelope import ChangeType, Envelope, Header
from hdx_shared.fhir import FhirError, Issue, Limits
from hdx_shared.messaging import Inbound, Outgoing, Unavailable, dead_letter_for, handling
from hdx_shared.security_audit import security_alert, security_alert_record
from hdx_shared.topics import Topics

log = logging.getLogger(__name__)
MISSING_EVENT_ID = FhirError(
    "missing-event-id",
    [Issue("the ce_id header (the publisher's event id) is required", code="required")],
)
# Above this size a message is validated on a worker thread, so heartbeats never stall.
OFFLOAD_BYTES = 256 * 1024
# An unknown sender re-reads the registry at most this often (a flood of unknown sources
# costs the database one refresh a second, not one per batch).
CATCH_UP_SECONDS = 1.0


class RefusedOnTopic(Exception):
    """A message its topic does not allow: dead-lettered, and a security alert recorded."""

    def __init__(self, error: FhirError, alert: Outgoing) -> None:
        super().__init__(error.reason)
        self.error, self.alert = error, alert


@dataclass
class Registry:
    """Publishers and subscriptions in memory; the database is the durable copy."""

    store: ExchangeStore
    publishers: dict[str, Publisher] = field(default_factory=dict)
    by_topic_name: dict[str, Publisher] = field(default_factory=dict)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    loaded: bool = False
    error: str | None = None
    refreshed_at: float = -math.inf  # time.monotonic() of the last good refresh
    version: int | None = None  # the database's registry version this copy was read at
    version_unread: bool = False  # the last sync could not read it

    def refresh(self) -> None:
        try:
            # The version first: a change made while the rows are read raises it again, and
            # the next sync reads once more.
            version = self.store.registry_version()
            self.publishers = self.store.publishers()
            self.by_topic_name = {p.topic_name: p for p in self.publishers.values()}
            self.subscriptions = {s.id: s for s in self.store.subscriptions()}
            self.loaded, self.error = True, None
            self.refreshed_at = time.monotonic()
            self.version = version
        except Exception as exc:  # keep the last good copy; readiness says why
            self.error = f"registry not refreshed: {type(exc).__name__}"
            log.warning("registry refresh failed: %s", exc)

    async def catch_up(self) -> None:
        """Re-read the registry now, unless it was read within CATCH_UP_SECONDS: a sender
        it does not know may be a publisher registered on another replica moments ago,
        whose records must not be dead-lettered for this replica's lag."""
        if time.monotonic() - self.refreshed_at >= CATCH_UP_SECONDS:
            await asyncio.to_thread(self.refresh)

    async def sync(self) -> None:
        """Re-read the registry if any process changed it since this copy was read (one
        read of the version row): a subscription created through another exchange process
        is routed from the next batch on, not from that process's next refresh. If the
        database cannot say, the copy in hand stays; the periodic refresh and readiness
        deal with a database that is away."""
        try:
            version = await asyncio.to_thread(self.store.registry_version)
        except Exception as exc:
            if not self.version_unread:  # once per outage, not once per batch
                log.warning("registry version not read: %s: %s", type(exc).__name__, exc)
            self.version_unread = True
            return
        self.version_unread = False
        if version != self.version:
            await asyncio.to_thread(self.refresh)

    def require_loaded(self) -> None:
        if not self.loaded:
            raise Unavailable(self.error or "registry not loaded")


@dataclass
class ExchangePipeline:
    registry: Registry
    store: ExchangeStore
    topics: Topics
    limits: Limits
    base_url: str
    on_queued: Callable[[], None] | None = None

    async def ingress(self, batch: Sequence[Inbound]) -> list[Outgoing]:
        self.registry.require_loaded()
        if any(self._unknown_sender(m) for m in batch):
            await self.registry.catch_up()
        out: list[Outgoing] = []
        owners: list[tuple[str, str, str, str]] = []
        for m in batch:
            try:
                envelope = self._bound(m)
                if len(m.value) > OFFLOAD_BYTES:
                    accepted = await asyncio.to_thread(
                        accept_message,
                        m.value,
                        envelope,
                        self.registry.publishers,
                        self.limits,
                        m.origin,
                    )
                else:
                    accepted = accept_message(
                        m.value, envelope, self.registry.publishers, self.limits, m.origin
                    )
            except RefusedOnTopic as refused:
                with handling(m):
                    log.warning("refused %s: %s", m.origin, refused.error.reason)
                out += [dead_letter_for(self.topics, m, refused.error), refused.alert]
                continue
            except FhirError as exc:
                with handling(m):  # the line carries this message's trace_id/span_id
                    log.info(
                        "dead-lettered %s from %s: %s",
                        m.origin,
                        m.envelope.source or "?",
                        exc.reason,
                    )
                out.append(dead_letter_for(self.topics, m, exc))
                continue
            if not m.envelope.event_id:
                # Valid, but without the publisher's id a re-sent message would be a new
                # event, and a subscriber would get it twice under two numbers.
                out.append(dead_letter_for(self.topics, m, MISSING_EVENT_ID))
                continue
            owners.extend(a.owner for a in accepted if a.owner)
            out.extend(
                Outgoing(self.topics.validated, a.value, a.key, a.envelope.to_headers())
                for a in accepted
            )
        # One write per batch: which patient each resource is about, for later DELETEs.
        await asyncio.to_thread(self.store.remember_owners, owners)
        return out

    def _unknown_sender(self, m: Inbound) -> bool:
        if m.topic == self.topics.inbound:
            return m.envelope.source not in self.registry.publishers
        topic_name = self.topics.publisher_topic_name(m.topic)
        return topic_name is not None and topic_name not in self.registry.by_topic_name

    def _bound(self, m: Inbound) -> Envelope:
        """The envelope with the source its topic binds it to (see domain.bind_to_topic)."""
        if m.topic == self.topics.inbound:
            return m.envelope  # the shared topic: only HDX's REST ingress writes it when secured
        topic_name = self.topics.publisher_topic_name(m.topic)
        owner = self.registry.by_topic_name.get(topic_name) if topic_name else None
        try:
            return bind_to_topic(m.envelope, owner, m.topic)
        except FhirError as exc:
            alert = security_alert(
                what="publish-as-other-source" if owner else "publish-on-unregistered-topic",
                description=exc.issues[0].diagnostics,
                observer="exchange",
                claimed_source=m.envelope.source or None,
                bound_source=owner.source if owner else None,
                kafka_topic=m.topic,
            )
            raise RefusedOnTopic(exc, security_alert_record(self.topics, alert)) from exc

    async def route(self, batch: Sequence[Inbound]) -> list[Outgoing]:
        self.registry.require_loaded()
        await self.registry.sync()
        subscriptions = list(self.registry.subscriptions.values())
        out: list[Outgoing] = []
        for m in batch:
            env = m.envelope
            parsed = cache(lambda v=m.value: orjson.loads(v))  # parsed only if a filter asks
            matched = match_subscriptions(
                subscriptions, env.resource_type or "", env.person, parsed
            )
            if not matched:
                continue
            candidates = orjson.dumps([s.candidate() for s in matched]).decode()
            headers = env.with_extra(**{Header.CANDIDATES: candidates}).to_headers()
            out.append(Outgoing(self.topics.routed, m.value, env.key_by_person(), headers))
        return out

    async def deliver(self, batch: Sequence[Inbound]) -> list[Outgoing]:
        self.registry.require_loaded()
        permitted = [(m, _permitted(m)) for m in batch]
        if any(
            cand.get("subscription") not in self.registry.subscriptions
            for _, cands in permitted
            for cand in cands
        ):
            await self.registry.sync()  # routed by another process that read it already
        wanted: list[Numbering] = []
        work: list[tuple[Inbound, Subscription, str | None]] = []
        for m, cands in permitted:
            env = m.envelope
            resource_id: str | None = None
            for cand in cands:
                sub = self.registry.subscriptions.get(cand.get("subscription", ""))
                if sub is None:
                    # Created on another replica moments ago: wait for the registry.
                    raise Unavailable(f"subscription {cand.get('subscription')} not loaded yet")
                if not sub.active:
                    continue
                resource_id = resource_id or _resource_id(m.value)
                focus = f"{env.resource_type}/{resource_id}" if resource_id else None
                wanted.append(Numbering(sub.id, env.event_id, env.resource_type or "", focus))
                work.append((m, sub, resource_id))
        if not work:
            return []
        numbers = await asyncio.to_thread(self.store.number_events, wanted)
        out: list[Outgoing] = []
        queued: list[tuple[str, str, bytes]] = []
        for m, sub, resource_id in work:
            env = m.envelope
            number = numbers[(sub.id, env.event_id)]
            bundle = build_notification(
                sub,
                event_id=env.event_id,
                event_number=number,
                resource_type=env.resource_type or "",
                resource_id=resource_id,
                resource=m.value,
                source=env.source,
                base_url=self.base_url,
                deleted=env.change is ChangeType.DELETE,
            )
            if sub.channel is ChannelType.KAFKA:
                # A subscriber sees the event's CloudEvents attributes, the enterprise id it
                # keys by, and its notification number — not HDX's internal routing headers.
                headers = (
                    env.evolve(patient_ref=None, person_identifiers=())
                    .without_extra(Header.CANDIDATES, Header.PERMITTED)
                    .with_extra(hdx_subscription=sub.id, hdx_event_number=str(number))
                    .to_headers()
                )
                out.append(
                    Outgoing(self.topics.feed(sub.subscriber), bundle, env.key_by_person(), headers)
                )
            else:
                queued.append((sub.id, env.event_id, bundle))
        if queued:
            # Durable before the offsets are committed; the dispatcher sends them in order.
            await asyncio.to_thread(self.store.queue_notifications, queued)
            self.notify_dispatcher()
        return out

    def notify_dispatcher(self) -> None:
        if self.on_queued is not None:
            self.on_queued()


def _permitted(m: Inbound) -> list[dict[str, Any]]:
    raw = m.envelope.extra.get(Header.PERMITTED)
    if not raw:
        return []
    value = orjson.loads(raw)
    return value if isinstance(value, list) else []


def _resource_id(value: bytes) -> str | None:
    rid = orjson.loads(value).get("id")
    return rid if isinstance(rid, str) else None
