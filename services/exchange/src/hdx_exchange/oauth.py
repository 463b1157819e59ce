"""The exchange's authorization server: OAuth 2.0 client credentials with private_key_jwt
client authentication, as SMART Backend Services has it (docs/security.md).

A client is registered with its public keys (an inline JWKS), the scopes it may be granted
and what it is bound to (a publisher source, a subscriber organization). It POSTs to
``/auth/token`` a client assertion — a JWT it signed, iss = sub = its client id, aud = the
token endpoint's URL, exp at most five minutes ahead, a jti never used before — and gets an
access token signed by HDX with the scopes it asked for that it is registered for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import extract_compact
from limits import parse_many
from pydantic import BaseModel, Field, field_validator

from hdx_exchange.domain.subscriptions import subscriber_id
from hdx_exchange.models import ClientRow
from hdx_exchange.settings import ExchangeSettings
from hdx_exchange.store import ExchangeStore
from hdx_shared.auth import (
    ADMIN_SCOPE,
    ALGORITHMS,
    CLIENT_ASSERTION_TYPE,
    IDENTITY_SCOPE,
    LEEWAY_SECONDS,
    MAX_ASSERTION_SECONDS,
    Key,
    RateLimit,
    TokenIssuer,
    generate_key,
    load_private_key,
    private_pem,
    public_jwk,
    public_key_set,
    require_scope,
)
from hdx_shared.http import SecurityAlerts
from hdx_shared.scopes import ScopeError, ScopeSet

log = logging.getLogger(__name__)

# What the smart-configuration advertises (the scopes HDX's endpoints check).
SCOPES_SUPPORTED = [
    "system/Patient.rs",
    "system/Consent.cruds",
    "system/Subscription.crus",
    "system/AuditEvent.s",
    "system/*.cud",
    "system/*.rs",
    ADMIN_SCOPE,
    IDENTITY_SCOPE,
]


class OAuthError(Exception):
    """An RFC 6749 error response."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status

    def response(self) -> Response:
        return Response(
            orjson.dumps({"error": self.error, "error_description": self.description}),
            status_code=self.status,
            media_type="application/json",
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )


def invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401)


# ---- HDX's signing key ------------------------------------------------------------------------


def signing_key(settings: ExchangeSettings) -> Key:
    """HDX's token signing key: from the settings; in development only, generated once
    into <data_dir>/auth/signing-key.pem when none is given."""
    if settings.auth_signing_key is not None:
        return load_private_key(settings.auth_signing_key.get_secret_value())
    if settings.auth_signing_key_file is not None:
        return load_private_key(settings.auth_signing_key_file.read_bytes())
    if settings.environment != "development":
        raise RuntimeError(
            "no token signing key: set HDX_AUTH_SIGNING_KEY or HDX_AUTH_SIGNING_KEY_FILE "
            "(only development generates one)"
        )
    path = settings.data_dir / "auth" / "signing-key.pem"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem(generate_key()))
        log.warning("development: generated a token signing key in %s", path)
    return load_private_key(path.read_bytes())


def verification_keys(settings: ExchangeSettings, key: Key) -> KeySet:
    """The keys HDX's tokens are checked with: the signing key and any retired ones."""
    keys = KeySet([key])
    if settings.auth_retired_keys:
        keys.keys += KeySet.import_key_set(orjson.loads(settings.auth_retired_keys)).keys
    return keys


def published_jwks(keys: KeySet) -> dict[str, Any]:
    return {"keys": [public_jwk(k) for k in keys.keys]}  # type: ignore[arg-type]


# ---- client registrations ---------------------------------------------------------------------


class ClientIn(BaseModel):
    """A client registration (POST /admin/clients, HDX_AUTH_CLIENTS_FILE)."""

    client_id: str = Field(min_length=3, max_length=200, pattern=r"^[A-Za-z0-9._:\-/]+$")
    name: str = Field(min_length=1, max_length=200)
    jwks: dict[str, Any] = Field(description="the client's public keys (JWKS), each with kid")
    scope: str = Field(min_length=1, description="the most it may be granted, space-separated")
    source: str | None = Field(default=None, description="the publisher source it is bound to")
    subscriber: str | None = Field(
        default=None, description="the organization it subscribes for: Organization/<id> or id"
    )
    active: bool = True

    @field_validator("jwks")
    @classmethod
    def _jwks(cls, value: dict[str, Any]) -> dict[str, Any]:
        public_key_set(value)
        return value

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str) -> str:
        try:
            return str(ScopeSet.parse(value))
        except ScopeError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("subscriber")
    @classmethod
    def _subscriber(cls, value: str | None) -> str | None:
        return subscriber_id(value) if value else None

    def row(self) -> ClientRow:
        return ClientRow(
            client_id=self.client_id,
            name=self.name,
            jwks=orjson.dumps(self.jwks),
            scope=self.scope,
            source=self.source,
            subscriber=self.subscriber,
            active=self.active,
        )

    @classmethod
    def of(cls, row: ClientRow) -> ClientIn:
        return cls(
            client_id=row.client_id,
            name=row.name,
            jwks=orjson.loads(row.jwks),
            scope=row.scope,
            source=row.source,
            subscriber=row.subscriber,
            active=row.active,
        )


def load_clients_file(store: ExchangeStore, path: Path) -> int:
    """Create or update the registrations in a JSON file (a list of ClientIn)."""
    entries = orjson.loads(path.read_bytes())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a JSON list of client registrations")
    for entry in entries:
        store.put_client(ClientIn.model_validate(entry).row())
    log.info("loaded %d client registrations from %s", len(entries), path)
    return len(entries)


# ---- the token endpoint -------------------------------------------------------------------------


@dataclass
class AuthorizationServer:
    store: ExchangeStore
    issuer: TokenIssuer
    token_url: str

    def token(self, form: Mapping[str, str], now: int | None = None) -> dict[str, Any]:
        """The token response for a token request, or OAuthError."""
        issued = now  # None: the token says the very millisecond (revocations compare it)
        now = int(time.time()) if now is None else now
        if form.get("grant_type") != "client_credentials":
            raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise invalid_client(f"client_assertion_type must be {CLIENT_ASSERTION_TYPE}")
        assertion = form.get("client_assertion") or ""
        try:
            unverified = orjson.loads(extract_compact(assertion.encode()).payload)
            client_id = unverified["iss"]
            if not isinstance(client_id, str):
                raise TypeError("iss")
        except (JoseError, ValueError, TypeError, KeyError, orjson.JSONDecodeError):
            raise invalid_client("client_assertion is not a signed JWT with an iss") from None
        row = self.store.client(client_id)
        if row is None or not row.active:
            raise invalid_client(f"client {client_id} is not registered or not active")
        try:
            decoded = jwt.decode(assertion, public_key_set(orjson.loads(row.jwks)), ALGORITHMS)
        except JoseError as exc:
            raise invalid_client(
                f"the client assertion's signature does not verify ({exc.error})"
            ) from None
        claims = decoded.claims
        try:
            jwt.JWTClaimsRegistry(
                now=now,
                leeway=LEEWAY_SECONDS,
                iss={"essential": True, "value": client_id},
                sub={"essential": True, "value": client_id},
                aud={"essential": True, "value": self.token_url},
                exp={"essential": True},
                jti={"essential": True},
            ).validate(claims)
        except JoseError as exc:
            raise invalid_client(f"client assertion: {exc.description or exc.error}") from None
        exp = claims["exp"]
        if not isinstance(exp, int) or exp > now + MAX_ASSERTION_SECONDS + LEEWAY_SECONDS:
            raise invalid_client(
                f"client assertion: exp must be at most {MAX_ASSERTION_SECONDS} s ahead"
            )
        try:
            requested = ScopeSet.parse(form.get("scope") or "")
        except ScopeError as exc:
            raise OAuthError("invalid_scope", str(exc)) from None
        registered = ScopeSet.parse(row.scope)
        granted = registered.narrow(requested) if requested else registered
        if not granted:
            raise OAuthError(
                "invalid_scope", f"none of the requested scopes is registered for {client_id}"
            )
        # Last: only an assertion that passed everything uses up its jti.
        if not self.store.use_assertion_jti(
            client_id, str(claims["jti"]), datetime.fromtimestamp(exp, UTC)
        ):
            raise invalid_client("client assertion: this jti was used before")
        token = self.issuer.issue(
            client_id, granted, source=row.source, subscriber=row.subscriber, now=issued
        )
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.issuer.lifetime_seconds,
            "scope": str(granted),
        }


def smart_configuration(settings: ExchangeSettings) -> dict[str, Any]:
    return {
        "issuer": settings.auth_issuer,
        "jwks_uri": settings.jwks_url,
        "token_endpoint": settings.token_url,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ALGORITHMS,
        "scopes_supported": SCOPES_SUPPORTED,
        "capabilities": ["client-confidential-asymmetric"],
    }


def auth_routers(
    server: AuthorizationServer, settings: ExchangeSettings, verification: KeySet
) -> list[APIRouter]:
    """The open endpoints (token, keys, configuration) and the client registry (admin)."""
    open_router = APIRouter(tags=["authorization"])
    jwks = published_jwks(verification)
    token_limit = RateLimit(parse_many(settings.auth_token_rate_limit))

    def too_many(address: str) -> Response | None:
        """429 when this address is over its token request limit."""
        if (over := token_limit.retry_after("token", address)) is None:
            return None
        item, retry = over
        response = OAuthError(
            "invalid_request", f"too many token requests from {address} ({item})", 429
        ).response()
        response.headers["Retry-After"] = str(retry)
        return response

    @open_router.post("/auth/token")
    async def token(request: Request) -> Response:
        """OAuth 2.0 client credentials with a private_key_jwt client assertion
        (application/x-www-form-urlencoded). A refused request leaves a security alert."""
        if (throttled := too_many(request.client.host if request.client else "?")) is not None:
            return throttled
        if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            return OAuthError(
                "invalid_request", "the body must be application/x-www-form-urlencoded"
            ).response()
        try:
            form = dict(parse_qsl((await request.body()).decode(), strict_parsing=False))
            body = await asyncio.to_thread(server.token, form)
        except UnicodeDecodeError:
            return OAuthError("invalid_request", "the body is not UTF-8").response()
        except OAuthError as exc:
            log.info("token request refused: %s", exc.error)
            alerts: SecurityAlerts | None = getattr(request.app.state, "hdx_security_alerts", None)
            if alerts is not None:  # the claimed client id is in the description, unproven
                await alerts.record(
                    request, "token-refused", f"{exc.error}: {exc.description}", client_id=None
                )
            return exc.response()
        return Response(
            orjson.dumps(body),
            media_type="application/json",
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    @open_router.get("/auth/revoked")
    async def revoked() -> Response:
        """Which clients' tokens are revoked, and from when: `{"revoked": {client id: epoch
        milliseconds}}` — a token of that client issued before then is refused by every
        service (they fetch this every HDX_AUTH_REVOCATION_REFRESH_SECONDS)."""
        body = {"revoked": await asyncio.to_thread(server.store.revoked_tokens)}
        return Response(
            orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"}
        )

    @open_router.get("/auth/jwks")
    async def keys() -> Response:
        """HDX's public token signing keys."""
        return Response(orjson.dumps(jwks), media_type="application/jwk-set+json")

    @open_router.get("/.well-known/smart-configuration")
    @open_router.get("/fhir/.well-known/smart-configuration")
    async def configuration() -> Response:
        """SMART configuration: where the token endpoint is and what it supports."""
        return Response(orjson.dumps(smart_configuration(settings)), media_type="application/json")

    admin = APIRouter(
        prefix="/admin/clients",
        tags=["clients"],
        dependencies=[Depends(require_scope(ADMIN_SCOPE))],
    )

    @admin.get("")
    async def list_clients() -> list[ClientIn]:
        return [ClientIn.of(r) for r in await asyncio.to_thread(server.store.clients)]

    @admin.get("/{client_id}")
    async def read_client(client_id: str) -> ClientIn:
        row = await asyncio.to_thread(server.store.client, client_id)
        if row is None:
            raise HTTPException(404, f"client {client_id} is not registered")
        return ClientIn.of(row)

    @admin.post("", status_code=201)
    async def create_client(body: ClientIn) -> ClientIn:
        """Register a client (409 if the id is taken: PUT updates)."""
        if await asyncio.to_thread(server.store.client, body.client_id) is not None:
            raise HTTPException(409, f"client {body.client_id} is already registered")
        await asyncio.to_thread(server.store.put_client, body.row())
        return body

    @admin.put("/{client_id}")
    async def update_client(client_id: str, body: ClientIn) -> ClientIn:
        """Create or replace a registration (keys, scopes, bindings, active)."""
        if body.client_id != client_id:
            raise HTTPException(400, "the body's client_id must be the URL's")
        await asyncio.to_thread(server.store.put_client, body.row())
        return body

    @admin.delete("/{client_id}")
    async def deactivate_client(client_id: str) -> ClientIn:
        """Deactivate: no new tokens, and those it holds are revoked (GET /auth/revoked)."""
        row = await asyncio.to_thread(server.store.client, client_id)
        if row is None:
            raise HTTPException(404, f"client {client_id} is not registered")
        row.active = False
        await asyncio.to_thread(server.store.put_client, row)
        return ClientIn.of(row)

    return [open_router, admin]
