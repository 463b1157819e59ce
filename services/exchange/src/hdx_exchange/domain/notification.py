"""FHIR subscription-notification Bundles, as the R4 Subscriptions Backport IG shapes them.

The resource goes in as the bytes consent saw (orjson.Fragment), never re-serialised.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from hdx_exchange.domain.routing import PayloadContent, Subscription
from hdx_shared.envelope import uuid5_str

STATUS_PROFILE = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
    "backport-subscription-status-r4"
)
NOTIFICATION_NS = uuid.UUID("0b7f6a52-26c4-4b7c-9a5e-3f1f8a7c1e55")


def notification_id(subscription_id: str, event_id: str) -> str:
    """The same notification for the same event and subscription, however often it is sent."""
    return uuid5_str(NOTIFICATION_NS, f"{subscription_id}|{event_id}")


def build_notification(
    subscription: Subscription,
    *,
    event_id: str,
    event_number: int,
    resource_type: str,
    resource_id: str | None,
    resource: bytes,
    source: str,
    base_url: str,
    at: datetime | None = None,
    deleted: bool = False,
) -> bytes:
    when = (at or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    focus_ref = f"{resource_type}/{resource_id}" if resource_id else None
    event_parts: list[dict[str, Any]] = [
        {"name": "event-number", "valueString": str(event_number)},
        {"name": "timestamp", "valueInstant": when},
    ]
    if focus_ref and subscription.payload is not PayloadContent.EMPTY:
        event_parts.append({"name": "focus", "valueReference": {"reference": focus_ref}})
    status: dict[str, Any] = {
        "resourceType": "Parameters",
        "id": notification_id(subscription.id, event_id),
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": [
            {
                "name": "subscription",
                "valueReference": {"reference": f"{base_url}/Subscription/{subscription.id}"},
            },
            {
                "name": "topic",
                "valueCanonical": f"urn:hdx:criteria:{subscription.criteria.resource_type}",
            },
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": str(event_number)},
            {"name": "notification-event", "part": event_parts},
        ],
    }
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{status['id']}",
            "resource": status,
            "request": {
                "method": "GET",
                "url": f"{base_url}/Subscription/{subscription.id}/$status",
            },
            "response": {"status": "200"},
        }
    ]
    if deleted and focus_ref and subscription.payload is not PayloadContent.EMPTY:
        # The publisher deleted it: the subscriber is told to, and gets no content.
        entries.append(
            {
                "fullUrl": f"urn:hdx:event:{event_id}",
                "request": {"method": "DELETE", "url": focus_ref},
                "response": {"status": "200"},
            }
        )
    elif subscription.payload is PayloadContent.FULL:
        entries.append(
            {
                "fullUrl": f"urn:hdx:event:{event_id}",
                "resource": orjson.Fragment(resource),
                "request": {"method": "PUT", "url": focus_ref or resource_type},
                "response": {"status": "200"},
            }
        )
    elif subscription.payload is PayloadContent.ID_ONLY and focus_ref:
        entries.append(
            {
                "fullUrl": f"urn:hdx:event:{event_id}",
                "request": {"method": "PUT", "url": focus_ref},
                "response": {"status": "200"},
            }
        )
    bundle = {
        "resourceType": "Bundle",
        "id": status["id"],
        "meta": {"tag": [{"system": "urn:hdx:source", "code": source}]} if source else None,
        "type": "history",
        "timestamp": when,
        "entry": entries,
    }
    if bundle["meta"] is None:
        del bundle["meta"]
    return orjson.dumps(bundle)
