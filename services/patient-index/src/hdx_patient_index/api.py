"""The patient index's HTTP API (FHIR JSON): read a person's golden record, search by
identifier, IHE PIXm cross-referencing, $match, and the review-task list.

Every error is an OperationOutcome (the shared handlers turn FhirError and HTTPException
into one).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from hdx_patient_index.domain.demographics import extract_demographics
from hdx_patient_index.domain.identifiers import PERSON_SYSTEM, Identifier
from hdx_patient_index.domain.matching import Grade
from hdx_patient_index.models import PersonRow, ReviewTaskPublic
from hdx_patient_index.service import PatientIndexService
from hdx_shared.fhir import FhirError, Issue, parse_json, validate_resource
from hdx_shared.http import FhirResponse

MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"
DEFAULT_MATCH_COUNT = 10
MAX_MATCH_COUNT = 100


def patient_resource(row: PersonRow) -> dict[str, Any]:
    """A person's golden record as a FHIR Patient, with version and time."""
    doc: dict[str, Any] = orjson.loads(row.golden)
    updated = datetime.fromtimestamp(row.updated_ms / 1000, UTC)
    doc["meta"] = {
        "versionId": str(row.version),
        "lastUpdated": updated.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    return doc


def _identifier_param(token: str, name: str) -> Identifier:
    ident = Identifier.parse_token(token)
    if not ident.value:
        raise FhirError(
            "invalid-parameter",
            [Issue(f"{name} must be 'system|value'", code="invalid", expression=name)],
        )
    return ident


def _bad_parameters(message: str, expression: str | None = None) -> FhirError:
    return FhirError("invalid-parameters", [Issue(message, code="invalid", expression=expression)])


def build_router(service: PatientIndexService, base_url: str) -> APIRouter:
    store = service.store
    router = APIRouter(tags=["Patient"])

    def resolve(ident: Identifier) -> list[str]:
        if ident.system == PERSON_SYSTEM:
            return [ident.value] if store.person(ident.value) else []
        value = (
            service.trusted.normalise(ident.system, ident.value) if ident.system else ident.value
        )
        return store.persons_by_identifier(ident.system, value)

    def searchset(entries: list[dict[str, Any]]) -> dict[str, Any]:
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(entries),
        }
        if entries:
            bundle["entry"] = entries
        return bundle

    def entry(row: PersonRow, search: dict[str, Any]) -> dict[str, Any]:
        return {
            "fullUrl": f"{base_url}/Patient/{row.id}",
            "resource": patient_resource(row),
            "search": search,
        }

    @router.get("/fhir/Patient/$ihe-pix")
    def pix_query(
        source_identifier: Annotated[str, Query(alias="sourceIdentifier")],
        target_system: Annotated[list[str] | None, Query(alias="targetSystem")] = None,
    ) -> Response:
        """IHE PIXm: every identifier of the person a source identifier belongs to."""
        source = _identifier_param(source_identifier, "sourceIdentifier")
        persons = store.persons(resolve(source))
        if not persons:
            raise FhirError(
                "not-found",
                [Issue(f"sourceIdentifier {source.token} is not known", code="not-found")],
                http_status=404,
            )
        wanted = set(target_system or ())
        params: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        for row in persons:
            golden = orjson.loads(row.golden)
            idents = [i for i in golden.get("identifier", ()) if isinstance(i, dict)]
            idents += [
                link["other"]["identifier"]
                for link in golden.get("link", ())
                if "identifier" in link.get("other", {})
            ]
            for ident in idents:
                system, value = ident.get("system", ""), ident.get("value", "")
                if (system, value) in seen or (system, value) == (source.system, source.value):
                    continue
                seen.add((system, value))
                if wanted and system not in wanted:
                    continue
                params.append(
                    {
                        "name": "targetIdentifier",
                        "valueIdentifier": {"system": system, "value": value},
                    }
                )
            params.append(
                {"name": "targetId", "valueReference": {"reference": f"Patient/{row.id}"}}
            )
        out: dict[str, Any] = {"resourceType": "Parameters"}
        if params:
            out["parameter"] = params
        return FhirResponse(out)

    @router.post("/fhir/Patient/$match")
    async def match(request: Request) -> Response:
        """FHIR $match: the persons a Patient may be, best first, with score and match-grade."""
        doc = parse_json(await request.body())
        if doc.get("resourceType") != "Parameters":
            raise _bad_parameters("$match takes a Parameters resource", "resourceType")
        params = {p.get("name"): p for p in doc.get("parameter", ()) if isinstance(p, dict)}
        patient = (params.get("resource") or {}).get("resource")
        if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
            raise _bad_parameters("parameter 'resource' must hold a Patient", "parameter")
        validate_resource(patient, "parameter.resource.")
        count = params.get("count", {}).get("valueInteger", DEFAULT_MATCH_COUNT)
        if not isinstance(count, int) or count < 1:
            raise _bad_parameters("count must be a positive integer", "parameter")
        only_certain = params.get("onlyCertainMatches", {}).get("valueBoolean") is True
        return FhirResponse(
            await asyncio.to_thread(_match, patient, min(count, MAX_MATCH_COUNT), only_certain)
        )

    def _match(patient: dict[str, Any], count: int, only_certain: bool) -> dict[str, Any]:
        demo = extract_demographics(patient, service.trusted)
        if demo.trusted:
            service.ensure_persons(store.trusted_owner_ids(demo.trusted))
        candidates, _ = service.matcher.search(demo, service.index)
        if only_certain:
            candidates = [c for c in candidates if c.grade is Grade.CERTAIN]
        candidates = candidates[:count]
        rows = {r.id: r for r in store.persons(c.person_id for c in candidates)}
        entries = [
            entry(
                rows[c.person_id],
                {
                    "extension": [{"url": MATCH_GRADE, "valueCode": c.grade.value}],
                    "mode": "match",
                    "score": round(c.probability, 4),
                },
            )
            for c in candidates
            if c.person_id in rows
        ]
        return searchset(entries)

    @router.get("/fhir/Patient/{person_id}")
    def read_patient(person_id: str) -> Response:
        """A person's golden record."""
        row = store.person(person_id)
        if row is None:
            raise HTTPException(404, f"Patient/{person_id} is not known")
        return FhirResponse(patient_resource(row))

    @router.get("/fhir/Patient")
    def search_patients(
        identifier: str | None = None, id_: Annotated[str | None, Query(alias="_id")] = None
    ) -> Response:
        """Search persons by identifier (``system|value``; ``urn:hdx:person|<id>`` too) or _id."""
        if identifier is None and id_ is None:
            raise FhirError(
                "invalid-search",
                [Issue("search Patients by identifier=system|value or _id", code="not-supported")],
            )
        ids: set[str] | None = None
        if identifier is not None:
            ids = set(resolve(_identifier_param(identifier, "identifier")))
        if id_ is not None:
            ids = {id_} if ids is None else ids & {id_}
        rows = store.persons(ids or ())
        return FhirResponse(searchset([entry(r, {"mode": "match"}) for r in rows]))

    @router.get("/review-tasks", response_class=JSONResponse, tags=["review"])
    def review_tasks(
        status: str | None = "open", limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[ReviewTaskPublic]:
        """Possible matches and conflicts waiting for a person to decide (newest first)."""
        return [
            ReviewTaskPublic.model_validate(
                {**row.model_dump(), "levels": orjson.loads(row.levels)}
            )
            for row in store.review_tasks(status or None, limit)
        ]

    return router
