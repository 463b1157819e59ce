"""FHIR REST publishing, for hospital systems that cannot speak Kafka.

The same rules as the Kafka ingress (`domain.ingress.accept_message`), answered in FHIR:
what is accepted goes straight to hdx.validated, and the answer says 202 only after the
broker has acknowledged it; what is refused is a 4xx with an OperationOutcome.

Every request needs an access token with the scope for what it does (`system/<type>.c` to
POST, `.u` to PUT, `.d` to DELETE; a Bundle: its entries' types). A publisher's client is
bound to its source: it publishes as that source only — `ce-source` may name it and
defaults to it; any other is refused (403) and leaves a security-alert AuditEvent on the
audit topic. A client with the admin scope and no binding may publish as any registered
source (an operator's replay); any other client may not publish. It may give its own event
id in `ce-id`, which makes a retried request the same event.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Header, Request, Response

from hdx_exchange.domain.ingress import AcceptedResource, accept_message, tombstone
from hdx_exchange.pipeline import Registry
from hdx_shared.auth import AuthenticatedCaller, Caller, forbidden
from hdx_shared.envelope import ChangeType, Envelope, derive_event_id, now_ms
from hdx_shared.fhir import FhirError, Issue, Limits, operation_outcome, parse_json
from hdx_shared.http import FhirResponse
from hdx_shared.messaging import Outgoing, Publish
from hdx_shared.security_audit import security_alert, security_alert_record
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

    async def source_of(caller: Caller, claimed: str | None, request: Request) -> str | None:
        """The source this caller publishes as; 403 and a security alert if it may not."""
        if caller.source is not None and claimed in (None, caller.source):
            return caller.source
        if caller.source is None and caller.is_admin:
            return claimed
        if caller.source is None:
            what = "publish-unbound"
            description = f"client {caller.client_id} is not bound to a publisher source"
        else:
            what = "publish-as-other-source"
            description = (
                f"client {caller.client_id} is bound to source {caller.source} "
                f"and may not publish as {claimed}"
            )
        alert = security_alert(
            what=what,
            description=description,
            observer="exchange",
            client_id=caller.client_id,
            client_address=request.client.host if request.client else None,
            claimed_source=claimed,
            bound_source=caller.source,
            request=f"{request.method} {request.url.path}",
        )
        await publish([security_alert_record(topics, alert)])
        refused = forbidden(f"{description}: refused and audited")
        refused.audited = True  # with the sources it claimed: not again as a plain 403
        raise refused

    def allowed(caller: Caller, resource_type: str, permission: str) -> None:
        if not caller.can(resource_type, permission):
            raise forbidden(
                f"client {caller.client_id} lacks the scope system/{resource_type}.{permission}"
            )

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

        def as_the_url_says(doc: dict[str, Any]) -> None:
            if doc.get("resourceType") != resource_type:
                raise FhirError(
                    "wrong-type",
                    [
                        Issue(
                            f"the body is a {doc.get('resourceType')}, the URL says "
                            f"{resource_type}",
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

        # One parse: the URL's type and id are checked on the document accept_message parsed.
        accepted = accept_message(
            raw, env, registry.publishers, limits, env.event_id, expect=as_the_url_says
        )
        await forward(accepted)
        return FhirResponse(accepted_outcome(accepted), status_code=202)

    @router.post("/{resource_type}", status_code=202)
    async def create(
        resource_type: str,
        request: Request,
        caller: AuthenticatedCaller,
        ce_source: str | None = Header(default=None, alias="ce-source"),
        ce_id: str | None = Header(default=None, alias="ce-id"),
    ) -> Response:
        """Publish one resource (create). Scope: system/<type>.c."""
        allowed(caller, resource_type, "c")
        source = await source_of(caller, ce_source, request)
        env = envelope(source, ce_id, ChangeType.CREATE)
        return await publish_one(await request.body(), resource_type, None, env)

    @router.put("/{resource_type}/{resource_id}", status_code=202)
    async def update(
        resource_type: str,
        resource_id: str,
        request: Request,
        caller: AuthenticatedCaller,
        ce_source: str | None = Header(default=None, alias="ce-source"),
        ce_id: str | None = Header(default=None, alias="ce-id"),
    ) -> Response:
        """Publish one resource (update). Scope: system/<type>.u."""
        allowed(caller, resource_type, "u")
        source = await source_of(caller, ce_source, request)
        env = envelope(source, ce_id, ChangeType.UPDATE)
        return await publish_one(await request.body(), resource_type, resource_id, env)

    @router.delete("/{resource_type}/{resource_id}", status_code=202)
    async def delete(
        resource_type: str,
        resource_id: str,
        request: Request,
        caller: AuthenticatedCaller,
        ce_source: str | None = Header(default=None, alias="ce-source"),
        ce_id: str | None = Header(default=None, alias="ce-id"),
    ) -> Response:
        """Publish a deletion: subscribers that received the resource are told to delete it.
        Scope: system/<type>.d."""
        allowed(caller, resource_type, "d")
        source = await source_of(caller, ce_source, request)
        registry.require_loaded()
        env = envelope(source, ce_id, ChangeType.DELETE)
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
        caller: AuthenticatedCaller,
        ce_source: str | None = Header(default=None, alias="ce-source"),
        ce_id: str | None = Header(default=None, alias="ce-id"),
    ) -> Response:
        """Publish a transaction (all or nothing) or batch (entry by entry) Bundle. Scope:
        for each entry, system/<type>.c (request POST), .d (DELETE), else .u."""
        source = await source_of(caller, ce_source, request)
        registry.require_loaded()
        raw = await request.body()
        doc = parse_json(raw, limits)
        kind = doc.get("type")
        if doc.get("resourceType") != "Bundle" or kind not in ("transaction", "batch"):
            raise FhirError(
                "unsupported-bundle",
                [Issue("POST /fhir takes a transaction or batch Bundle", expression="type")],
            )
        env = envelope(source, ce_id, ChangeType.UPDATE)
        if kind == "transaction":
            for entry in doc.get("entry", ()):
                if denied := _entry_denied(caller, entry):
                    raise forbidden(denied)
            accepted = accept_message(
                raw, env, registry.publishers, limits, env.event_id, parsed=doc
            )
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
            if denied := _entry_denied(caller, entry):
                entries.append(_error_entry(403, Issue(denied, code="forbidden")))
                continue
            entry_env = env.evolve(event_id=f"{env.event_id}/{i}")
            try:
                # The entry's own bytes, from the document parsed (strictly) once above.
                accepted = accept_message(
                    orjson.dumps(resource),
                    entry_env,
                    registry.publishers,
                    limits,
                    entry_env.event_id,
                    parsed=resource,
                )
            except FhirError as exc:
                entries.append(_error_entry(exc.http_status, *exc.issues))
                continue
            await forward(accepted)
            entries.extend(_response_entry("202 Accepted", a) for a in accepted)
        return FhirResponse(_response_bundle("batch-response", entries))

    return router


_METHOD_PERMISSION = {"POST": "c", "PUT": "u", "DELETE": "d"}


def _entry_denied(caller: Caller, entry: Any) -> str | None:
    """Why the caller may not publish this Bundle entry (None: it may)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
        return None  # validation says what is wrong with it
    resource_type = entry["resource"].get("resourceType")
    request = entry.get("request")
    method = request.get("method") if isinstance(request, dict) else None
    permission = _METHOD_PERMISSION.get(str(method), "u")
    if isinstance(resource_type, str) and caller.can(resource_type, permission):
        return None
    return f"client {caller.client_id} lacks the scope system/{resource_type}.{permission}"


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
