"""The consent service's FHIR API: Consent create/update/read/search/history and $evaluate.

Scopes (docs/security.md): create system/Consent.c, update (PUT) system/Consent.u, read,
history and $evaluate system/Consent.r, search system/Consent.s.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response

from hdx_consent.domain import ConsentInvalid, DecisionRequest, normalize_reference
from hdx_consent.domain.timeutil import fhir_interval
from hdx_consent.models import ConsentVersion
from hdx_consent.service import ConsentService
from hdx_consent.store import VersionConflict
from hdx_shared.auth import require_scope
from hdx_shared.fhir import FhirError, Issue, decode_resource
from hdx_shared.http import FhirResponse
from hdx_shared.messaging import Unavailable

T = TypeVar("T")
_ETAG = re.compile(r'^(?:W/)?"?(\d+)"?$')
# A version number as the database holds it (a larger one is 400, not a database error).
Version = Annotated[int, Path(ge=1, le=2**31 - 1)]
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR id


async def _available(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except Unavailable as exc:
        raise FhirError(
            "unavailable", [Issue(str(exc), code="transient")], http_status=503
        ) from exc


def _invalid(exc: ConsentInvalid) -> FhirError:
    return FhirError(
        "invalid-consent",
        [
            Issue(
                p.message,
                code=p.code,
                expression=f"Consent.{p.expression}" if p.expression else None,
            )
            for p in exc.problems
        ],
        http_status=422,
    )


def _resource(row: ConsentVersion) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(row.resource)
    return doc


def _version_headers(row: ConsentVersion, base: str) -> dict[str, str]:
    recorded = row.recorded if row.recorded.tzinfo else row.recorded.replace(tzinfo=UTC)
    return {
        "ETag": f'W/"{row.version}"',
        "Location": f"{base}/Consent/{row.consent_id}/_history/{row.version}",
        "Last-Modified": recorded.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT"),
    }


def _check_id(consent_id: str) -> None:
    if not _ID.match(consent_id):
        raise FhirError(
            "invalid-id", [Issue(f"'{consent_id}' is not a FHIR id", expression="Consent.id")]
        )


async def _read_consent(request: Request) -> dict[str, Any]:
    doc = decode_resource(await request.body())
    if doc.get("resourceType") != "Consent":
        raise FhirError(
            "wrong-resource-type",
            [
                Issue(
                    f"expected a Consent, got {doc.get('resourceType')}", expression="resourceType"
                )
            ],
        )
    return doc


# ---- $evaluate parameters -----------------------------------------------------------------


def _param_value(p: dict[str, Any]) -> Any:
    for k, v in p.items():
        if k.startswith("value"):
            return k, v
    return None, None


def _as_code(name: str, kind: str | None, value: Any) -> str:
    if kind in ("valueCode", "valueString", "valueUri") and isinstance(value, str):
        return value
    if kind == "valueCoding" and isinstance(value, dict) and isinstance(value.get("code"), str):
        return str(value["code"])
    if kind == "valueCodeableConcept" and isinstance(value, dict):
        for c in value.get("coding") or ():
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                return str(c["code"])
    raise FhirError(
        "invalid-parameters",
        [
            Issue(
                f"parameter '{name}' needs a code (valueCode, valueCoding or valueString)",
                expression=f"Parameters.parameter[{name}]",
            )
        ],
    )


def _as_identifier(value: Any) -> str | None:
    if (
        isinstance(value, dict)
        and isinstance(value.get("system"), str)
        and isinstance(value.get("value"), str)
    ):
        return f"{value['system']}|{value['value']}"
    return None


def _as_reference(name: str, kind: str | None, value: Any) -> str:
    """'Type/id' from valueReference/valueString/valueUri, or 'system|value' for an
    identifier (valueIdentifier or a valueReference with an identifier)."""
    if kind in ("valueString", "valueUri") and isinstance(value, str):
        return value if "|" in value else normalize_reference(value)
    if kind == "valueReference" and isinstance(value, dict):
        if isinstance(value.get("reference"), str):
            return normalize_reference(value["reference"])
        ident = _as_identifier(value.get("identifier"))
        if ident:
            return ident
    if kind == "valueIdentifier" and (ident := _as_identifier(value)):
        return ident
    raise FhirError(
        "invalid-parameters",
        [
            Issue(
                f"parameter '{name}' needs a reference (valueReference or valueString "
                "'Type/id') or an identifier (system and value)",
                expression=f"Parameters.parameter[{name}]",
            )
        ],
    )


def evaluation_request(params: dict[str, Any], now: datetime) -> DecisionRequest:
    """A DecisionRequest from $evaluate's input Parameters."""
    values: dict[str, list[tuple[str | None, Any]]] = {}
    for p in params.get("parameter") or ():
        if isinstance(p, dict) and isinstance(p.get("name"), str):
            values.setdefault(p["name"], []).append(_param_value(p))

    def one(name: str, required: bool = True) -> tuple[str | None, Any]:
        got = values.get(name, [])
        if len(got) > 1 or (required and not got):
            raise FhirError(
                "invalid-parameters",
                [
                    Issue(
                        f"parameter '{name}' is "
                        f"{'required' if not got else 'given more than once'}",
                        code="required" if not got else "invalid",
                        expression=f"Parameters.parameter[{name}]",
                    )
                ],
            )
        return got[0] if got else (None, None)

    patient = _as_reference("patient", *one("patient"))
    person = identifiers = None
    if "|" in patient:
        identifiers = [patient]
    elif patient.startswith("Patient/"):
        person = patient.removeprefix("Patient/")
    else:
        raise FhirError(
            "invalid-parameters",
            [
                Issue(
                    "patient must be Patient/<enterprise id> or an identifier system|value",
                    expression="Parameters.parameter[patient]",
                )
            ],
        )
    identifiers = (identifiers or []) + [
        _as_reference("identifier", k, v) for k, v in values.get("identifier", [])
    ]
    recipient = _as_reference("recipient", *one("recipient"))
    purpose = _as_code("purpose", *one("purpose"))
    rtype = _as_code("resourceType", *one("resourceType"))
    labels = frozenset(_as_code("securityLabel", k, v) for k, v in values.get("securityLabel", []))
    kind, reason = one("breakGlassReason", required=False)
    if reason is not None and (kind != "valueString" or not isinstance(reason, str)):
        raise FhirError(
            "invalid-parameters",
            [
                Issue(
                    "breakGlassReason is a valueString",
                    expression="Parameters.parameter[breakGlassReason]",
                )
            ],
        )
    kind, at_value = one("time", required=False)
    at = now
    if at_value is not None:
        try:
            at = fhir_interval(str(at_value))[0]
        except ValueError as exc:
            raise FhirError(
                "invalid-parameters", [Issue(str(exc), expression="Parameters.parameter[time]")]
            ) from exc
    return DecisionRequest(
        person=person,
        identifiers=tuple(identifiers),
        recipient=recipient,
        purpose=purpose,
        resource_type=rtype,
        at=at,
        security_labels=labels,
        break_glass_reason=reason.strip() or None if isinstance(reason, str) else None,
    )


def build_router(service: ConsentService, *, base_url: str = "/fhir") -> APIRouter:
    """The /fhir routes; `base_url` is how clients see /fhir (Location, fullUrl)."""
    router = APIRouter(prefix="/fhir", tags=["Consent"])
    base_url = base_url.rstrip("/")

    async def write(doc: dict[str, Any], consent_id: str | None, if_match: int | None) -> Response:
        try:
            written = await _available(
                lambda: service.write(doc, consent_id=consent_id, if_match=if_match)
            )
        except ConsentInvalid as exc:
            raise _invalid(exc) from exc
        except VersionConflict as exc:
            status = 412 if if_match is not None else 409
            raise FhirError(
                "version-conflict", [Issue(str(exc), code="conflict")], http_status=status
            ) from exc
        return FhirResponse(
            written.resource,
            status_code=201 if written.created else 200,
            headers=_version_headers(written.row, base_url),
        )

    @router.post(
        "/Consent",
        status_code=201,
        response_class=FhirResponse,
        dependencies=[Depends(require_scope("system/Consent.c"))],
    )
    async def create_consent(request: Request) -> Response:
        """Create a Consent (a server-assigned id; any id in the body is ignored)."""
        doc = await _read_consent(request)
        doc.pop("id", None)
        return await write(doc, None, None)

    @router.post(
        "/Consent/$evaluate",
        response_class=FhirResponse,
        dependencies=[Depends(require_scope("system/Consent.r"))],
    )
    async def evaluate(request: Request) -> Response:
        """Decide one request as the gate would: Parameters in, Parameters out."""
        params = decode_resource(await request.body())
        if params.get("resourceType") != "Parameters":
            raise FhirError(
                "wrong-resource-type",
                [Issue("$evaluate takes a Parameters resource", expression="resourceType")],
            )
        req = evaluation_request(params, datetime.now(UTC))

        async def run() -> Any:
            return service.evaluate(req)

        d = await _available(run)
        out: list[dict[str, Any]] = [
            {"name": "decision", "valueCode": d.decision},
            {"name": "basis", "valueCode": d.basis.value},
        ]
        out += [{"name": "reasons", "valueString": r} for r in d.reasons]
        if d.consent_id:
            out.append(
                {"name": "consent", "valueReference": {"reference": f"Consent/{d.consent_id}"}}
            )
        if d.provision_path:
            out.append({"name": "provision", "valueString": d.provision_path})
        out.append({"name": "breakGlass", "valueBoolean": d.break_glass})
        return FhirResponse({"resourceType": "Parameters", "parameter": out})

    @router.put(
        "/Consent/{consent_id}",
        response_class=FhirResponse,
        dependencies=[Depends(require_scope("system/Consent.u"))],
    )
    async def update_consent(
        request: Request, consent_id: str, if_match: str | None = Header(default=None)
    ) -> Response:
        """Store a new version (or create the Consent with this id). If-Match: W/"<n>"."""
        _check_id(consent_id)
        doc = await _read_consent(request)
        if doc.get("id") != consent_id:
            raise FhirError(
                "id-mismatch",
                [
                    Issue(
                        f"the body's id ({doc.get('id')!r}) must be the id in the URL "
                        f"({consent_id})",
                        expression="Consent.id",
                    )
                ],
            )
        expected = None
        if if_match is not None:
            m = _ETAG.match(if_match.strip())
            if not m:
                raise FhirError(
                    "invalid-if-match",
                    [Issue(f"If-Match '{if_match}' is not a version ETag like W/\"3\"")],
                )
            expected = int(m[1])
        return await write(doc, consent_id, expected)

    @router.get(
        "/Consent/{consent_id}",
        response_class=FhirResponse,
        dependencies=[Depends(require_scope("system/Consent.r"))],
    )
    async def read_consent(consent_id: str) -> Response:
        row = await _available(lambda: _thread(service.store.latest, consent_id))
        if row is None:
            raise FhirError(
                "not-found",
                [Issue(f"Consent/{consent_id} is not known", code="not-found")],
                http_status=404,
            )
        return FhirResponse(_resource(row), headers=_version_headers(row, base_url))

    @router.get(
        "/Consent/{consent_id}/_history",
        response_class=FhirResponse,
        dependencies=[Depends(require_scope("system/Consent.r"))],
    )
    async def history(consent_id: str) -> Response:
        rows = await _available(lambda: _thread(service.store.history, consent_id))
        if not rows:
            raise FhirError(
                "not-found",
                [Issue(f"Consent/{consent_id} is not known", code="not-found")],
                http_status=404,
            )
        entries = [
            {
                "fullUrl": f"{base_url}/Consent/{r.consent_id}/_history/{r.version}",
                "resource": _resource(r),
                "request": {
                    "method": "POST" if r.version == 1 else "PUT",
                    "url": "Consent" if r.version == 1 else f"Consent/{r.consent_id}",
                },
                "response": {
                    "status": "201 Created" if r.version == 1 else "200 OK",
                    "etag": f'W/"{r.version}"',
                },
            }
            for r in rows
        ]
        return FhirResponse(
            {"resourceType": "Bundle", "type": "history", "total": len(entries), "entry": entries}
        )

    @router.get(
        "/Consent/{consent_id}/_history/{version}",
        response_class=FhirResponse,
        dependencies=[Depends(require_scope("system/Consent.r"))],
    )
    async def vread(consent_id: str, version: Version) -> Response:
        row = await _available(lambda: _thread(service.store.version, consent_id, version))
        if row is None:
            raise FhirError(
                "not-found",
                [Issue(f"Consent/{consent_id}/_history/{version} is not known", code="not-found")],
                http_status=404,
            )
        return FhirResponse(_resource(row), headers=_version_headers(row, base_url))

    @router.get(
        "/Consent",
        response_class=FhirResponse,
        dependencies=[Depends(require_scope("system/Consent.s"))],
    )
    async def search(patient: str | None = Query(default=None)) -> Response:
        """Current Consents of a patient: patient=Patient/<id>, <id>, or system|value."""
        if not patient:
            raise FhirError(
                "search-needs-patient",
                [
                    Issue(
                        "search Consents by patient: patient=Patient/<id> or patient=system|value",
                        code="required",
                        expression="patient",
                    )
                ],
            )
        key = (
            patient
            if "|" in patient
            else "Patient/" + normalize_reference(patient).removeprefix("Patient/")
        )
        rows = await _available(lambda: _thread(service.store.search, [key]))
        return FhirResponse(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(rows),
                "link": [{"relation": "self", "url": f"{base_url}/Consent?patient={patient}"}],
                "entry": [
                    {
                        "fullUrl": f"{base_url}/Consent/{r.consent_id}",
                        "resource": _resource(r),
                        "search": {"mode": "match"},
                    }
                    for r in rows
                ],
            }
        )

    return router


async def _thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)
