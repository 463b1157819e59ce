"""Every refused request leaves a security-alert AuditEvent (after IHE BALP), at most so many
per caller and kind: what hdx_shared.http.SecurityAlerts writes, and when."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

import orjson
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from limits import parse_many

from hdx_shared.auth import (
    Authenticator,
    Caller,
    StaticKeys,
    TokenIssuer,
    TokenVerifier,
    forbidden,
    generate_key,
    install_auth,
    require_scope,
)
from hdx_shared.fhir import validate_resource
from hdx_shared.http import SECURITY_ALERTS_SUPPRESSED, SecurityAlerts, install_fhir_errors
from hdx_shared.messaging import Outgoing
from hdx_shared.scopes import ScopeSet
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics

ISSUER, AUDIENCE = "http://hdx.test", "urn:hdx:api"
Creator = Annotated[Caller, Depends(require_scope("system/Patient.c"))]


Publish = Callable[[Sequence[Outgoing]], Awaitable[None]]


class Service:
    def __init__(self, alert_limit: str = "30/minute", publish: Publish | None = None) -> None:
        self.sent: list[Outgoing] = []
        self.issuer = TokenIssuer(generate_key(), ISSUER, AUDIENCE)
        verifier = TokenVerifier(ISSUER, AUDIENCE, StaticKeys(self.issuer.key_set()))

        async def record(records: Sequence[Outgoing]) -> None:
            self.sent.extend(records)

        publish = publish or record
        settings = HdxSettings(environment="test", service_name="consent")
        alerts = SecurityAlerts(settings, Topics("hdx."), publish, parse_many(alert_limit))
        app = FastAPI()
        install_fhir_errors(app, on_refused=alerts.refused)
        install_auth(app, Authenticator(verifier, parse_many("1000/second")))

        @app.post("/fhir/Patient")
        async def create(caller: Creator) -> dict[str, str]:
            return {"client": caller.client_id}

        @app.post("/already-audited")
        async def audited(caller: Creator) -> None:
            error = forbidden("recorded where it was raised")
            error.audited = True
            raise error

        self.http = TestClient(app)

    def token(self, scope: str) -> dict[str, str]:
        token = self.issuer.issue("gp-1", ScopeSet.parse(scope))
        return {"Authorization": f"Bearer {token}"}

    def alerts(self) -> list[dict[str, Any]]:
        return [orjson.loads(o.value) for o in self.sent]


def test_a_request_without_a_valid_token_is_an_alert_without_a_client() -> None:
    svc = Service()
    assert svc.http.post("/fhir/Patient").status_code == 401
    assert svc.http.post("/fhir/Patient", headers={"Authorization": "Bearer x"}).status_code == 401
    assert [o.topic for o in svc.sent] == ["hdx.audit", "hdx.audit"]
    event = svc.alerts()[0]
    validate_resource(event)
    assert event["type"]["code"] == "110113" and event["outcome"] == "8"
    assert event["subtype"] == [{"system": "urn:hdx:audit", "code": "unauthenticated"}]
    agent = event["agent"][0]
    assert "identifier" not in agent["who"] and agent["network"]["address"] == "testclient"
    assert event["source"]["observer"]["identifier"]["value"] == "consent"
    assert event["entity"][0]["what"]["display"] == "POST /fhir/Patient"


def test_a_token_without_the_scope_is_an_alert_naming_the_client() -> None:
    svc = Service()
    assert svc.http.post("/fhir/Patient", headers=svc.token("system/Patient.c")).status_code == 200
    assert svc.sent == []  # allowed: nothing to record
    r = svc.http.post("/fhir/Patient", headers=svc.token("system/Patient.r"))
    assert r.status_code == 403
    [event] = svc.alerts()
    assert event["subtype"] == [{"system": "urn:hdx:audit", "code": "forbidden"}]
    who = event["agent"][0]["who"]
    assert who["identifier"] == {"system": "urn:hdx:client", "value": "gp-1"}
    assert "system/Patient.c" in str(event["outcomeDesc"])


def test_a_refusal_recorded_where_it_was_raised_is_not_recorded_twice() -> None:
    svc = Service()
    r = svc.http.post("/already-audited", headers=svc.token("system/Patient.c"))
    assert r.status_code == 403 and svc.sent == []


def test_a_flood_is_counted_not_written() -> None:
    svc = Service(alert_limit="3/minute")
    before = SECURITY_ALERTS_SUPPRESSED.labels("unauthenticated")._value.get()
    for _ in range(10):
        assert svc.http.post("/fhir/Patient").status_code == 401
    assert len(svc.sent) == 3
    after = SECURITY_ALERTS_SUPPRESSED.labels("unauthenticated")._value.get()
    assert after - before == 7
    # Another kind, or another caller, has its own allowance.
    svc.http.post("/fhir/Patient", headers=svc.token("system/Patient.r"))
    assert len(svc.sent) == 4


def test_a_broker_that_does_not_take_the_alert_does_not_change_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def down(_records: Sequence[Outgoing]) -> None:
        raise ConnectionError("broker down")

    svc = Service(publish=down)
    with caplog.at_level("WARNING"):
        assert svc.http.post("/fhir/Patient").status_code == 401
    assert "not recorded" in caplog.text and "broker down" in caplog.text
