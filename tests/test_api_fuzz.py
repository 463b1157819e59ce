"""Schemathesis against each service's OpenAPI, in-process and authorised: no generated
request gets a 5xx (SQLite in a temporary directory; the exchange's Subscriptions need the
session's broker for their feed topics). HDX_FUZZ_EXAMPLES=500 explores deeper."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings

from hdx_consent.api import build_router as consent_router
from hdx_consent.domain import Policy
from hdx_consent.service import ConsentService
from hdx_consent.settings import ConsentSettings
from hdx_consent.store import ConsentStore
from hdx_exchange.api import build_routers
from hdx_exchange.audit_log import AuditLog
from hdx_exchange.domain.ingress import Publisher
from hdx_exchange.oauth import AuthorizationServer, auth_routers, verification_keys
from hdx_exchange.pipeline import Registry
from hdx_exchange.rest_publish import publishing_router
from hdx_exchange.settings import ExchangeSettings
from hdx_exchange.store import ExchangeStore
from hdx_patient_index.api import build_router as patient_index_router
from hdx_patient_index.domain.identifiers import TrustedSystems
from hdx_patient_index.domain.matching import Matcher
from hdx_patient_index.service import PatientIndexService
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.auth import ADMIN_SCOPE, IDENTITY_SCOPE, LocalTokens, TokenIssuer, install_auth
from hdx_shared.db import make_engine
from hdx_shared.embedded_broker import BrokerEndpoint
from hdx_shared.fhir import Limits
from hdx_shared.http import FhirResponse, install_fhir_errors
from hdx_shared.messaging import Outgoing
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics

TOKENS = LocalTokens.generate()
EVERYTHING = TOKENS.headers(f"system/*.cruds {ADMIN_SCOPE} {IDENTITY_SCOPE}", "fuzzer")


EXAMPLES = int(os.environ.get("HDX_FUZZ_EXAMPLES", "25"))


def assert_no_server_errors(
    app: FastAPI, headers: dict[str, str], *, max_examples: int = EXAMPLES, skip: Iterable[str] = ()
) -> None:
    """Every operation of the app's OpenAPI (but `skip`), generated requests with these
    headers: never a 5xx. Hypothesis shrinks and reports the first that is."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 3, "the OpenAPI lists the service's operations"
    for operation in operations:
        if operation.label in set(skip):
            continue

        @given(case=operation.as_strategy())
        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def no_server_error(case: Any) -> None:
            r = case.call(headers=headers)
            assert r.status_code < 500, f"{case.method} {case.formatted_path}: {r.text[:300]}"

        no_server_error()


def _app(*routers: Any) -> FastAPI:
    app = FastAPI(default_response_class=FhirResponse)
    install_fhir_errors(app)
    install_auth(app, TOKENS.authenticator())
    for router in routers:
        app.include_router(router)
    return app


async def _nowhere(_out: Sequence[Outgoing]) -> None:
    return None


async def test_consent(tmp_path: Path) -> None:
    store = ConsentStore(make_engine(ConsentSettings(data_dir=tmp_path)))
    service = ConsentService(store, Policy(), Topics("hdx."), _nowhere)
    await service.load()
    assert_no_server_errors(_app(consent_router(service)), EVERYTHING)


def test_patient_index(tmp_path: Path) -> None:
    store = PatientIndexStore(make_engine(HdxSettings(data_dir=tmp_path)))
    service = PatientIndexService(store, Matcher(), TrustedSystems())
    assert service.load()
    assert_no_server_errors(_app(patient_index_router(service, "http://pix.test/fhir")), EVERYTHING)


@pytest.mark.broker
def test_exchange(tmp_path: Path, kafka: BrokerEndpoint) -> None:
    settings = ExchangeSettings(
        environment="test",
        data_dir=tmp_path,
        **kafka.client_settings,
        topic_prefix="fuzz.",
    )
    store = ExchangeStore(make_engine(settings))
    store.create_schema()
    store.put_publisher(Publisher("urn:hdx:org:fuzz", "fuzz", "urn:hdx:org:fuzz/id"))
    registry = Registry(store)
    registry.refresh()
    topics = Topics("fuzz.")
    key = TOKENS.issuer.key
    server = AuthorizationServer(store, TokenIssuer(key, "x", "y"), settings.token_url)
    app = _app(
        *auth_routers(server, settings, verification_keys(settings, key)),
        *build_routers(store, registry, topics, settings, AuditLog(store, topics, settings)),
        publishing_router(registry, topics, Limits(), _nowhere),
    )
    assert_no_server_errors(app, EVERYTHING, max_examples=max(EXAMPLES // 2, 10))
