"""The exchange's HTTP API: the publisher registry, FHIR Subscriptions and the audit trail.

Scopes (docs/security.md): the registry and audit verification need system/hdx-admin;
Subscriptions system/Subscription.c / .r / .s; a patient's audit trail system/AuditEvent.s.
A client bound to a subscriber organization creates, reads and searches only its own
Subscriptions ($status and $events too): another's is 403. A client with the admin scope and
no binding acts for any organization.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from hdx_exchange.audit_log import AuditLog
from hdx_exchange.domain.ingress import PATIENT_ELEMENT, Publisher
from hdx_exchange.domain.subscriptions import subscription_from_fhir
from hdx_exchange.models import SubscriptionRow
from hdx_exchange.pipeline import Registry
from hdx_exchange.settings import ExchangeSettings
from hdx_exchange.store import ExchangeStore, TopicTaken
from hdx_shared.auth import ADMIN_SCOPE, Caller, forbidden, require_scope
from hdx_shared.fhir import FHIR_JSON, FHIR_VERSION, FhirError, Issue, decode_resource
from hdx_shared.http import FhirResponse
from hdx_shared.messaging import ensure_topics
from hdx_shared.topics import PUBLISHER_TOPIC_NAME, Topics, TopicSpec


class PublisherIn(BaseModel):
    source: str = Field(min_length=3, description="the ce_source the publisher sends")
    name: str = Field(min_length=1)
    patient_identifier_system: str = Field(min_length=3)
    active: bool = True
    topic_name: str | None = Field(
        default=None,
        pattern=f"^{PUBLISHER_TOPIC_NAME}$",
        description="its own inbound topic is <prefix>inbound.<topic_name>; by default the "
        "source's letters and digits",
    )


class PublisherOut(PublisherIn):
    inbound_topic: str = Field(
        description="the Kafka topic this publisher writes; what arrives there is taken as "
        "its own (grant it Write on this topic only)"
    )

    @classmethod
    def of(cls, p: Publisher, topics: Topics) -> PublisherOut:
        return cls(
            source=p.source,
            name=p.name,
            patient_identifier_system=p.patient_identifier_system,
            active=p.active,
            topic_name=p.topic_name,
            inbound_topic=topics.publisher_inbound(p.topic_name),
        )


def publisher_topic(topics: Topics, settings: ExchangeSettings, topic_name: str) -> TopicSpec:
    """The inbound topic the exchange creates for a registered publisher."""
    return TopicSpec(
        topics.publisher_inbound(topic_name),
        partitions=settings.publisher_topic_partitions,
        config=topics.inbound_config,
    )


def _searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }


def _subscription_resource(row: SubscriptionRow) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(row.resource)
    doc["id"] = row.id
    doc["status"] = row.status
    if row.error:
        doc["error"] = row.error
    return doc


# Module level: FastAPI resolves the annotations (postponed) in the module's namespace.
EventNumber = Annotated[int, Query(ge=0, le=2**31 - 1)]  # as the database holds them
Readers = Annotated[Caller, Depends(require_scope("system/Subscription.r"))]


def _for_subscriber(caller: Caller, subscriber: str) -> None:
    """403 unless the caller acts for this subscriber organization."""
    if caller.subscriber == subscriber or (caller.subscriber is None and caller.is_admin):
        return
    raise forbidden(
        f"client {caller.client_id} may not act for subscriber {subscriber}"
        + (f" (it is bound to {caller.subscriber})" if caller.subscriber else "")
    )


def build_routers(
    store: ExchangeStore,
    registry: Registry,
    topics: Topics,
    settings: ExchangeSettings,
    audit_log: AuditLog,
) -> list[APIRouter]:
    admin = APIRouter(
        prefix="/admin", tags=["publishers"], dependencies=[Depends(require_scope(ADMIN_SCOPE))]
    )

    @admin.get("/publishers")
    async def list_publishers() -> list[PublisherOut]:
        return [PublisherOut.of(p, topics) for p in store.publishers().values()]

    @admin.post("/publishers", status_code=201)
    async def put_publisher(body: PublisherIn) -> PublisherOut:
        """Register (or update) a source allowed to publish, and create its inbound topic."""
        publisher = Publisher(
            body.source,
            body.name,
            body.patient_identifier_system,
            body.active,
            body.topic_name or "",
        )
        try:
            store.put_publisher(publisher)
        except TopicTaken as exc:
            raise FhirError(
                "topic-taken", [Issue(str(exc), code="duplicate")], http_status=409
            ) from exc
        registry.refresh()
        await ensure_topics(settings, [publisher_topic(topics, settings, publisher.topic_name)])
        return PublisherOut.of(publisher, topics)

    @admin.get("/audit/verify")
    async def verify_audit_log() -> dict[str, Any]:
        """Recompute the audit log's hash chain and compare its end with the newest anchor."""
        count, anchor, problems = await audit_log.verify()
        return {
            "intact": not problems,
            "records": count,
            "anchor": {"seq": anchor.seq, "hash": anchor.hash} if anchor else None,
            "problems": [{"seq": p.seq, "audit_id": p.audit_id, "what": p.what} for p in problems],
        }

    fhir = APIRouter(prefix="/fhir", tags=["Subscription"])

    @fhir.get("/AuditEvent", tags=["AuditEvent"])
    async def search_audit_events(
        patient: str,
        _caller: Annotated[Caller, Depends(require_scope("system/AuditEvent.s"))],
        _count: int = 100,
    ) -> Response:
        """A patient's audit trail, newest first (patient: Patient/<enterprise id>)."""
        person = patient.removeprefix("Patient/")
        bodies = store.audit_for_patient(person, limit=min(max(_count, 1), 1000))
        bundle = b'{"resourceType":"Bundle","type":"searchset","total":%d,"entry":[' % len(bodies)
        bundle += b",".join(
            b'{"resource":' + body + b',"search":{"mode":"match"}}' for body in bodies
        )
        return FhirResponse(bundle + b"]}")

    @fhir.post("/Subscription", status_code=201)
    async def create_subscription(
        request: Request,
        caller: Annotated[Caller, Depends(require_scope("system/Subscription.c"))],
    ) -> Response:
        raw = await request.body()
        doc = decode_resource(raw)
        sid = str(uuid.uuid4())
        sub = subscription_from_fhir(doc, sid)
        _for_subscriber(caller, sub.subscriber)
        await ensure_topics(settings, [TopicSpec(topics.feed(sub.subscriber))])
        doc["id"] = sid
        doc["status"] = "active"
        store.save_subscription(
            SubscriptionRow(
                id=sid,
                subscriber=sub.subscriber,
                recipient=sub.recipient,
                purpose=sub.purpose,
                criteria=doc["criteria"],
                channel=sub.channel.value,
                endpoint=sub.endpoint,
                headers="\n".join(sub.headers),
                payload=sub.payload.value,
                status="active",
                resource=orjson.dumps(doc),
            )
        )
        registry.refresh()
        return FhirResponse(
            doc,
            status_code=201,
            headers={"Location": f"{settings.public_base_url}/Subscription/{sid}"},
        )

    @fhir.get("/Subscription/{sid}")
    async def read_subscription(sid: str, caller: Readers) -> Response:
        row = store.subscription_row(sid)
        if row is None:
            raise HTTPException(404, f"Subscription/{sid} is not known")
        _for_subscriber(caller, row.subscriber)
        return FhirResponse(_subscription_resource(row))

    @fhir.get("/Subscription")
    async def search_subscriptions(
        caller: Annotated[Caller, Depends(require_scope("system/Subscription.s"))],
        subscriber: str | None = None,
    ) -> Response:
        """Subscriptions (subscriber: an organization id); a bound client sees its own."""
        if caller.subscriber is not None:
            _for_subscriber(caller, subscriber or caller.subscriber)
            subscriber = caller.subscriber
        elif not caller.is_admin:
            raise forbidden(f"client {caller.client_id} is not bound to a subscriber")
        rows = store.subscription_rows(subscriber)
        return FhirResponse(_searchset([_subscription_resource(r) for r in rows]))

    @fhir.get("/Subscription/{sid}/$status")
    async def subscription_status(sid: str, caller: Readers) -> Response:
        row = store.subscription_row(sid)
        if row is None:
            raise HTTPException(404, f"Subscription/{sid} is not known")
        _for_subscriber(caller, row.subscriber)
        status = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "subscription", "valueReference": {"reference": f"Subscription/{sid}"}},
                {"name": "status", "valueCode": row.status},
                {"name": "type", "valueCode": "query-status"},
                {"name": "events-since-subscription-start", "valueString": str(row.event_count)},
                {"name": "feed", "valueString": topics.feed(row.subscriber)},
            ],
        }
        return FhirResponse(
            {"resourceType": "Bundle", "type": "history", "entry": [{"resource": status}]}
        )

    @fhir.get("/Subscription/{sid}/$events")
    async def subscription_events(
        sid: str,
        caller: Readers,
        eventsSinceNumber: EventNumber = 0,
        eventsUntilNumber: EventNumber | None = None,
    ) -> Response:
        """What was sent (or is waiting), by event number: a subscriber that saw a gap
        asks for the range it missed."""
        row = store.subscription_row(sid)
        if row is None:
            raise HTTPException(404, f"Subscription/{sid} is not known")
        _for_subscriber(caller, row.subscriber)
        since = max(eventsSinceNumber - 1, 0)
        events = store.deliveries(sid, since=since, until=eventsUntilNumber)
        parts = [
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": str(d.event_number)},
                    {"name": "timestamp", "valueInstant": d.created_at.isoformat()},
                    *(
                        [{"name": "focus", "valueReference": {"reference": d.focus}}]
                        if d.focus
                        else []
                    ),
                ],
            }
            for d in events
        ]
        status = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "subscription", "valueReference": {"reference": f"Subscription/{sid}"}},
                {"name": "status", "valueCode": row.status},
                {"name": "type", "valueCode": "query-event"},
                {"name": "events-since-subscription-start", "valueString": str(row.event_count)},
                *parts,
            ],
        }
        return FhirResponse(
            {"resourceType": "Bundle", "type": "history", "entry": [{"resource": status}]}
        )

    @fhir.get("/metadata")
    async def capability_statement() -> Response:
        """What this server really does: publishing (no reads of clinical data) and
        Subscriptions."""
        published = [
            {
                "type": t,
                "interaction": [{"code": "create"}, {"code": "update"}, {"code": "delete"}],
                "documentation": "published to subscribers; HDX keeps no copy to read back",
            }
            for t in ["Patient", *sorted(PATIENT_ELEMENT)]
        ]
        subscription = {
            "type": "Subscription",
            "interaction": [{"code": "create"}, {"code": "read"}, {"code": "search-type"}],
            "searchParam": [{"name": "subscriber", "type": "token"}],
            "operation": [
                {
                    "name": "status",
                    "definition": "http://hl7.org/fhir/uv/subscriptions-backport/"
                    "OperationDefinition/backport-subscription-status",
                },
                {
                    "name": "events",
                    "definition": "http://hl7.org/fhir/uv/subscriptions-backport/"
                    "OperationDefinition/backport-subscription-events",
                },
            ],
        }
        return Response(
            orjson.dumps(
                {
                    "resourceType": "CapabilityStatement",
                    "status": "active",
                    "kind": "instance",
                    "date": "2026-11-25",
                    "fhirVersion": FHIR_VERSION,
                    "format": ["json"],
                    "software": {"name": "HDX exchange", "version": "0.1.0"},
                    "implementation": {"description": "HDX", "url": settings.public_base_url},
                    "rest": [
                        {
                            "mode": "server",
                            "security": {
                                "service": [
                                    {
                                        "coding": [
                                            {
                                                "system": "http://terminology.hl7.org/"
                                                "CodeSystem/restful-security-service",
                                                "code": "SMART-on-FHIR",
                                            }
                                        ]
                                    }
                                ],
                                "description": "OAuth 2.0 client credentials with a "
                                "private_key_jwt client assertion (SMART Backend Services); "
                                "see .well-known/smart-configuration",
                                "extension": [
                                    {
                                        "url": "http://fhir-registry.smarthealthit.org/"
                                        "StructureDefinition/oauth-uris",
                                        "extension": [
                                            {"url": "token", "valueUri": settings.token_url}
                                        ],
                                    }
                                ],
                            },
                            "resource": [*published, subscription],
                            "interaction": [{"code": "transaction"}, {"code": "batch"}],
                        }
                    ],
                }
            ),
            media_type=FHIR_JSON,
        )

    return [admin, fhir]
