"""FHIR REST publishing, for hospital systems that cannot speak Kafka.

The same rules as the Kafka ingress (`domain.ingress.accept_message`), answered in FHIR:
what is accepted goes straight to hdx.validated, and the answer says 202 only after the
broker has acknowledged it; what is refused is a 4xx with an OperationOutcome.

The publisher names itself with the CloudEvents HTTP header `ce-source` (and may give its
own event id in `ce-id`, which makes a retried request the same event).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Header, Request, Response

from hdx_exchange.domain.ingress import AcceptedResource, accept_message, tombstone
from hdx_exchange.pipeline import Registry
from hdx_shared.envelope import ChangeType, Envelope, derive_event_id, now_ms
from hdx_shared.fhir import FhirError, Issue, Limits, operation_outcome, parse_json
from hdx_shared.http import FhirResponse
from hdx_shared.messaging import Outgoing, Publish
from hdx_shared.topics import Topics


def publishing_router(
    registry: Registry, topics: Topics, limits: Limits, publish: Publish
) -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["publishing"])

    async def forward(accepted: list[AcceptedResource]) -> None:
        owners = [a.owner for a in accepted if a.owner]
        await asyncio.to_thread(registry.store.remember_owners, owners)
        await publish(
            [Outgoing(topics.validated, a.value, a.key, a.envelope.to_headers()) for a in accepted]
        )

    def envelope(source: str | None, event_id: str | None, change: ChangeType) -> Envelope:
        return Envelope(event_id or str(uuid.uuid4()), source or "", change)

    def accepted_outcome(accepted: list[AcceptedResource]) -> dict[str, Any]:
        return operation_outcome(
            [
                Issue(
                    f"accepted {a.envelope.resource_type} as event {a.envelope.event_id}",
                    code="informational",
                    severity="information",
                )
                for a in accepted
            ]
        )

    async def publish_one(
        raw: bytes, resource_type: str, resource_id: str | None, env: Envelope
    ) -> Response:
        registry.require_loaded()
        doc = parse_json(raw, limits)
        if doc.get("resourceType") != resource_type:
            raise FhirError(
                "wrong-type",
                [
                    Issue(
                        f"the body is a {doc.get('resourceType')}, the URL says {resource_type}",
                        expression="resourceType",
                    )
                ],
            )
        if resource_id is not None and doc.get("id") != resource_id:
            raise FhirError(
                "id-mismatch",
                [
                    Issue(
                        f"the body's id '{doc.get('id')}' is not the URL's '{resource_id}'",
                        expression="id",
                    )
                ],
            )
        accepted = accept_message(raw, env, registry.publishers, limits, env.event_id)
        await forward(accepted)
        return FhirResponse(accepted_outcome(accepted), status_code=202)

    @router.post("/{resource_type}", status_code=202)
    async def create(
        resource_type: str,
        request: Request,
        ce_source: str | None = Header(default=None, alias="ce-source"),
        ce_id: str | None = Header(default=None, alias="ce-id"),
    ) -> Response:
        """Publish one resource (create)."""
        env = envelope(ce_source, ce_id, ChangeType.CREATE)
        return await publish_one(await request.body(), resource_type, None, env)

    @router.put("/{resource_type}/{resource_id}", status_code=202)
    async def update(
        resource_type: str,
        resource_id: str,
        request: Request,
        ce_source: str | None = Header(default=None, alias="ce-source"),
        ce_id: str | None = Header(default=None, alias="ce-id"),
    ) -> Response:
        """Publish one resource (update)."""
        env = envelope(ce_source, ce_id, ChangeType.UPDATE)
        return await publish_one(await request.body(), resource_type, resource_id, env)

    @router.delete("/{resource_type}/{resource_id}", status_code=202)
    async def delete(
        resource_type: str,
        resource_id: str,
        ce_source: str | None = Header(default=None, alias="ce-source"),
        ce_id: str | None = Header(default=None, alias="ce-id"),
    ) -> Response:
        """Publish a deletion: subscribers that received the resource are told to delete it."""
        registry.require_loaded()
        env = envelope(ce_source, ce_id, ChangeType.DELETE)
        publisher = registry.publishers.get(env.source)
        if publisher is None or not publisher.active:
            raise FhirError(
                "unknown-publisher",
                [Issue(f"source '{env.source}' is not a registered publisher", code="security")],
                http_status=403,
            )
        patient_ref = await asyncio.to_thread(
            registry.store.owner_of, env.source, resource_type, resource_id
        )
        if patient_ref is None:
            raise FhirError(
                "not-found",
                [
                    Issue(
                        f"{resource_type}/{resource_id} was never published by {env.source}",
                        code="not-found",
                    )
                ],
                http_status=404,
            )
        doc = tombstone(resource_type, resource_id, patient_ref)
        accepted = [
            AcceptedResource(
                orjson.dumps(doc),
                env.evolve(
                    event_id=derive_event_id(env.source, env.event_id, "0"),
                    resource_type=resource_type,
                    patient_ref=patient_ref,
                    received_at_ms=now_ms(),
                ),
                resource_id,
            )
        ]
        await forward(accepted)
        return FhirResponse(accepted_outcome(accepted), status_code=202)

    @router.post("", status_code=200)
    async def bundle(
        request: Request,
        ce_source: str | None = Header(default=None, alias="ce-source"),
        ce_id: str | None = Header(default=None, alias="ce-id"),
    ) -> Response:
        """Publish a transaction (all or nothing) or batch (entry by entry) Bundle."""
        registry.require_loaded()
        raw = await request.body()
        doc = parse_json(raw, limits)
        kind = doc.get("type")
        if doc.get("resourceType") != "Bundle" or kind not in ("transaction", "batch"):
            raise FhirError(
                "unsupported-bundle",
                [Issue("POST /fhir takes a transaction or batch Bundle", expression="type")],
            )
        env = envelope(ce_source, ce_id, ChangeType.UPDATE)
        if kind == "transaction":
            accepted = accept_message(raw, env, registry.publishers, limits, env.event_id)
            await forward(accepted)
            entries = [_response_entry("202 Accepted", a) for a in accepted]
            return FhirResponse(_response_bundle("transaction-response", entries))
        # batch: each entry stands alone, as FHIR's batch semantics say.
        entries = []
        for i, entry in enumerate(doc.get("entry", ())):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                entries.append(_error_entry(400, Issue("the entry carries no resource")))
                continue
            entry_env = env.evolve(event_id=f"{env.event_id}/{i}")
            try:
                accepted = accept_message(
                    orjson.dumps(resource),
                    entry_env,
                    registry.publishers,
                    limits,
                    entry_env.event_id,
                )
            except FhirError as exc:
                entries.append(_error_entry(exc.http_status, *exc.issues))
                continue
            await forward(accepted)
            entries.extend(_response_entry("202 Accepted", a) for a in accepted)
        return FhirResponse(_response_bundle("batch-response", entries))

    return router


def _response_entry(status: str, accepted: AcceptedResource) -> dict[str, Any]:
    return {
        "response": {
            "status": status,
            "outcome": operation_outcome(
                [
                    Issue(
                        f"event {accepted.envelope.event_id}",
                        code="informational",
                        severity="information",
                    )
                ]
            ),
        }
    }


def _error_entry(status: int, *issues: Issue) -> dict[str, Any]:
    return {"response": {"status": str(status), "outcome": operation_outcome(issues)}}


def _response_bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}
