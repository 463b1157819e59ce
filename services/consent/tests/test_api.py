"""The FHIR API in-process (httpx over ASGI; SQLite in a temporary directory; no broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from hdx_consent.api import build_router
from hdx_consent.domain import Policy
from hdx_consent.examples import consent, provision
from hdx_consent.service import ConsentService
from hdx_consent.settings import ConsentSettings
from hdx_consent.store import ConsentStore
from hdx_shared.auth import LocalTokens, install_auth
from hdx_shared.db import make_engine
from hdx_shared.http import install_fhir_errors
from hdx_shared.messaging import Outgoing
from hdx_shared.topics import Topics

FHIR = "application/fhir+json"
NHS = "https://fhir.nhs.uk/Id/nhs-number"


class Bus:
    def __init__(self) -> None:
        self.sent: list[Outgoing] = []

    async def __call__(self, out: Sequence[Outgoing]) -> None:
        self.sent.extend(out)


@pytest.fixture
async def service(tmp_path: Path) -> ConsentService:
    store = ConsentStore(make_engine(ConsentSettings(data_dir=tmp_path)))
    svc = ConsentService(store, Policy(), Topics("hdx."), Bus())
    await svc.load()
    return svc


TOKENS = LocalTokens.generate()


@pytest.fixture
def app(service: ConsentService) -> FastAPI:
    app = FastAPI()
    install_fhir_errors(app)
    install_auth(app, TOKENS.authenticator())
    app.include_router(build_router(service, base_url="http://hdx.test/fhir"))
    return app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hdx.test",
        headers=TOKENS.headers("system/Consent.cruds"),
    ) as c:
        yield c


def body(doc: dict[str, Any]) -> dict[str, Any]:
    return {"content": orjson.dumps(doc), "headers": {"Content-Type": FHIR}}


def issues(r: httpx.Response) -> list[dict[str, Any]]:
    doc = r.json()
    assert doc["resourceType"] == "OperationOutcome"
    result: list[dict[str, Any]] = doc["issue"]
    return result


async def test_create_read_update_history(
    client: httpx.AsyncClient, service: ConsentService
) -> None:
    r = await client.post("/fhir/Consent", **body(consent(provision("deny"), id="ignored")))
    assert r.status_code == 201, r.text
    created = r.json()
    cid = created["id"]
    assert cid != "ignored" and created["meta"]["versionId"] == "1"
    assert r.headers["location"] == f"http://hdx.test/fhir/Consent/{cid}/_history/1"
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["content-type"].startswith(FHIR)

    r = await client.get(f"/fhir/Consent/{cid}")
    assert r.status_code == 200 and r.json() == created

    update = consent(provision("deny"), status="inactive", id=cid)
    r = await client.put(
        f"/fhir/Consent/{cid}",
        headers={"If-Match": 'W/"1"', "Content-Type": FHIR},
        content=orjson.dumps(update),
    )
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["versionId"] == "2"
    assert service.index.get(cid) is not None
    assert service.index.get(cid).status == "inactive"  # type: ignore[union-attr]

    r = await client.put(
        f"/fhir/Consent/{cid}", headers={"If-Match": 'W/"1"'}, content=orjson.dumps(update)
    )
    assert r.status_code == 412 and issues(r)[0]["code"] == "conflict"

    r = await client.get(f"/fhir/Consent/{cid}/_history")
    hist = r.json()
    assert hist["type"] == "history" and hist["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in hist["entry"]] == ["2", "1"]
    r = await client.get(f"/fhir/Consent/{cid}/_history/1")
    assert r.json()["status"] == "active"


async def test_put_creates_with_the_given_id(client: httpx.AsyncClient) -> None:
    r = await client.put("/fhir/Consent/mine-1", **body(consent(id="mine-1")))
    assert r.status_code == 201 and r.json()["id"] == "mine-1"
    r = await client.put("/fhir/Consent/mine-2", **body(consent(id="other")))
    assert r.status_code == 400 and "must be the id in the URL" in issues(r)[0]["diagnostics"]


async def test_search(client: httpx.AsyncClient) -> None:
    await client.post("/fhir/Consent", **body(consent(patient="Patient/p1")))
    await client.post("/fhir/Consent", **body(consent(patient=None, identifier=(NHS, "9"))))
    await client.post("/fhir/Consent", **body(consent(patient="Patient/p2")))
    for query, expected in (("Patient/p1", 1), ("p1", 1), (f"{NHS}|9", 1), ("Patient/none", 0)):
        r = await client.get("/fhir/Consent", params={"patient": query})
        bundle = r.json()
        assert bundle["type"] == "searchset" and bundle["total"] == expected, query
    r = await client.get("/fhir/Consent")
    assert r.status_code == 400


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in consent().items() if k != key}


INVALID = [
    ("not JSON", b"{", 400, "structure"),
    ("not a Consent", orjson.dumps({"resourceType": "Patient"}), 400, "expected a Consent"),
    ("FHIR-invalid (no scope)", orjson.dumps(without("scope")), 400, "scope"),
    (
        "research scope",
        orjson.dumps(
            {
                **consent(),
                "scope": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                            "code": "research",
                        }
                    ]
                },
            }
        ),
        422,
        "Consent.scope",
    ),
    ("no patient", orjson.dumps(without("patient")), 422, "Consent.patient"),
    (
        "provision without type",
        orjson.dumps({**consent(), "provision": {"purpose": [{"code": "TREAT"}]}}),
        422,
        "Consent.provision.type",
    ),
]


@pytest.mark.parametrize(
    ("raw", "status", "where"), [(r, s, w) for _, r, s, w in INVALID], ids=[n for n, *_ in INVALID]
)
async def test_invalid_consents_get_an_operation_outcome(
    client: httpx.AsyncClient, raw: bytes, status: int, where: str | None
) -> None:
    r = await client.post("/fhir/Consent", content=raw, headers={"Content-Type": FHIR})
    assert r.status_code == status, r.text
    found = issues(r)
    assert found and all(i["severity"] == "error" for i in found)
    if where:
        text = orjson.dumps(found).decode()
        assert where in text, text


def parameters(**values: Any) -> dict[str, Any]:
    params = []
    for name, value in values.items():
        for v in value if isinstance(value, list) else [value]:
            params.append({"name": name, **v})
    return {"resourceType": "Parameters", "parameter": params}


def out(r: httpx.Response) -> dict[str, list[Any]]:
    assert r.status_code == 200, r.text
    result: dict[str, list[Any]] = {}
    for p in r.json()["parameter"]:
        value = next(v for k, v in p.items() if k.startswith("value"))
        result.setdefault(p["name"], []).append(value)
    return result


async def test_evaluate(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/fhir/Consent",
        **body(
            consent(provision("deny", provisions=[provision("permit", actor=["Organization/gp"])]))
        ),
    )
    cid = r.json()["id"]
    ask = {
        "patient": {"valueReference": {"reference": "Patient/p1"}},
        "recipient": {"valueReference": {"reference": "Organization/gp"}},
        "purpose": {"valueCoding": {"code": "TREAT"}},
        "resourceType": {"valueCode": "Observation"},
    }
    got = out(await client.post("/fhir/Consent/$evaluate", **body(parameters(**ask))))
    assert got["decision"] == ["permit"]
    assert got["consent"] == [{"reference": f"Consent/{cid}"}]
    assert got["provision"] == ["provision.provision[0]"]
    assert got["breakGlass"] == [False]
    assert got["reasons"]

    other = {**ask, "recipient": {"valueString": "Organization/other"}}
    assert out(await client.post("/fhir/Consent/$evaluate", **body(parameters(**other))))[
        "decision"
    ] == ["deny"]

    glass = {
        **other,
        "purpose": {"valueCode": "ETREAT"},
        "breakGlassReason": {"valueString": "unconscious"},
    }
    got = out(await client.post("/fhir/Consent/$evaluate", **body(parameters(**glass))))
    assert (got["decision"], got["breakGlass"]) == (["permit"], [True])

    labelled = {
        **ask,
        "securityLabel": [
            {"valueCode": "HIV"},
            {
                "valueCoding": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "PSY",
                }
            },
        ],
    }
    got = out(await client.post("/fhir/Consent/$evaluate", **body(parameters(**labelled))))
    assert got["decision"] == ["deny"] and got["basis"] == ["sensitive-label"]

    by_identifier = {**ask, "patient": {"valueIdentifier": {"system": NHS, "value": "1"}}}
    assert out(await client.post("/fhir/Consent/$evaluate", **body(parameters(**by_identifier))))[
        "decision"
    ] == ["permit"]


async def test_evaluate_needs_its_parameters(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/fhir/Consent/$evaluate", **body(parameters(patient={"valueString": "Patient/p1"}))
    )
    assert r.status_code == 400
    assert "recipient" in issues(r)[0]["diagnostics"]


async def test_not_found_and_unavailable(
    client: httpx.AsyncClient, service: ConsentService
) -> None:
    r = await client.get("/fhir/Consent/nope")
    assert r.status_code == 404 and issues(r)[0]["code"] == "not-found"
    service.loaded = False
    r = await client.post(
        "/fhir/Consent/$evaluate",
        **body(
            parameters(
                patient={"valueString": "Patient/p1"},
                recipient={"valueString": "Organization/gp"},
                purpose={"valueCode": "TREAT"},
                resourceType={"valueCode": "Observation"},
            )
        ),
    )
    assert r.status_code == 503 and issues(r)[0]["code"] == "transient"


@pytest.mark.parametrize(
    ("method", "path", "needs"),
    [
        ("POST", "/fhir/Consent", "system/Consent.c"),
        ("PUT", "/fhir/Consent/c1", "system/Consent.u"),
        ("GET", "/fhir/Consent/c1", "system/Consent.r"),
        ("GET", "/fhir/Consent/c1/_history", "system/Consent.r"),
        ("GET", "/fhir/Consent/c1/_history/1", "system/Consent.r"),
        ("GET", "/fhir/Consent?patient=Patient/p1", "system/Consent.s"),
        ("POST", "/fhir/Consent/$evaluate", "system/Consent.r"),
    ],
)
async def test_every_endpoint_needs_a_token_and_its_scope(
    app: FastAPI, method: str, path: str, needs: str
) -> None:
    doc = consent(provision("deny"), id="c1")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://hdx.test"
    ) as anonymous:
        r = await anonymous.request(method, path, content=orjson.dumps(doc))
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert issues(r)[0]["code"] == "login"

        forged = LocalTokens.generate().headers("system/Consent.cruds")
        r = await anonymous.request(method, path, content=orjson.dumps(doc), headers=forged)
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]

        other = "system/Patient.rs" + ("" if needs.endswith(".r") else " system/Consent.r")
        r = await anonymous.request(
            method, path, content=orjson.dumps(doc), headers=TOKENS.headers(other)
        )
        assert r.status_code == 403, r.text
        assert issues(r)[0]["code"] == "forbidden" and needs in issues(r)[0]["diagnostics"]

        r = await anonymous.request(
            method, path, content=orjson.dumps(doc), headers=TOKENS.headers(needs)
        )
        assert r.status_code not in (401, 403), r.text
