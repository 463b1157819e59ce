"""The exchange's HTTP API in-process with its real authorization server: the open
endpoints, 401/403 as OperationOutcomes on every protected one, a publisher confined to its
own source (refused and audited otherwise) and a subscriber to its own Subscriptions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from limits import parse_many

from hdx_exchange import api, rest_publish
from hdx_exchange.api import build_routers
from hdx_exchange.audit_log import AuditLog
from hdx_exchange.domain.ingress import Publisher
from hdx_exchange.models import SubscriptionRow
from hdx_exchange.oauth import AuthorizationServer, ClientIn, auth_routers, verification_keys
from hdx_exchange.pipeline import Registry
from hdx_exchange.rest_publish import publishing_router
from hdx_exchange.settings import ExchangeSettings
from hdx_exchange.store import ExchangeStore
from hdx_shared import fhir
from hdx_shared.auth import (
    ADMIN_SCOPE,
    Authenticator,
    Key,
    Revocations,
    StaticKeys,
    TokenIssuer,
    clients_file_entry,
    generate_key,
    token_request,
)
from hdx_shared.db import make_engine
from hdx_shared.fhir import FHIR_JSON, Limits, validate_resource
from hdx_shared.http import FhirResponse, SecurityAlerts, install_fhir_errors
from hdx_shared.messaging import Outgoing
from hdx_shared.topics import Topics, TopicSpec

BASE = "http://testserver"
ST_MARYS, RIVERSIDE = "urn:hdx:org:st-marys", "urn:hdx:org:riverside"
TOPICS = Topics("hdx.")
ADA = {
    "resourceType": "Patient",
    "id": "sm-1",
    "name": [{"family": "Lovelace", "given": ["Ada"]}],
    "gender": "female",
}


class Exchange:
    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.settings = ExchangeSettings(
            environment="test",
            data_dir=tmp_path,
            auth_issuer=BASE,
            public_base_url=BASE,
            **settings,
        )
        self.store = ExchangeStore(make_engine(self.settings))
        self.store.create_schema()
        for source in (ST_MARYS, RIVERSIDE):
            self.store.put_publisher(Publisher(source, source, f"{source}/patient-id"))
        self.registry = Registry(self.store)
        self.registry.refresh()
        self.sent: list[Outgoing] = []
        key = generate_key()
        keys = verification_keys(self.settings, key)
        issuer = TokenIssuer(key, BASE, self.settings.auth_audience)
        server = AuthorizationServer(self.store, issuer, self.settings.token_url)

        async def publish(out: Sequence[Outgoing]) -> None:
            self.sent.extend(out)

        app = FastAPI(default_response_class=FhirResponse)
        alerts = SecurityAlerts(self.settings, TOPICS, publish, parse_many("30/minute"))
        app.state.hdx_security_alerts = alerts
        install_fhir_errors(app, on_refused=alerts.refused)

        async def revoked() -> dict[str, int]:
            return self.store.revoked_tokens()

        app.state.hdx_auth = Authenticator.from_settings(
            self.settings, StaticKeys(keys), Revocations(revoked, refresh_seconds=0)
        )
        audit = AuditLog(self.store, TOPICS, self.settings)
        for router in (
            *auth_routers(server, self.settings, keys),
            *build_routers(self.store, self.registry, TOPICS, self.settings, audit),
            publishing_router(self.registry, TOPICS, Limits(), publish),
        ):
            app.include_router(router)
        self.http = TestClient(app)
        self.keys: dict[str, Key] = {}

    def register(self, client_id: str, scope: str, **bindings: str) -> None:
        self.keys[client_id] = generate_key()
        entry = clients_file_entry(client_id, self.keys[client_id], scope, **bindings)
        self.store.put_client(ClientIn.model_validate(entry).row())

    def token(self, client_id: str, scope: str | None = None) -> dict[str, str]:
        form = token_request(client_id, self.keys[client_id], self.settings.token_url, scope)
        r = self.http.post("/auth/token", data=form)
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        return {"Authorization": f"Bearer {r.json()['access_token']}"}

    def subscription(self, sid: str, subscriber: str) -> None:
        self.store.save_subscription(
            SubscriptionRow(
                id=sid,
                subscriber=subscriber,
                recipient=f"Organization/{subscriber}",
                purpose="TREAT",
                criteria="Observation",
                channel="message",
                resource=b'{"resourceType": "Subscription"}',
            )
        )


@pytest.fixture
def ex(tmp_path: Path) -> Iterator[Exchange]:
    exchange = Exchange(tmp_path)
    exchange.register("admin", f"system/*.cruds {ADMIN_SCOPE}")
    exchange.register("st-marys", "system/Patient.cud", source=ST_MARYS)
    exchange.register("oakwood", "system/Subscription.crus", subscriber="Organization/oakwood")
    exchange.register("elm-house", "system/Subscription.crus", subscriber="elm-house")
    yield exchange
    exchange.store.engine.dispose()


def outcome(r: Any) -> dict[str, Any]:
    doc: dict[str, Any] = r.json()
    assert doc["resourceType"] == "OperationOutcome", doc
    return doc["issue"][0]


def test_the_open_endpoints(ex: Exchange) -> None:
    for path in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        config = ex.http.get(path).json()
        assert config["token_endpoint"] == f"{BASE}/auth/token"
        assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
        assert config["capabilities"] == ["client-confidential-asymmetric"]
        assert {"ES384", "RS384"} <= set(config["token_endpoint_auth_signing_alg_values_supported"])
        assert "system/Patient.rs" in config["scopes_supported"]
    [key] = ex.http.get("/auth/jwks").json()["keys"]
    assert key["kid"] and "d" not in key
    metadata = ex.http.get("/fhir/metadata")
    assert metadata.status_code == 200
    security = metadata.json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    assert security["extension"][0]["extension"] == [
        {"url": "token", "valueUri": f"{BASE}/auth/token"}
    ]
    validate_resource(metadata.json())
    r = ex.http.post("/auth/token", data={"grant_type": "client_credentials"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = ex.http.post("/auth/token", data={"grant_type": "authorization_code"})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


def test_refused_token_requests_are_audited(ex: Exchange) -> None:
    stranger = token_request("stranger", generate_key(), ex.settings.token_url, None)
    r = ex.http.post("/auth/token", data=stranger)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    [alert] = ex.sent
    event = orjson.loads(alert.value)
    assert alert.topic == TOPICS.audit and event["type"]["code"] == "110113"
    assert event["subtype"][0]["code"] == "token-refused"
    assert "client stranger is not registered" in event["outcomeDesc"]
    assert "identifier" not in event["agent"][0]["who"], "an unproven client id is no agent"
    validate_resource(event)
    ex.sent.clear()
    ex.token("st-marys")  # a granted token is no alert
    assert ex.sent == []


def test_token_requests_are_rate_limited_per_address(tmp_path: Path) -> None:
    ex = Exchange(tmp_path, auth_token_rate_limit="3/minute")
    ex.register("st-marys", "system/Patient.cud", source=ST_MARYS)
    for _ in range(3):
        ex.token("st-marys")
    form = token_request("st-marys", ex.keys["st-marys"], ex.settings.token_url, None)
    r = ex.http.post("/auth/token", data=form)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "too many token requests" in r.json()["error_description"]
    ex.store.engine.dispose()


def test_every_refused_request_is_audited_with_its_client(ex: Exchange) -> None:
    r = ex.http.get("/admin/publishers")
    assert r.status_code == 401
    r = ex.http.get("/admin/publishers", headers=ex.token("st-marys"))
    assert r.status_code == 403
    events = [orjson.loads(o.value) for o in ex.sent]
    assert [e["subtype"][0]["code"] for e in events] == ["unauthenticated", "forbidden"]
    assert "identifier" not in events[0]["agent"][0]["who"]
    assert events[1]["agent"][0]["who"]["identifier"]["value"] == "st-marys"
    assert events[1]["entity"][-1]["what"]["display"] == "GET /admin/publishers"


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/admin/publishers", ADMIN_SCOPE),
        ("POST", "/admin/publishers", ADMIN_SCOPE),
        ("GET", "/admin/clients", ADMIN_SCOPE),
        ("GET", "/admin/audit/verify", ADMIN_SCOPE),
        ("GET", "/fhir/AuditEvent?patient=Patient/p1", "system/AuditEvent.s"),
        ("POST", "/fhir/Subscription", "system/Subscription.c"),
        ("GET", "/fhir/Subscription/s1", "system/Subscription.r"),
        ("GET", "/fhir/Subscription/s1/$events", "system/Subscription.r"),
        ("POST", "/fhir/Observation", "system/Observation.c"),
        ("PUT", "/fhir/Observation/o1", "system/Observation.u"),
        ("DELETE", "/fhir/Observation/o1", "system/Observation.d"),
    ],
)
def test_no_token_is_401_and_a_missing_scope_403(
    ex: Exchange, method: str, path: str, scope: str
) -> None:
    r = ex.http.request(method, path, content=b"{}")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert outcome(r)["code"] == "login"
    r = ex.http.request(method, path, content=b"{}", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and outcome(r)["code"] == "login"
    r = ex.http.request(method, path, content=b"{}", headers=ex.token("st-marys"))
    assert r.status_code == 403, r.text
    assert outcome(r)["code"] == "forbidden" and scope in outcome(r)["diagnostics"]


def test_the_admin_manages_clients(ex: Exchange) -> None:
    admin = ex.token("admin")
    key = generate_key()
    entry = clients_file_entry("new-gp", key, "system/Patient.rs", source="urn:hdx:org:gp")
    assert ex.http.post("/admin/clients", json=entry, headers=admin).status_code == 201
    assert ex.http.post("/admin/clients", json=entry, headers=admin).status_code == 409
    listed = [c["client_id"] for c in ex.http.get("/admin/clients", headers=admin).json()]
    assert "new-gp" in listed
    r = ex.http.delete("/admin/clients/new-gp", headers=admin)
    assert r.status_code == 200 and r.json()["active"] is False
    form = token_request("new-gp", key, ex.settings.token_url, None)
    assert ex.http.post("/auth/token", data=form).json()["error"] == "invalid_client"
    bad = {**entry, "jwks": {"keys": [key.as_dict(private=True)]}}
    r = ex.http.put("/admin/clients/new-gp", json=bad, headers=admin)
    assert r.status_code == 400 and outcome(r)["severity"] == "error"


def test_a_publisher_publishes_as_itself_only_and_the_attempt_is_audited(ex: Exchange) -> None:
    token = ex.token("st-marys") | {"content-type": FHIR_JSON}
    body = orjson.dumps(ADA)
    r = ex.http.post("/fhir/Patient", content=body, headers=token)  # no ce-source: its own
    assert r.status_code == 202, r.text
    [accepted] = ex.sent
    assert accepted.topic == TOPICS.validated and accepted.headers["ce_source"] == ST_MARYS
    ex.sent.clear()

    r = ex.http.post("/fhir/Patient", content=body, headers=token | {"ce-source": RIVERSIDE})
    assert r.status_code == 403 and outcome(r)["code"] == "forbidden"
    [alert] = ex.sent
    assert alert.topic == TOPICS.audit
    event = orjson.loads(alert.value)
    assert event["resourceType"] == "AuditEvent" and event["outcome"] == "8"
    assert event["type"]["code"] == "110113"
    assert event["agent"][0]["who"]["identifier"]["value"] == "st-marys"
    claimed = [
        e["what"]["identifier"]["value"] for e in event["entity"] if "identifier" in e["what"]
    ]
    assert claimed == [RIVERSIDE, ST_MARYS]
    assert b"Lovelace" not in alert.value and b"sm-1" not in alert.value  # no patient data
    validate_resource(event)  # valid FHIR R4

    ex.sent.clear()
    r = ex.http.put("/fhir/Patient/sm-1", content=body, headers=token | {"ce-source": ST_MARYS})
    assert r.status_code == 202
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": {**ADA, "id": "sm-2"}}, {"resource": {**ADA, "id": "sm-3"}}],
    }
    r = ex.http.post("/fhir", content=orjson.dumps(bundle), headers=token | {"ce-source": "x"})
    assert r.status_code == 403


def test_a_client_without_a_source_cannot_publish(ex: Exchange) -> None:
    ex.register("gp-reader", "system/Patient.cruds")
    headers = ex.token("gp-reader") | {"content-type": FHIR_JSON, "ce-source": ST_MARYS}
    r = ex.http.post("/fhir/Patient", content=orjson.dumps(ADA), headers=headers)
    assert r.status_code == 403 and "not bound to a publisher" in outcome(r)["diagnostics"]
    assert [o.topic for o in ex.sent] == [TOPICS.audit]


def test_a_bundle_entry_needs_the_scope_for_its_type(ex: Exchange) -> None:
    token = ex.token("st-marys") | {"content-type": FHIR_JSON}
    obs = {"resourceType": "Observation", "id": "o1", "status": "final"}
    obs |= {"code": {"text": "x"}, "subject": {"reference": "Patient/sm-1"}}
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": obs}]}
    r = ex.http.post("/fhir", content=orjson.dumps(batch), headers=token)
    assert [e["response"]["status"] for e in r.json()["entry"]] == ["403"]
    r = ex.http.post("/fhir", content=orjson.dumps({**batch, "type": "transaction"}), headers=token)
    assert r.status_code == 403 and "system/Observation.u" in outcome(r)["diagnostics"]


def test_a_subscriber_sees_only_its_own_subscriptions(ex: Exchange) -> None:
    ex.subscription("s-oak", "oakwood")
    ex.subscription("s-elm", "elm-house")
    oak = ex.token("oakwood")
    assert ex.http.get("/fhir/Subscription/s-oak", headers=oak).status_code == 200
    assert ex.http.get("/fhir/Subscription/s-oak/$status", headers=oak).status_code == 200
    for path in ("", "/$status", "/$events"):
        r = ex.http.get(f"/fhir/Subscription/s-elm{path}", headers=oak)
        assert r.status_code == 403 and "elm-house" in outcome(r)["diagnostics"]
    found = ex.http.get("/fhir/Subscription", headers=oak).json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["s-oak"]
    r = ex.http.get("/fhir/Subscription", params={"subscriber": "elm-house"}, headers=oak)
    assert r.status_code == 403
    sub = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "x",
        "criteria": "Observation",
        "extension": [
            {
                "url": "https://hdx.example.org/fhir/StructureDefinition/recipient",
                "valueReference": {"reference": "Organization/elm-house"},
            }
        ],
        "channel": {"type": "message", "payload": "application/fhir+json"},
    }
    r = ex.http.post(
        "/fhir/Subscription", content=orjson.dumps(sub), headers=oak | {"content-type": FHIR_JSON}
    )
    assert r.status_code == 403
    admin = ex.token("admin", "system/Subscription.rs system/hdx-admin")
    assert ex.http.get("/fhir/Subscription/s-elm", headers=admin).status_code == 200


def test_the_audit_trail_needs_its_scope(ex: Exchange) -> None:
    ex.register("auditor", "system/AuditEvent.s")
    r = ex.http.get(
        "/fhir/AuditEvent", params={"patient": "Patient/p1"}, headers=ex.token("auditor")
    )
    assert r.status_code == 200 and r.json()["total"] == 0


def test_deactivating_a_client_or_replacing_its_keys_revokes_its_tokens(ex: Exchange) -> None:
    admin = ex.token("admin")
    held = ex.token("oakwood")
    assert ex.http.get("/fhir/Subscription", headers=held).status_code == 200
    r = ex.http.delete("/admin/clients/oakwood", headers=admin)
    assert r.status_code == 200
    r = ex.http.get("/fhir/Subscription", headers=held)
    assert r.status_code == 401 and "revoked" in outcome(r)["diagnostics"]
    assert "oakwood" in ex.http.get("/auth/revoked").json()["revoked"]

    # Reactivated: the token it held stays void; a new one works.
    entry = clients_file_entry(
        "oakwood", ex.keys["oakwood"], "system/Subscription.crus", subscriber="Organization/oakwood"
    )
    assert ex.http.put("/admin/clients/oakwood", json=entry, headers=admin).status_code == 200
    assert ex.http.get("/fhir/Subscription", headers=held).status_code == 401
    fresh = ex.token("oakwood")
    assert ex.http.get("/fhir/Subscription", headers=fresh).status_code == 200

    # New keys (the old private key may be in the wrong hands): every token so far is void.
    ex.keys["oakwood"] = generate_key()
    entry = clients_file_entry(
        "oakwood", ex.keys["oakwood"], "system/Subscription.crus", subscriber="Organization/oakwood"
    )
    assert ex.http.put("/admin/clients/oakwood", json=entry, headers=admin).status_code == 200
    assert ex.http.get("/fhir/Subscription", headers=fresh).status_code == 401
    assert ex.http.get("/fhir/Subscription", headers=ex.token("oakwood")).status_code == 200
    # An update that changes neither keys nor activity revokes nothing.
    kept = ex.token("oakwood")
    assert ex.http.put("/admin/clients/oakwood", json=entry, headers=admin).status_code == 200
    assert ex.http.get("/fhir/Subscription", headers=kept).status_code == 200


def test_a_bundle_posted_over_rest_is_parsed_once(
    ex: Exchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One JSON parse per message per hop: the transaction is validated, and a batch's
    entries are split, from the document parsed to read the Bundle's type."""
    parses: list[int] = []
    original = fhir.parse_json

    def counting(raw: bytes, limits: Limits) -> dict[str, Any]:
        parses.append(len(raw))
        return original(raw, limits)

    monkeypatch.setattr(fhir, "parse_json", counting)
    monkeypatch.setattr(rest_publish, "parse_json", counting)
    ex.register("obs", "system/Observation.cu", source=ST_MARYS)
    token = ex.token("obs") | {"content-type": FHIR_JSON}
    entries = [
        {
            "resource": {
                "resourceType": "Observation",
                "id": f"o{i}",
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": f"Patient/sm-{i}"},
            },
            "request": {"method": "PUT", "url": f"Observation/o{i}"},
        }
        for i in range(3)
    ]
    for kind in ("transaction", "batch"):
        parses.clear()
        bundle = {"resourceType": "Bundle", "type": kind, "entry": entries}
        r = ex.http.post("/fhir", content=orjson.dumps(bundle), headers=token)
        assert r.status_code == 200, r.text
        assert [e["response"]["status"] for e in r.json()["entry"]] == ["202 Accepted"] * 3
        assert len(parses) == 1, f"{kind}: parsed {len(parses)} times"


def test_a_registered_publishers_topic_gets_the_partitions_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[TopicSpec] = []

    async def ensure_topics(settings: Any, specs: Sequence[TopicSpec]) -> list[str]:
        created.extend(specs)
        return [s.name for s in specs]

    monkeypatch.setattr(api, "ensure_topics", ensure_topics)
    ex = Exchange(tmp_path, publisher_topic_partitions=2)
    ex.register("admin", f"system/*.cruds {ADMIN_SCOPE}")
    body = {"source": "urn:hdx:org:elm", "name": "Elm", "patient_identifier_system": "urn:elm"}
    r = ex.http.post(
        "/admin/publishers", json=body | {"topic_name": "elm"}, headers=ex.token("admin")
    )
    assert r.status_code == 201, r.text
    assert [(s.name, s.partitions) for s in created] == [("hdx.inbound.elm", 2)]
    ex.store.engine.dispose()
