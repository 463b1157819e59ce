"""The exchange's HTTP API: the publisher registry and FHIR Subscriptions."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field

from hdx_exchange.audit_log import AuditLog
from hdx_exchange.domain.ingress import PATIENT_ELEMENT, Publisher
from hdx_exchange.domain.subscriptions import subscription_from_fhir
from hdx_exchange.models import SubscriptionRow
from hdx_exchange.pipeline import Registry
from hdx_exchange.settings import ExchangeSettings
from hdx_exchange.store import ExchangeStore
from hdx_shared.fhir import FHIR_JSON, FHIR_VERSION, decode_resource
from hdx_shared.http import FhirResponse
from hdx_shared.messaging import ensure_topics
from hdx_shared.topics import Topics, TopicSpec


class PublisherIn(BaseModel):
    source: str = Field(min_length=3, description="the ce_source the publisher sends")
    name: str = Field(min_length=1)
    patient_identifier_system: str = Field(min_length=3)
    active: bool = True


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


def build_routers(
    store: ExchangeStore,
    registry: Registry,
    topics: Topics,
    settings: ExchangeSettings,
    audit_log: AuditLog,
) -> list[APIRouter]:
    admin = APIRouter(prefix="/admin", tags=["publishers"])

    @admin.get("/publishers")
    async def list_publishers() -> list[PublisherIn]:
        return [
            PublisherIn(
                source=p.source,
                name=p.name,
                patient_identifier_system=p.patient_identifier_system,
                active=p.active,
            )
            for p in store.publishers().values()
        ]

    @admin.post("/publishers", status_code=201)
    async def put_publisher(body: PublisherIn) -> PublisherIn:
        """Register (or update) a source allowed to publish."""
        store.put_publisher(
            Publisher(body.source, body.name, body.patient_identifier_system, body.active)
        )
        registry.refresh()
        return body

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
    async def search_audit_events(patient: str, _count: int = 100) -> Response:
        """A patient's audit trail, newest first (patient: Patient/<enterprise id>)."""
        person = patient.removeprefix("Patient/")
        bodies = store.audit_for_patient(person, limit=min(max(_count, 1), 1000))
        bundle = b'{"resourceType":"Bundle","type":"searchset","total":%d,"entry":[' % len(bodies)
        bundle += b",".join(
            b'{"resource":' + body + b',"search":{"mode":"match"}}' for body in bodies
        )
        return FhirResponse(bundle + b"]}")

    @fhir.post("/Subscription", status_code=201)
    async def create_subscription(request: Request) -> Response:
        raw = await request.body()
        doc = decode_resource(raw)
        sid = str(uuid.uuid4())
        sub = subscription_from_fhir(doc, sid)
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
    async def read_subscription(sid: str) -> Response:
        row = store.subscription_row(sid)
        if row is None:
            raise HTTPException(404, f"Subscription/{sid} is not known")
        return FhirResponse(_subscription_resource(row))

    @fhir.get("/Subscription")
    async def search_subscriptions(subscriber: str | None = None) -> Response:
        rows = store.subscription_rows(subscriber)
        return FhirResponse(_searchset([_subscription_resource(r) for r in rows]))

    @fhir.get("/Subscription/{sid}/$status")
    async def subscription_status(sid: str) -> Response:
        row = store.subscription_row(sid)
        if row is None:
            raise HTTPException(404, f"Subscription/{sid} is not known")
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
        sid: str, eventsSinceNumber: int = 0, eventsUntilNumber: int | None = None
    ) -> Response:
        """What was sent (or is waiting), by event number: a subscriber that saw a gap
        asks for the range it missed."""
        row = store.subscription_row(sid)
        if row is None:
            raise HTTPException(404, f"Subscription/{sid} is not known")
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
                            "resource": [*published, subscription],
                            "interaction": [{"code": "transaction"}, {"code": "batch"}],
                        }
                    ],
                }
            ),
            media_type=FHIR_JSON,
        )

    return [admin, fhir]
