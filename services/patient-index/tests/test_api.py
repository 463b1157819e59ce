"""The HTTP API over a database the stage filled: read, search, PIXm, $match, review tasks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pix_builders import NHS_A, NHS_B, NHS_C, RIVERSIDE, ST_MARYS, msg, patient

from hdx_patient_index.api import MATCH_GRADE, build_router
from hdx_patient_index.app import create_app
from hdx_patient_index.domain.identifiers import NHS_NUMBER, PERSON_SYSTEM, TrustedSystems
from hdx_patient_index.domain.matching import Matcher
from hdx_patient_index.pipeline import IdentifyStage
from hdx_patient_index.service import PatientIndexService
from hdx_patient_index.settings import PatientIndexSettings
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.auth import LocalTokens, install_auth
from hdx_shared.db import make_engine
from hdx_shared.fhir import FHIR_JSON, validate_resource
from hdx_shared.http import FhirResponse, install_fhir_errors
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics

BASE = "http://pix.test/fhir"
TOKENS = LocalTokens.generate()
READER = "system/Patient.rs system/hdx-identity"
HOME: dict[str, Any] = {"postcode": "SW1A 1AA", "phone": "020 7946 0958"}


class World:
    def __init__(self, client: TestClient, ada: str, grace: str, maybe: str) -> None:
        self.client, self.ada, self.grace, self.maybe = client, ada, grace, maybe


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    store = PatientIndexStore(make_engine(HdxSettings(data_dir=tmp_path, database_url=url)))
    service = PatientIndexService(store, Matcher(), TrustedSystems())
    assert service.load()
    stage = IdentifyStage(service, Topics())
    out = stage.process(
        [
            msg(patient("p1", nhs=f"{NHS_A[:3]} {NHS_A[3:6]} {NHS_A[6:]}", **HOME)),
            msg(patient("r7", given="Addie", **HOME), RIVERSIDE),
            msg(patient("g1", family="Hopper", given="Grace", birth_date="1906-12-09", nhs=NHS_B)),
            msg(patient("m1", postcode="M1 1AE"), RIVERSIDE),  # possible match of Ada
        ]
    )
    persons = [o.headers["hdx_person"] for o in out if o.topic.endswith("identified")]
    assert persons[0] == persons[1]
    app = FastAPI(default_response_class=FhirResponse)
    install_fhir_errors(app)
    install_auth(app, TOKENS.authenticator())
    app.include_router(build_router(service, BASE))
    with TestClient(app, headers=TOKENS.headers(READER)) as client:
        yield World(client, persons[0], persons[2], persons[3])
    store.engine.dispose()


def test_read_a_golden_record(world: World) -> None:
    r = world.client.get(f"/fhir/Patient/{world.ada}")
    assert r.status_code == 200 and r.headers["content-type"].startswith(FHIR_JSON)
    doc = r.json()
    validate_resource(doc)
    assert doc["id"] == world.ada and doc["meta"]["versionId"]
    systems = [(i["system"], i["value"]) for i in doc["identifier"]]
    assert systems[:2] == [(PERSON_SYSTEM, world.ada), (NHS_NUMBER, NHS_A)]
    assert {lk["other"]["identifier"]["system"] for lk in doc["link"]} == {ST_MARYS, RIVERSIDE}
    assert doc["name"][0]["given"] == ["Addie"]  # the most recent record's demographics


def test_an_unknown_patient_is_a_404_operation_outcome(world: World) -> None:
    r = world.client.get("/fhir/Patient/nobody")
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("identifier", "who"),
    [
        (f"{NHS_NUMBER}|{NHS_A}", "ada"),
        (f"{NHS_NUMBER}|943 476 5919", "ada"),  # normalised like the stored value
        (f"{ST_MARYS}|p1", "ada"),
        (f"{RIVERSIDE}|r7", "ada"),
        (f"{NHS_NUMBER}|{NHS_B}", "grace"),
        (NHS_B, "grace"),  # any system
        (f"{NHS_NUMBER}|{NHS_C}", None),
    ],
)
def test_search_by_identifier(world: World, identifier: str, who: str | None) -> None:
    r = world.client.get("/fhir/Patient", params={"identifier": identifier})
    assert r.status_code == 200, r.text
    bundle = r.json()
    validate_resource(bundle)
    ids = [e["resource"]["id"] for e in bundle.get("entry", [])]
    assert ids == ([getattr(world, who)] if who else [])
    if who:
        assert bundle["entry"][0]["fullUrl"] == f"{BASE}/Patient/{ids[0]}"


def test_search_by_person_identifier_and_id(world: World) -> None:
    r = world.client.get("/fhir/Patient", params={"identifier": f"{PERSON_SYSTEM}|{world.ada}"})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [world.ada]
    r = world.client.get("/fhir/Patient", params={"_id": world.grace})
    assert r.json()["total"] == 1
    r = world.client.get("/fhir/Patient")
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"


def test_pix_query(world: World) -> None:
    r = world.client.get("/fhir/Patient/$ihe-pix", params={"sourceIdentifier": f"{RIVERSIDE}|r7"})
    assert r.status_code == 200, r.text
    params = r.json()
    validate_resource(params)
    targets = {
        (p["valueIdentifier"]["system"], p["valueIdentifier"]["value"])
        for p in params["parameter"]
        if p["name"] == "targetIdentifier"
    }
    assert targets == {(PERSON_SYSTEM, world.ada), (NHS_NUMBER, NHS_A), (ST_MARYS, "p1")}
    assert {"name": "targetId", "valueReference": {"reference": f"Patient/{world.ada}"}} in (
        params["parameter"]
    )
    only_nhs = world.client.get(
        "/fhir/Patient/$ihe-pix",
        params={"sourceIdentifier": f"{RIVERSIDE}|r7", "targetSystem": NHS_NUMBER},
    ).json()
    assert [
        p["valueIdentifier"]["value"] for p in only_nhs["parameter"] if "valueIdentifier" in p
    ] == [NHS_A]
    missing = world.client.get("/fhir/Patient/$ihe-pix", params={"sourceIdentifier": "urn:x|1"})
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"


def _match(world: World, resource: dict[str, Any], **extra: Any) -> Any:
    parameters: dict[str, Any] = {
        "resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": resource}],
    }
    for name, value in extra.items():
        key = "valueBoolean" if isinstance(value, bool) else "valueInteger"
        parameters["parameter"].append({"name": name, key: value})
    return world.client.post(
        "/fhir/Patient/$match",
        content=orjson.dumps(parameters),
        headers={"content-type": FHIR_JSON},
    )


def test_match_by_nhs_number_is_certain(world: World) -> None:
    r = _match(
        world, {"resourceType": "Patient", "identifier": [{"system": NHS_NUMBER, "value": NHS_A}]}
    )
    assert r.status_code == 200, r.text
    bundle = r.json()
    validate_resource(bundle)
    [e] = bundle["entry"]
    assert e["resource"]["id"] == world.ada and e["search"]["score"] == 1.0
    assert e["search"]["extension"] == [{"url": MATCH_GRADE, "valueCode": "certain"}]


def test_match_on_demographics_is_graded(world: World) -> None:
    probe = patient("q", **HOME)
    del probe["id"]
    bundle = _match(world, probe).json()
    grades = {
        e["resource"]["id"]: e["search"]["extension"][0]["valueCode"] for e in bundle["entry"]
    }
    assert grades[world.ada] == "probable"
    assert grades[world.maybe] == "possible"
    assert world.grace not in grades
    scores = [e["search"]["score"] for e in bundle["entry"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert len(_match(world, probe, count=1).json()["entry"]) == 1
    assert _match(world, probe, onlyCertainMatches=True).json()["total"] == 0


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        orjson.dumps({"resourceType": "Patient"}),
        orjson.dumps(
            {"resourceType": "Parameters", "parameter": [{"name": "count", "valueInteger": 2}]}
        ),
        orjson.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "resource", "resource": {"resourceType": "Patient", "gender": "f"}}
                ],
            }
        ),
    ],
)
def test_match_rejects_what_is_not_a_patient_in_parameters(world: World, body: bytes) -> None:
    r = world.client.post("/fhir/Patient/$match", content=body, headers={"content-type": FHIR_JSON})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"


def test_review_tasks(world: World) -> None:
    r = world.client.get("/review-tasks")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    [task] = r.json()
    assert task["reason"] == "possible-match"
    assert task["person_id"] == world.maybe and task["candidate_person_id"] == world.ada
    assert task["levels"]["family"] == "exact" and task["status"] == "open"


def test_create_app_wires_everything_without_io(tmp_path: Path) -> None:
    settings = PatientIndexSettings(
        data_dir=tmp_path,
        environment="test",
        auth_issuer="http://hdx.test",
        auth_jwks_url="http://127.0.0.1:9/auth/jwks",  # nothing answers there
    )
    app = create_app(settings)
    client = TestClient(app)  # no lifespan: no broker, no schema, no index
    assert client.get("/healthz").json() == {"status": "ok", "service": "patient-index"}
    r = client.get("/fhir/Patient/someone")
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
    # A token, but the issuer's keys cannot be fetched (no exchange): fail closed, 503.
    token = TOKENS.headers(READER)
    r = client.get("/fhir/Patient/someone", headers=token)
    assert r.status_code == 503 and "issuer's keys" in r.text
    install_auth(app, TOKENS.authenticator())
    r = client.get("/fhir/Patient/someone", headers=token)
    assert r.status_code == 503 and r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("method", "path", "needs"),
    [
        ("GET", "/fhir/Patient/p1", "system/Patient.r"),
        ("GET", "/fhir/Patient?identifier=a|b", "system/Patient.s"),
        ("GET", "/fhir/Patient/$ihe-pix?sourceIdentifier=a|b", "system/Patient.s"),
        ("POST", "/fhir/Patient/$match", "system/Patient.s"),
        ("GET", "/review-tasks", "system/hdx-identity"),
        ("GET", "/merges", "system/hdx-identity"),
        ("GET", "/identity/p1", "system/hdx-identity"),
        ("POST", "/fhir/Patient/p1/$merge", "system/hdx-identity"),
        ("POST", "/fhir/Patient/p1/$link", "system/hdx-identity"),
    ],
)
def test_every_endpoint_needs_a_token_and_its_scope(
    world: World, method: str, path: str, needs: str
) -> None:
    anonymous = {"Authorization": ""}
    r = world.client.request(method, path, headers=anonymous)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.json()["issue"][0]["code"] == "login"
    other = "system/Consent.cruds"
    r = world.client.request(method, path, headers=TOKENS.headers(other))
    assert r.status_code == 403 and needs in r.json()["issue"][0]["diagnostics"]
    r = world.client.request(method, path, headers=TOKENS.headers(needs))
    assert r.status_code not in (401, 403), r.text
