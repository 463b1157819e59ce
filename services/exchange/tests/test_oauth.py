"""The authorization server: access tokens for valid client assertions, and every way a
token request is refused (RFC 6749 errors), on SQLite and PostgreSQL."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from joserfc import jwt
from pydantic import ValidationError

from hdx_exchange.oauth import (
    AuthorizationServer,
    ClientIn,
    OAuthError,
    load_clients_file,
    signing_key,
)
from hdx_exchange.settings import ExchangeSettings
from hdx_exchange.store import ExchangeStore
from hdx_shared.auth import (
    ALGORITHMS,
    CLIENT_ASSERTION_TYPE,
    Key,
    StaticKeys,
    TokenIssuer,
    TokenVerifier,
    client_assertion,
    clients_file_entry,
    generate_key,
    private_pem,
)

TOKEN_URL = "https://hdx.test/auth/token"
ISSUER, AUDIENCE = "https://hdx.test", "urn:hdx:api"
SCOPE = "system/Patient.cud system/Observation.cud"


class World:
    def __init__(self, store: ExchangeStore) -> None:
        self.store = store
        self.hdx_key = generate_key()
        self.server = AuthorizationServer(
            store, TokenIssuer(self.hdx_key, ISSUER, AUDIENCE), TOKEN_URL
        )
        self.key = generate_key()
        self.register("st-marys", self.key, source="urn:hdx:org:st-marys")

    def register(self, client_id: str, key: Key, active: bool = True, **bindings: str) -> None:
        entry = clients_file_entry(client_id, key, SCOPE, **bindings)
        self.store.put_client(ClientIn.model_validate({**entry, "active": active}).row())

    def form(self, assertion: str | None = None, scope: str | None = None) -> dict[str, str]:
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion or client_assertion("st-marys", self.key, TOKEN_URL),
        }
        if scope is not None:
            form["scope"] = scope
        return form

    def refused(self, form: dict[str, str], error: str, status: int | None = None) -> str:
        with pytest.raises(OAuthError) as caught:
            self.server.token(form)
        assert caught.value.error == error, caught.value
        assert caught.value.status == (status or (401 if error == "invalid_client" else 400))
        body = orjson.loads(caught.value.response().body)
        assert body == {"error": error, "error_description": caught.value.description}
        return caught.value.description


@pytest.fixture
def world(store: ExchangeStore) -> World:
    return World(store)


def assertion(key: Key, header: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": "st-marys",
        "sub": "st-marys",
        "aud": TOKEN_URL,
        "iat": now,
        "exp": now + 240,
        "jti": str(uuid.uuid4()),
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(header or {"alg": "ES384", "kid": key.kid}, body, key, algorithms=ALGORITHMS)


async def test_a_valid_assertion_gets_a_short_lived_token_with_its_bindings(world: World) -> None:
    answer = world.server.token(world.form(scope="system/Patient.c system/Consent.r"))
    assert answer["token_type"] == "bearer" and answer["expires_in"] == 300
    assert answer["scope"] == "system/Patient.c"  # requested ∩ registered
    verifier = TokenVerifier(ISSUER, AUDIENCE, StaticKeys(world.server.issuer.key_set()))
    caller = await verifier.verify(answer["access_token"])
    assert caller.client_id == "st-marys" and caller.source == "urn:hdx:org:st-marys"
    assert str(caller.scopes) == "system/Patient.c"
    token = jwt.decode(answer["access_token"], world.server.issuer.key_set(), ALGORITHMS)
    claims = token.claims
    assert claims["exp"] - claims["iat"] == 300 and claims["jti"]
    # No scope asked for: everything registered.
    assert world.server.token(world.form())["scope"] == SCOPE


def test_the_grant_and_assertion_type_must_be_right(world: World) -> None:
    world.refused({**world.form(), "grant_type": "password"}, "unsupported_grant_type")
    world.refused({**world.form(), "client_assertion_type": "secret"}, "invalid_client")
    world.refused({**world.form(), "client_assertion": "not-a-jwt"}, "invalid_client")


def test_an_expired_or_too_long_assertion_is_refused(world: World) -> None:
    past = int(time.time()) - 600
    world.refused(world.form(assertion(world.key, iat=past, exp=past + 60)), "invalid_client")
    too_long = assertion(world.key, exp=int(time.time()) + 3600)
    assert "300 s" in world.refused(world.form(too_long), "invalid_client")
    world.refused(world.form(assertion(world.key, exp=None)), "invalid_client")


def test_the_audience_must_be_the_token_endpoint(world: World) -> None:
    wrong = assertion(world.key, aud="https://elsewhere.test/token")
    world.refused(world.form(wrong), "invalid_client")


def test_iss_and_sub_must_both_be_the_client(world: World) -> None:
    world.refused(world.form(assertion(world.key, sub="riverside")), "invalid_client")


def test_a_wrong_key_or_an_unknown_kid_is_refused(world: World) -> None:
    other = generate_key()
    # Signed by another key but naming the registered key's id: the signature fails.
    world.refused(
        world.form(assertion(other, {"alg": "ES384", "kid": world.key.kid})), "invalid_client"
    )
    world.refused(world.form(assertion(other)), "invalid_client")  # a kid nobody registered


def test_a_jti_is_used_once(world: World) -> None:
    form = world.form()
    world.server.token(form)
    assert "used before" in world.refused(form, "invalid_client")


def test_an_unregistered_or_inactive_client_is_refused(world: World) -> None:
    stranger = generate_key()
    world.refused(world.form(assertion(stranger, iss="x-1", sub="x-1")), "invalid_client")
    world.register("gone", stranger, active=False)
    world.refused(world.form(assertion(stranger, iss="gone", sub="gone")), "invalid_client")


def test_scopes_it_is_not_registered_for_are_not_granted(world: World) -> None:
    world.refused(world.form(scope="system/Consent.cruds"), "invalid_scope")
    world.refused(world.form(scope="system/hdx-admin"), "invalid_scope")
    world.refused(world.form(scope="system/Patient.zz"), "invalid_scope")
    assert world.server.token(world.form(scope="system/*.cruds"))["scope"] == SCOPE


def test_registrations_take_public_keys_and_valid_scopes_only(tmp_path: Path) -> None:
    key = generate_key()
    entry = clients_file_entry("c-1", key, SCOPE, subscriber="Organization/oakwood")
    assert ClientIn.model_validate(entry).subscriber == "oakwood"
    private = {"keys": [{**key.as_dict(private=True), "kid": key.kid}]}
    for bad in ({"jwks": private}, {"scope": "everything"}, {"client_id": "a b"}):
        with pytest.raises(ValidationError):
            ClientIn.model_validate({**entry, **bad})


def test_the_clients_file_creates_and_updates(world: World, tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "clients.json"
    path.write_bytes(orjson.dumps([clients_file_entry("admin-1", key, "system/hdx-admin")]))
    assert load_clients_file(world.store, path) == 1
    path.write_bytes(orjson.dumps([clients_file_entry("admin-1", key, "system/*.rs")]))
    load_clients_file(world.store, path)
    row = world.store.client("admin-1")
    assert row is not None and row.scope == "system/*.rs"


def test_the_signing_key_comes_from_settings_or_development_only(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="HDX_AUTH_SIGNING_KEY"):
        ExchangeSettings(environment="production", data_dir=tmp_path)
    with pytest.raises(RuntimeError, match="only development"):
        signing_key(ExchangeSettings(environment="test", data_dir=tmp_path))
    made = signing_key(ExchangeSettings(environment="development", data_dir=tmp_path))
    path = tmp_path / "auth" / "signing-key.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    again = signing_key(ExchangeSettings(environment="development", data_dir=tmp_path))
    assert again.kid == made.kid  # generated once, then kept
    pem = private_pem(generate_key()).decode()
    given = signing_key(ExchangeSettings(environment="production", auth_signing_key=pem))
    assert given.kid != made.kid
    assert pem not in repr(ExchangeSettings(environment="production", auth_signing_key=pem))
