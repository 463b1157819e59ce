"""The patient index's HTTP API (FHIR JSON): read a person's golden record, search by
identifier, IHE PIXm cross-referencing, $match — and the identity operations a person
makes: resolve a review task, link and unlink a source record, merge and unmerge.

Every person has a version: reads answer ``ETag: W/"<version>"``; the operations take
``If-Match`` (for the person in the path, or the task's person) and ``versions`` in the
body (for the others), and answer 409 when a person changed in between — never a silent
merge of two changes. Every error is an OperationOutcome (the shared handlers turn
FhirError and HTTPException into one).

Scopes (docs/security.md): reading a golden record system/Patient.r; search, $ihe-pix and
$match system/Patient.s; review tasks, identity state, merges and the identity operations
($resolve, $link, $unlink, $merge, $unmerge) system/hdx-identity.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from hdx_patient_index.domain.demographics import extract_demographics
from hdx_patient_index.domain.identifiers import PERSON_SYSTEM, Identifier
from hdx_patient_index.domain.matching import Grade
from hdx_patient_index.models import MergeRow, PersonRow, ReviewTaskPublic, ReviewTaskRow
from hdx_patient_index.operations import IdentityOperations, OperationResult, event_json
from hdx_patient_index.service import PatientIndexService, VersionConflict, identity_state
from hdx_shared.auth import IDENTITY_SCOPE, require_scope
from hdx_shared.fhir import FhirError, Issue, parse_json, validate_resource
from hdx_shared.http import FhirResponse
from hdx_shared.messaging import Outgoing
from hdx_shared.topics import Topics

log = logging.getLogger(__name__)
Publish = Callable[[Sequence[Outgoing]], Awaitable[None]]
IfMatch = Annotated[str | None, Header(alias="If-Match")]  # module level: FastAPI resolves it
_ETAG = re.compile(r'^(?:W/)?"?(\d+)"?$')

_IDENTITY = [Depends(require_scope(IDENTITY_SCOPE))]
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


def etag(version: int) -> str:
    return f'W/"{version}"'


def parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    m = _ETAG.match(value.strip())
    if m is None:
        raise FhirError(
            "invalid-if-match",
            [Issue(f"If-Match '{value}' is not a version ETag like W/\"3\"", code="invalid")],
        )
    return int(m.group(1))


class _Operation(BaseModel):
    reviewer: str = Field(min_length=1, max_length=200, description="who decides")
    versions: dict[str, int] = Field(
        default_factory=dict, description="person id → the version the reviewer saw"
    )


class ResolveRequest(_Operation):
    resolution: Literal["same-person", "different-person"]


class RecordRequest(_Operation):
    source: str = Field(min_length=1)
    local_id: str = Field(min_length=1)


class MergeRequest(_Operation):
    merged: str = Field(min_length=1, description="the person merged into the one in the path")


class UnmergeRequest(_Operation):
    merge: str | None = Field(default=None, description="the merge to undo (its id)")
    merged: str | None = Field(default=None, description="or: the person merged in")


def _versions(body: _Operation, person: str | None, if_match: str | None) -> dict[str, int]:
    versions = dict(body.versions)
    expected = parse_if_match(if_match)
    if expected is not None and person is not None:
        versions[person] = expected
    return versions


def merge_json(row: MergeRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "survivor": row.survivor_id,
        "merged": row.merged_id,
        "status": row.status,
        "reviewer": row.reviewer,
        "records": [{"source": s, "local_id": lid} for s, lid in orjson.loads(row.records)],
        "weight": row.weight,
        "levels": orjson.loads(row.levels),
        "merged_ms": row.merged_ms,
        "reviewed_ms": row.reviewed_ms,
        "unmerged_ms": row.unmerged_ms,
        "unmerged_by": row.unmerged_by,
    }


def build_router(
    service: PatientIndexService,
    base_url: str,
    *,
    ops: IdentityOperations | None = None,
    publish: Publish | None = None,
) -> APIRouter:
    store = service.store
    ops = ops or IdentityOperations(service, Topics())
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

    @router.get("/fhir/Patient/$ihe-pix", dependencies=[Depends(require_scope("system/Patient.s"))])
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

    @router.post("/fhir/Patient/$match", dependencies=[Depends(require_scope("system/Patient.s"))])
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

    @router.get(
        "/fhir/Patient/{person_id}", dependencies=[Depends(require_scope("system/Patient.r"))]
    )
    def read_patient(person_id: str) -> Response:
        """A person's golden record."""
        row = store.person(person_id)
        if row is None:
            raise HTTPException(404, f"Patient/{person_id} is not known")
        return FhirResponse(patient_resource(row), headers={"ETag": etag(row.version)})

    @router.get("/fhir/Patient", dependencies=[Depends(require_scope("system/Patient.s"))])
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

    def task_public(row: ReviewTaskRow) -> ReviewTaskPublic:
        return ReviewTaskPublic.model_validate(
            {**row.model_dump(), "levels": orjson.loads(row.levels)}
        )

    @router.get(
        "/review-tasks", response_class=JSONResponse, tags=["review"], dependencies=_IDENTITY
    )
    def review_tasks(
        status: str | None = "open",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        person: str | None = None,
    ) -> list[ReviewTaskPublic]:
        """Possible matches, conflicts and merges waiting for a person to decide (newest
        first); ``person``: only tasks about that person (either side)."""
        return [task_public(row) for row in store.review_tasks(status or None, limit, person)]

    @router.get(
        "/review-tasks/{task_id}",
        response_class=JSONResponse,
        tags=["review"],
        dependencies=_IDENTITY,
    )
    def review_task(task_id: str) -> Response:
        """One task, with the versions of both persons (``versions`` for $resolve)."""
        row = store.review_task(task_id)
        if row is None:
            raise HTTPException(404, f"review task {task_id} is not known")
        persons = {p.id: p.version for p in store.persons([row.person_id, row.candidate_person_id])}
        body = {**task_public(row).model_dump(), "versions": persons}
        headers = {"ETag": etag(persons[row.person_id])} if row.person_id in persons else {}
        return JSONResponse(body, headers=headers)

    async def run(
        call: Callable[[], OperationResult], etag_person: str | None = None
    ) -> JSONResponse:
        try:
            result = await asyncio.to_thread(call)
        except VersionConflict as exc:
            raise FhirError(
                "version-conflict",
                [
                    Issue(
                        f"{exc}: read it again and decide on what it is now (If-Match / versions)",
                        code="conflict",
                    )
                ],
                http_status=409,
            ) from exc
        if publish is not None:
            try:
                await ops.flush_outbox(publish)
            except Exception:  # committed: the outbox loop publishes it later
                log.warning("identity operation %s: publish deferred", result.operation)
        headers = {}
        if etag_person and etag_person in result.persons:
            headers["ETag"] = etag(result.persons[etag_person])
        return JSONResponse(result.to_json(), headers=headers)

    @router.post("/review-tasks/{task_id}/$resolve", tags=["review"], dependencies=_IDENTITY)
    async def resolve_task(
        task_id: str, body: ResolveRequest, if_match: IfMatch = None
    ) -> Response:
        """Resolve a review task: ``same-person`` links the record to the candidate (for a
        merge review: the merge stands); ``different-person`` records a sticky no-link (for
        a merge review: unmerge). If-Match: the version of the task's person."""
        task = store.review_task(task_id)
        if task is None:
            raise HTTPException(404, f"review task {task_id} is not known")
        versions = _versions(body, task.person_id, if_match)
        return await run(
            lambda: ops.resolve(task_id, body.resolution, body.reviewer, versions),
            task.person_id,
        )

    @router.post("/fhir/Patient/{person_id}/$link", tags=["identity"], dependencies=_IDENTITY)
    async def link(person_id: str, body: RecordRequest, if_match: IfMatch = None) -> Response:
        """Link a source record to this person by hand (sticky: the matcher never undoes it)."""
        versions = _versions(body, person_id, if_match)
        return await run(
            lambda: ops.link(person_id, body.source, body.local_id, body.reviewer, versions),
            person_id,
        )

    @router.post("/fhir/Patient/{person_id}/$unlink", tags=["identity"], dependencies=_IDENTITY)
    async def unlink(person_id: str, body: RecordRequest, if_match: IfMatch = None) -> Response:
        """Take a source record from this person: a new person of its own, and a no-link."""
        versions = _versions(body, person_id, if_match)
        return await run(
            lambda: ops.unlink(person_id, body.source, body.local_id, body.reviewer, versions),
            person_id,
        )

    @router.post("/fhir/Patient/{person_id}/$merge", tags=["identity"], dependencies=_IDENTITY)
    async def merge(person_id: str, body: MergeRequest, if_match: IfMatch = None) -> Response:
        """Merge ``merged`` into this person; a merge-review task is opened, and until it is
        resolved both persons' consents apply (deny wins)."""
        versions = _versions(body, person_id, if_match)
        return await run(
            lambda: ops.merge(person_id, body.merged, body.reviewer, versions), person_id
        )

    @router.post("/fhir/Patient/{person_id}/$unmerge", tags=["identity"], dependencies=_IDENTITY)
    async def unmerge(person_id: str, body: UnmergeRequest, if_match: IfMatch = None) -> Response:
        """Undo a merge into this person (the newest, or ``merge``, or the one of
        ``merged``); the answer's ``events`` are those emitted while it was in force."""
        versions = _versions(body, person_id, if_match)
        return await run(
            lambda: ops.unmerge(
                person_id,
                body.reviewer,
                merge_id=body.merge,
                merged_id=body.merged,
                versions=versions,
            ),
            person_id,
        )

    @router.get(
        "/identity/{person_id}",
        response_class=JSONResponse,
        tags=["identity"],
        dependencies=_IDENTITY,
    )
    def identity(person_id: str) -> dict[str, Any]:
        """Is this person's identity uncertain now, and which persons may it be?"""
        with store.reading() as s:
            if s.get(PersonRow, person_id) is None:
                raise HTTPException(404, f"Patient/{person_id} is not known")
            state = identity_state(s, person_id)
        return {
            "person": person_id,
            "uncertain": state.uncertain,
            "reasons": list(state.reasons),
            "candidates": [c.to_json() for c in state.candidates],
            "merges": list(state.merges),
        }

    @router.get("/merges", response_class=JSONResponse, tags=["identity"], dependencies=_IDENTITY)
    def merges(
        person: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[dict[str, Any]]:
        """Merges, newest first (``person``: into or of that person)."""
        return [merge_json(m) for m in store.merges(person, limit)]

    @router.get(
        "/merges/{merge_id}", response_class=JSONResponse, tags=["identity"], dependencies=_IDENTITY
    )
    def merge_detail(merge_id: str) -> dict[str, Any]:
        row = store.merge(merge_id)
        if row is None:
            raise HTTPException(404, f"merge {merge_id} is not known")
        return merge_json(row)

    @router.get(
        "/merges/{merge_id}/events",
        response_class=JSONResponse,
        tags=["identity"],
        dependencies=_IDENTITY,
    )
    def merge_events(merge_id: str) -> dict[str, Any]:
        """The events emitted for the survivor between the merge and the unmerge (or now):
        what recipients may have received under the merged identity, for review."""
        row = store.merge(merge_id)
        if row is None:
            raise HTTPException(404, f"merge {merge_id} is not known")
        return {
            "merge": row.id,
            "survivor": row.survivor_id,
            "merged": row.merged_id,
            "status": row.status,
            "from_ms": row.merged_ms,
            "to_ms": row.unmerged_ms,
            "events": [event_json(e) for e in store.merge_events(row)],
        }

    return router
