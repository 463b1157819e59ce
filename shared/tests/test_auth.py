"""Access tokens as every service checks them: the verifier and its rejections, the issuer's
keys fetched and refreshed, the per-client rate limit, the request-size limit and the
development-only off switch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from joserfc import jwt
from pydantic import ValidationError

from hdx_shared.auth import (
    ALGORITHMS,
    Authenticator,
    Caller,
    LocalTokens,
    RemoteJwks,
    Revocations,
    StaticKeys,
    TokenIssuer,
    TokenVerifier,
    generate_key,
    install_auth,
    load_private_key,
    private_pem,
    public_jwk,
    public_key_set,
    require_scope,
)
from hdx_shared.fhir import FhirError
from hdx_shared.http import BodyLimit, install_fhir_errors
from hdx_shared.messaging import Unavailable
from hdx_shared.scopes import ScopeSet
from hdx_shared.settings import HdxSettings

ISSUER, AUDIENCE = "http://hdx.test", "urn:hdx:api"
Creator = Annotated[Caller, Depends(require_scope("system/Patient.c"))]
SCOPES = ScopeSet.parse("system/Patient.rs")


def verifier_for(issuer: TokenIssuer) -> TokenVerifier:
    return TokenVerifier(ISSUER, AUDIENCE, StaticKeys(issuer.key_set()))


async def test_a_valid_token_names_the_client_its_scopes_and_bindings() -> None:
    issuer = TokenIssuer(generate_key(), ISSUER, AUDIENCE)
    token = issuer.issue("st-marys", SCOPES, source="urn:hdx:org:st-marys", subscriber="home")
    caller = await verifier_for(issuer).verify(token)
    assert caller.client_id == "st-marys" and caller.scopes == SCOPES
    assert (caller.source, caller.subscriber) == ("urn:hdx:org:st-marys", "home")
    assert caller.can("Patient", "r") and not caller.can("Patient", "c")
    assert not caller.is_admin


async def test_rsa_keys_sign_with_rs384_too() -> None:
    issuer = TokenIssuer(generate_key("RSA"), ISSUER, AUDIENCE)
    token = issuer.issue("c", SCOPES)
    assert (await verifier_for(issuer).verify(token)).client_id == "c"


def _rejected(reason: str) -> Any:
    return pytest.raises(FhirError, match=reason)


async def test_rejections_are_401_with_www_authenticate() -> None:
    key = generate_key()
    good = TokenIssuer(key, ISSUER, AUDIENCE)
    verifier = verifier_for(good)
    expired = good.issue("c", SCOPES, now=int(time.time()) - 3600)
    other_audience = TokenIssuer(key, ISSUER, "urn:somebody-else").issue("c", SCOPES)
    other_issuer = TokenIssuer(key, "http://evil.test", AUDIENCE).issue("c", SCOPES)
    forged = TokenIssuer(generate_key(), ISSUER, AUDIENCE)
    forged.key = load_private_key(private_pem(forged.key))
    forged_token = forged.issue("c", SCOPES)
    for token in (expired, other_audience, other_issuer, forged_token, "not.a.jwt", "x"):
        with pytest.raises(FhirError) as caught:
            await verifier.verify(token)
        assert caught.value.http_status == 401
        assert caught.value.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
        assert caught.value.issues[0].code == "login"


async def test_a_token_signed_with_a_kid_the_issuer_has_is_still_checked() -> None:
    real, impostor = generate_key(), generate_key()
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "c", "scope": "system/Patient.rs"}
    claims |= {"exp": int(time.time()) + 60}
    # It names the real key's id; the signature is the impostor's.
    token = jwt.encode({"alg": "ES384", "kid": real.kid}, claims, impostor, algorithms=ALGORITHMS)
    with _rejected("not valid"):
        await verifier_for(TokenIssuer(real, ISSUER, AUDIENCE)).verify(token)


async def test_remote_keys_are_cached_and_refetched_for_a_new_kid_at_most_so_often() -> None:
    first, second, third = generate_key(), generate_key(), generate_key()
    served = [first]

    def jwks(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"keys": [public_jwk(k) for k in served]})

    keys = RemoteJwks(
        "http://hdx.test/auth/jwks", min_interval=0, transport=httpx.MockTransport(jwks)
    )
    verifier = TokenVerifier(ISSUER, AUDIENCE, keys)
    await verifier.verify(TokenIssuer(first, ISSUER, AUDIENCE).issue("c", SCOPES))
    await verifier.verify(TokenIssuer(first, ISSUER, AUDIENCE).issue("c", SCOPES))
    assert keys.fetches == 1
    served.append(second)  # the issuer rotated its key
    await verifier.verify(TokenIssuer(second, ISSUER, AUDIENCE).issue("c", SCOPES))
    assert keys.fetches == 2
    # Unknown kids do not make it fetch again and again.
    keys.min_interval = 3600
    served.append(third)
    with _rejected("not valid"):
        await verifier.verify(TokenIssuer(third, ISSUER, AUDIENCE).issue("c", SCOPES))
    assert keys.fetches == 2


async def test_no_keys_from_the_issuer_fails_closed() -> None:
    def down(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    keys = RemoteJwks("http://hdx.test/auth/jwks", transport=httpx.MockTransport(down))
    token = TokenIssuer(generate_key(), ISSUER, AUDIENCE).issue("c", SCOPES)
    with pytest.raises(Unavailable):
        await TokenVerifier(ISSUER, AUDIENCE, keys).verify(token)


def test_registered_keys_must_be_public_with_kids() -> None:
    key = generate_key()
    assert public_key_set({"keys": [public_jwk(key)]}).keys[0].kid == key.kid
    private = {**key.as_dict(private=True), "kid": key.kid}
    no_kid = {k: v for k, v in public_jwk(key).items() if k != "kid"}
    for bad in ({"keys": [private]}, {"keys": [no_kid]}, {"keys": []}, {}):
        with pytest.raises(ValueError, match=r"kid|private|keys"):
            public_key_set(bad)


def test_the_rate_limit_answers_429_with_retry_after() -> None:
    tokens = LocalTokens.generate()
    auth = tokens.authenticator(rate_limit="2/minute")
    auth.throttle("a")
    auth.throttle("a")
    auth.throttle("b")  # per client
    with pytest.raises(FhirError) as caught:
        auth.throttle("a")
    assert caught.value.http_status == 429
    assert int(caught.value.headers["Retry-After"]) >= 1


def test_the_off_switch_is_for_development_only(caplog: pytest.LogCaptureFixture) -> None:
    for environment in ("test", "production"):
        with pytest.raises(ValidationError, match="only in development"):
            HdxSettings(environment=environment, auth_enabled=False)
    with caplog.at_level(logging.WARNING):
        auth = Authenticator.from_settings(HdxSettings(auth_enabled=False))
    assert auth.verifier is None
    assert "AUTHENTICATION IS OFF" in caplog.text


@pytest.fixture
async def client() -> AsyncIterator[tuple[httpx.AsyncClient, LocalTokens]]:
    tokens = LocalTokens.generate()
    app = FastAPI()
    install_fhir_errors(app)
    install_auth(app, tokens.authenticator())
    app.add_middleware(BodyLimit, max_bytes=2048)

    @app.post("/echo")
    async def echo(request: Request, caller: Creator) -> dict[str, object]:
        return {"client": caller.client_id, "bytes": len(await request.body())}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c, tokens


async def test_an_http_endpoint_answers_401_403_413_as_operation_outcomes(
    client: tuple[httpx.AsyncClient, LocalTokens],
) -> None:
    http, tokens = client
    r = await http.post("/echo", content=b"{}")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="hdx"'
    assert r.json()["resourceType"] == "OperationOutcome"
    r = await http.post("/echo", content=b"{}", headers=tokens.headers("system/Patient.r"))
    assert r.status_code == 403 and r.json()["issue"][0]["code"] == "forbidden"
    ok = tokens.headers("system/Patient.c", "me")
    r = await http.post("/echo", content=b"{}", headers=ok)
    assert r.status_code == 200 and r.json() == {"client": "me", "bytes": 2}
    # Over the limit: by Content-Length at once, or counted as a chunked body streams in.
    r = await http.post("/echo", content=b"x" * 4096, headers=ok)
    assert r.status_code == 413 and r.json()["issue"][0]["code"] == "too-costly"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 1024

    r = await http.post("/echo", content=chunks(), headers=ok)
    assert r.status_code == 413 and r.json()["resourceType"] == "OperationOutcome"


async def test_over_the_rate_limit_is_429_with_retry_after_as_an_operation_outcome() -> None:
    tokens = LocalTokens.generate()
    app = FastAPI()
    install_fhir_errors(app)
    install_auth(app, tokens.authenticator(rate_limit="2/minute"))

    @app.get("/thing")
    async def thing(caller: Creator) -> dict[str, str]:
        return {"client": caller.client_id}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        mine, theirs = tokens.headers("system/Patient.c", "a"), tokens.headers("system/Patient.c")
        assert [(await http.get("/thing", headers=mine)).status_code for _ in range(2)] == [200] * 2
        r = await http.get("/thing", headers=mine)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["issue"][0]["code"] == "throttled"
        assert (await http.get("/thing", headers=theirs)).status_code == 200  # per client


async def test_a_token_issued_before_its_clients_revocation_is_refused() -> None:
    issuer = TokenIssuer(generate_key(), ISSUER, AUDIENCE)
    now = int(time.time())
    old = issuer.issue("gp", SCOPES, now=now - 10)
    revoked_at = (now - 5) * 1000  # epoch ms: the client was deactivated 5 s ago
    new = issuer.issue("gp", SCOPES)
    listed: dict[str, int] = {"gp": revoked_at}

    async def fetch() -> dict[str, int]:
        return dict(listed)

    verifier = TokenVerifier(
        ISSUER, AUDIENCE, StaticKeys(issuer.key_set()), Revocations(fetch, refresh_seconds=0)
    )
    with _rejected("revoked"):
        await verifier.verify(old)
    assert (await verifier.verify(new)).client_id == "gp"
    assert (await verifier.verify(issuer.issue("other", SCOPES))).client_id == "other"
    listed.clear()  # e.g. the list as it was before the revocation: the old token passes
    assert (await verifier.verify(old)).client_id == "gp"


async def test_the_revocation_list_is_refetched_at_most_so_often_and_fails_closed() -> None:
    answers: list[Any] = [ConnectionError("exchange down"), {"gp": 1}, ConnectionError("x")]
    fetches = 0

    async def fetch() -> dict[str, int]:
        nonlocal fetches
        fetches += 1
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    revocations = Revocations(fetch, refresh_seconds=0)
    with pytest.raises(Unavailable):  # no list yet: no token can be checked
        await revocations.not_before("gp")
    assert await revocations.not_before("gp") == 1
    assert await revocations.not_before("gp") == 1  # a failed refresh keeps the last list
    revocations.refresh_seconds = 3600
    assert await revocations.not_before("gp") == 1 and fetches == 3


async def test_requests_arriving_together_all_wait_for_the_first_revocation_list() -> None:
    # Seen in the benchmark: eight consents posted at once, the first fetching the list,
    # the seven others answered 500 because they found no list and no refresh due.
    release = asyncio.Event()
    fetches = 0

    async def fetch() -> dict[str, int]:
        nonlocal fetches
        fetches += 1
        await release.wait()
        return {"gp": 7}

    revocations = Revocations(fetch, refresh_seconds=5)
    waiting = [asyncio.create_task(revocations.not_before("gp")) for _ in range(8)]
    await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*waiting) == [7] * 8
    assert fetches == 1


async def test_the_remote_revocation_list_is_the_exchanges_json() -> None:
    def served(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"revoked": {"gp": 1764000000000}})

    revocations = Revocations.remote(
        "http://hdx.test/auth/revoked", transport=httpx.MockTransport(served)
    )
    assert await revocations.not_before("gp") == 1764000000000
    assert await revocations.not_before("other") is None
