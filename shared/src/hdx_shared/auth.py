"""Who is calling: HDX's access tokens, checked by every service (docs/security.md).

The exchange is the authorization server (SMART Backend Services: a client proves itself
with a JWT signed by its own key and gets a short-lived access token, a JWT signed by HDX).
Here is what every service needs to check those tokens, and what a client needs to get one:

- `TokenIssuer` signs access tokens (the exchange); `TokenVerifier` checks them against the
  issuer's public keys — `StaticKeys` in the exchange itself, `RemoteJwks` (the exchange's
  ``/auth/jwks``, cached, fetched again for a key id it has not seen) elsewhere.
- `Authenticator` is installed on each app (`install_auth`); the FastAPI dependencies
  `authenticated` and `require_scope("system/Consent.c")` give the handler a `Caller` (the
  client, its granted scopes and its bindings) or answer 401 (no or bad token, with
  ``WWW-Authenticate: Bearer``), 403 (valid token, not allowed) or 429 (over the client's
  rate limit, with ``Retry-After``) — each an OperationOutcome.
- `client_assertion` and `ClientCredentials` (an ``httpx.Auth``) are the client's side:
  the CLI (`hdx token`), the dev stack's seeding and the tests get tokens as an integrator
  would.

Tokens and keys are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import httpx
from fastapi import Depends, FastAPI, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey
from joserfc.jws import extract_compact
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from hdx_shared.fhir import FhirError, Issue
from hdx_shared.messaging import Unavailable
from hdx_shared.scopes import ScopeError, ScopeSet
from hdx_shared.settings import HdxSettings

log = logging.getLogger(__name__)

# Client assertions and HDX's own tokens: ES384 or RS384 (SMART Backend Services' two).
ALGORITHMS = ["ES384", "RS384"]
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# The longest a client assertion may live (SMART: no more than five minutes).
MAX_ASSERTION_SECONDS = 300
# Clock skew tolerated on exp/iat/nbf.
LEEWAY_SECONDS = 30
# HDX scopes beyond FHIR's resource scopes.
ADMIN_SCOPE = "system/hdx-admin"  # registries: publishers, clients; audit verification
IDENTITY_SCOPE = "system/hdx-identity"  # the patient index's review tasks and operations
# Token claims for what a client is bound to.
SOURCE_CLAIM = "hdx_source"  # the publisher source (ce_source) it publishes as
SUBSCRIBER_CLAIM = "hdx_subscriber"  # the organization it subscribes for
# When the token was issued, in epoch milliseconds: `iat` is whole seconds, too coarse to
# tell a token issued just before a revocation from one issued just after.
ISSUED_MS_CLAIM = "hdx_issued_ms"

Key = ECKey | RSAKey


# ---- errors: each an OperationOutcome ------------------------------------------------------


def unauthenticated(description: str) -> FhirError:
    """401: no token, or one that is not valid (expired, wrong issuer or audience, bad
    signature)."""
    quoted = description.replace('"', "'")
    return FhirError(
        "unauthenticated",
        [Issue(f"authentication required: {description}", code="login")],
        http_status=401,
        headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{quoted}"'}
        if description != "no access token"
        else {"WWW-Authenticate": 'Bearer realm="hdx"'},
    )


def forbidden(description: str) -> FhirError:
    """403: a valid token that does not allow this (scope or binding)."""
    return FhirError("forbidden", [Issue(description, code="forbidden")], http_status=403)


# ---- the caller --------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """The authenticated client of one request."""

    client_id: str
    scopes: ScopeSet
    source: str | None = None  # the publisher source it is bound to
    subscriber: str | None = None  # the organization (id) it subscribes for
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.scopes.has(ADMIN_SCOPE)

    def can(self, resource: str, permission: str) -> bool:
        return self.scopes.allows(resource, permission)

    def require(self, scope: str) -> None:
        """403 unless the granted scopes cover `scope` (e.g. "system/Consent.c")."""
        if not self.scopes.has(scope):
            raise forbidden(f"client {self.client_id} lacks the scope {scope}")


DEVELOPMENT_CALLER = Caller(
    "anonymous-development",
    ScopeSet.parse(f"system/*.cruds {ADMIN_SCOPE} {IDENTITY_SCOPE}"),
)


# ---- keys ------------------------------------------------------------------------------------


def generate_key(kind: str = "EC") -> Key:
    """A new private signing key: EC P-384 (ES384) or RSA 3072 (RS384), kid = thumbprint."""
    key: Key = (
        ECKey.generate_key("P-384", private=True)
        if kind == "EC"
        else RSAKey.generate_key(3072, private=True)
    )
    key.ensure_kid()
    return key


def load_private_key(pem: str | bytes) -> Key:
    """A private key from PEM (EC or RSA); its kid is its RFC 7638 thumbprint."""
    data = pem.encode() if isinstance(pem, str) else pem
    key: Key
    try:
        key = ECKey.import_key(data)
    except (JoseError, ValueError, TypeError):
        key = RSAKey.import_key(data)
    if not key.is_private:
        raise ValueError("the PEM holds no private key")
    key.ensure_kid()
    return key


def private_pem(key: Key) -> bytes:
    return key.as_pem(private=True)


def algorithm(key: Key) -> str:
    return "ES384" if isinstance(key, ECKey) else "RS384"


def public_jwk(key: Key) -> dict[str, Any]:
    """The public half as a JWK, with kid, alg and use."""
    jwk: dict[str, Any] = key.as_dict(private=False)
    jwk.update(kid=key.kid, alg=algorithm(key), use="sig")
    return jwk


def public_key_set(jwks: dict[str, Any]) -> KeySet:
    """A client's registered JWKS: public EC P-384 (ES384) or RSA ≥ 2048 bits (RS384) keys,
    each with a kid. ValueError says what is wrong."""
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError("a JWKS is an object with a non-empty 'keys' list")
    for k in keys:
        if not isinstance(k, dict) or not isinstance(k.get("kid"), str) or not k["kid"]:
            raise ValueError("every key needs a 'kid'")
        if "d" in k or "p" in k:
            raise ValueError(f"key {k['kid']} holds private material: register the public key")
        if k.get("kty") not in ("EC", "RSA"):
            raise ValueError(f"key {k['kid']}: kty must be EC or RSA")
    try:
        key_set = KeySet.import_key_set({"keys": keys})
    except (JoseError, ValueError, TypeError) as exc:
        raise ValueError(f"not a valid JWKS: {exc}") from exc
    for key in key_set.keys:
        if isinstance(key, RSAKey) and _rsa_bits(key) < 2048:
            raise ValueError(f"key {key.kid}: RSA keys need at least 2048 bits")
        if isinstance(key, ECKey) and key.as_dict()["crv"] != "P-384":
            raise ValueError(f"key {key.kid}: EC keys are P-384 (ES384)")
    return key_set


def _rsa_bits(key: RSAKey) -> int:
    from joserfc.util import urlsafe_b64decode

    return len(urlsafe_b64decode(str(key.as_dict()["n"]).encode())) * 8


# ---- issuing and verifying access tokens --------------------------------------------------


@dataclass
class TokenIssuer:
    """Signs HDX's access tokens."""

    key: Key
    issuer: str
    audience: str
    lifetime_seconds: int = 300

    def issue(
        self,
        client_id: str,
        scopes: ScopeSet,
        *,
        source: str | None = None,
        subscriber: str | None = None,
        now: int | None = None,
    ) -> str:
        issued_ms = time.time_ns() // 1_000_000 if now is None else now * 1000
        now = issued_ms // 1000
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": client_id,
            "client_id": client_id,
            "aud": self.audience,
            "iat": now,
            "exp": now + self.lifetime_seconds,
            "jti": str(uuid.uuid4()),
            "scope": str(scopes),
            ISSUED_MS_CLAIM: issued_ms,
        }
        if source:
            claims[SOURCE_CLAIM] = source
        if subscriber:
            claims[SUBSCRIBER_CLAIM] = subscriber
        header = {"alg": algorithm(self.key), "kid": self.key.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self.key, algorithms=ALGORITHMS)

    def key_set(self) -> KeySet:
        return KeySet([self.key])


class KeySource(Protocol):
    async def key_set(self, kid: str | None) -> KeySet: ...


@dataclass
class StaticKeys:
    """Keys known up front: the exchange's own (current and retired), or a test's."""

    keys: KeySet

    async def key_set(self, kid: str | None) -> KeySet:
        return self.keys


@dataclass
class RemoteJwks:
    """The issuer's JWKS over HTTP: fetched on first use, kept, and fetched again when a
    token names a key id not in it (a rotated key) — at most once per `min_interval`."""

    url: str
    min_interval: float = 10.0
    timeout: float = 5.0
    transport: httpx.AsyncBaseTransport | None = None
    fetches: int = 0
    _keys: KeySet | None = None
    _fetched_at: float = float("-inf")
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def key_set(self, kid: str | None) -> KeySet:
        if self._keys is not None and (kid is None or _has_kid(self._keys, kid)):
            return self._keys
        async with self._lock:
            stale = time.monotonic() - self._fetched_at >= self.min_interval
            if self._keys is None or (stale and not _has_kid(self._keys, kid)):
                await self._fetch()
        assert self._keys is not None
        return self._keys

    async def _fetch(self) -> None:
        self._fetched_at = time.monotonic()
        self.fetches += 1
        try:
            async with httpx.AsyncClient(timeout=self.timeout, transport=self.transport) as http:
                r = await http.get(self.url)
                r.raise_for_status()
                self._keys = KeySet.import_key_set(r.json())
        except (httpx.HTTPError, ValueError, JoseError) as exc:
            if self._keys is None:
                # Fail closed: without the issuer's keys no token can be checked.
                raise Unavailable(f"the token issuer's keys ({self.url}): {exc}") from exc
            log.warning("could not refresh the issuer's keys from %s: %s", self.url, exc)


def _has_kid(keys: KeySet, kid: str | None) -> bool:
    return any(k.kid == kid for k in keys.keys)


# ---- revoked tokens ---------------------------------------------------------------------


RevocationList = dict[str, int]  # client id → tokens issued before this (epoch ms) are void


@dataclass
class Revocations:
    """Which clients' tokens were revoked, and from when: the exchange voids every token of a
    client issued before it was deactivated or its keys were replaced
    (`ClientRow.tokens_not_before`). Fetched at most every `refresh_seconds`, on the first
    request after; a failed refresh keeps the last list (tokens live 5 minutes at most), and
    no list at all fails closed (503), as the keys do."""

    fetch: Callable[[], Awaitable[RevocationList]]
    refresh_seconds: float = 5.0
    _revoked: RevocationList | None = None
    _fetched_at: float = float("-inf")
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def remote(
        cls,
        url: str,
        refresh_seconds: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Revocations:
        """The exchange's `GET /auth/revoked`."""

        async def fetch() -> RevocationList:
            async with httpx.AsyncClient(timeout=5.0, transport=transport) as http:
                r = await http.get(url)
                r.raise_for_status()
                revoked = r.json()["revoked"]
                return {str(k): int(v) for k, v in revoked.items()}

        return cls(fetch, refresh_seconds)

    async def not_before(self, client_id: str) -> int | None:
        if self._due():
            async with self._lock:
                if self._due():
                    await self._refresh()
        assert self._revoked is not None
        return self._revoked.get(client_id)

    def _due(self) -> bool:
        # While a refresh is under way, requests go on with the last list; with none yet
        # they wait for the first fetch (several arriving together must not see no list).
        return self._revoked is None or time.monotonic() - self._fetched_at >= self.refresh_seconds

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            self._revoked = await self.fetch()
        except Exception as exc:
            if self._revoked is None:
                raise Unavailable(f"the list of revoked tokens: {exc}") from exc
            log.warning("could not refresh the list of revoked tokens: %s", exc)


@dataclass
class TokenVerifier:
    issuer: str
    audience: str
    keys: KeySource
    revocations: Revocations | None = None

    async def verify(self, token: str) -> Caller:
        """The caller a valid access token names; 401 (FhirError) for anything else."""
        try:
            kid = extract_compact(token.encode("ascii")).headers().get("kid")
        except (JoseError, ValueError, TypeError):
            raise unauthenticated("the access token is not a JWS") from None
        key_set = await self.keys.key_set(kid if isinstance(kid, str) else None)
        try:
            decoded = jwt.decode(token, key_set, algorithms=ALGORITHMS)
            jwt.JWTClaimsRegistry(
                leeway=LEEWAY_SECONDS,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                sub={"essential": True},
                exp={"essential": True},
                iat={"essential": True},
                scope={"essential": True},
            ).validate(decoded.claims)
        except JoseError as exc:
            raise unauthenticated(f"the access token is not valid ({exc.error})") from None
        claims = decoded.claims
        if self.revocations is not None:
            not_before = await self.revocations.not_before(str(claims["sub"]))
            issued_ms = claims.get(ISSUED_MS_CLAIM)
            if not isinstance(issued_ms, int):
                issued_ms = claims["iat"] * 1000 if isinstance(claims["iat"], int) else 0
            if not_before is not None and issued_ms < not_before:
                raise unauthenticated("the access token was revoked")
        try:
            scopes = ScopeSet.parse(str(claims["scope"]))
        except ScopeError:
            raise unauthenticated("the access token's scope does not parse") from None
        return Caller(
            client_id=str(claims["sub"]),
            scopes=scopes,
            source=_str_or_none(claims.get(SOURCE_CLAIM)),
            subscriber=_str_or_none(claims.get(SUBSCRIBER_CLAIM)),
            token_id=_str_or_none(claims.get("jti")),
        )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# ---- per-app authentication and rate limiting -----------------------------------------------


@dataclass
class RateLimit:
    """Moving-window limits per key (the `limits` library), counted in this process's
    memory: per replica."""

    items: list[RateLimitItem]
    _limiter: MovingWindowRateLimiter = field(
        default_factory=lambda: MovingWindowRateLimiter(MemoryStorage())
    )

    def retry_after(self, *key: str) -> tuple[RateLimitItem, int] | None:
        """Count one hit for `key`: None if it is within every limit, else the limit it is
        over and the seconds until that limit lets it through again."""
        for item in self.items:
            if not self._limiter.hit(item, *key):
                reset = self._limiter.get_window_stats(item, *key).reset_time
                return item, max(1, int(reset - time.time() + 0.999))
        return None


@dataclass
class Authenticator:
    """What one app checks callers with: the verifier (None when authentication is off, in
    development only) and the per-client rate limit."""

    verifier: TokenVerifier | None
    rate_limits: list[RateLimitItem]
    _limit: RateLimit = field(init=False)

    def __post_init__(self) -> None:
        self._limit = RateLimit(self.rate_limits)

    @classmethod
    def from_settings(
        cls,
        settings: HdxSettings,
        keys: KeySource | None = None,
        revocations: Revocations | None = None,
    ) -> Authenticator:
        limits = parse_many(settings.auth_rate_limit)
        if not settings.auth_enabled:
            # settings refuse this outside development; say it where nobody can miss it.
            log.warning(
                "AUTHENTICATION IS OFF (HDX_AUTH_ENABLED=false): every caller of %s is "
                "allowed everything. Development only.",
                settings.service_name,
            )
            return cls(None, limits)
        source = keys or RemoteJwks(settings.jwks_url, settings.auth_jwks_refresh_seconds)
        revoked = revocations or Revocations.remote(
            settings.revocations_url, settings.auth_revocation_refresh_seconds
        )
        verifier = TokenVerifier(settings.auth_issuer, settings.auth_audience, source, revoked)
        return cls(verifier, limits)

    async def authenticate(self, token: str | None) -> Caller:
        if self.verifier is None:
            caller = DEVELOPMENT_CALLER
        elif not token:
            raise unauthenticated("no access token")
        else:
            caller = await self.verifier.verify(token)
        self.throttle(caller.client_id)
        return caller

    def throttle(self, client_id: str) -> None:
        if (over := self._limit.retry_after("client", client_id)) is not None:
            item, retry = over
            raise FhirError(
                "rate-limited",
                [Issue(f"client {client_id} is over its rate limit ({item})", "throttled")],
                http_status=429,
                headers={"Retry-After": str(retry)},
            )


def install_auth(app: FastAPI, auth: Authenticator) -> None:
    app.state.hdx_auth = auth


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="hdx-access-token",
    description="An access token from the exchange's POST /auth/token (docs/security.md)",
)


async def authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Caller:
    """The FastAPI dependency: the request's authenticated caller, or 401/429."""
    auth: Authenticator | None = getattr(request.app.state, "hdx_auth", None)
    if auth is None:
        raise RuntimeError("no Authenticator installed on this app (install_auth)")
    caller = await auth.authenticate(credentials.credentials if credentials else None)
    request.state.hdx_caller = caller  # who a later refusal (403) is recorded against
    return caller


AuthenticatedCaller = Annotated[Caller, Depends(authenticated)]


def require_scope(*scopes: str) -> Callable[[Caller], Awaitable[Caller]]:
    """A dependency: the caller, who must hold every one of these scopes (else 403)."""
    for scope in scopes:
        ScopeSet.parse(scope)  # a typo fails at start-up, not at the first request

    async def dependency(caller: AuthenticatedCaller) -> Caller:
        for scope in scopes:
            caller.require(scope)
        return caller

    return dependency


# ---- the client's side ---------------------------------------------------------------------


def client_assertion(
    client_id: str, key: Key, token_url: str, *, lifetime: int = 240, now: int | None = None
) -> str:
    """A private_key_jwt client assertion (SMART Backend Services)."""
    now = int(time.time()) if now is None else now
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": now,
        "exp": now + lifetime,
        "jti": str(uuid.uuid4()),
    }
    header = {"alg": algorithm(key), "kid": key.kid, "typ": "JWT"}
    return jwt.encode(header, claims, key, algorithms=ALGORITHMS)


def token_request(client_id: str, key: Key, token_url: str, scope: str | None) -> dict[str, str]:
    """The form a client POSTs to the token endpoint."""
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": client_assertion(client_id, key, token_url),
    }
    if scope:
        form["scope"] = scope
    return form


class TokenRequestError(RuntimeError):
    pass


def fetch_token(
    client_id: str, key: Key, token_url: str, scope: str | None = None, timeout: float = 10
) -> dict[str, Any]:
    """Ask the token endpoint for an access token; the token response, or TokenRequestError
    with the server's error."""
    r = httpx.post(token_url, data=token_request(client_id, key, token_url, scope), timeout=timeout)
    if r.status_code != 200:
        raise TokenRequestError(f"{r.status_code}: {r.text[:300]}")
    body: dict[str, Any] = r.json()
    return body


@dataclass
class ClientCredentials(httpx.Auth):
    """httpx authentication as a backend client: fetches an access token with a client
    assertion and fetches a new one shortly before it expires (or after a 401)."""

    client_id: str
    key: Key
    token_url: str
    scope: str | None = None
    _token: str | None = None
    _expires_at: float = 0.0

    @classmethod
    def from_key_file(
        cls, client_id: str, key_file: Path, token_url: str, scope: str | None = None
    ) -> ClientCredentials:
        return cls(client_id, load_private_key(key_file.read_bytes()), token_url, scope)

    def token(self) -> str:
        if self._token is None or time.monotonic() > self._expires_at - 30:
            body = fetch_token(self.client_id, self.key, self.token_url, self.scope)
            self._token = str(body["access_token"])
            self._expires_at = time.monotonic() + float(body.get("expires_in", 60))
        return self._token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        response = yield request
        if response.status_code == 401:
            self._token = None
            request.headers["Authorization"] = f"Bearer {self.token()}"
            yield request


def clients_file_entry(
    client_id: str,
    key: Key,
    scope: str,
    *,
    name: str | None = None,
    source: str | None = None,
    subscriber: str | None = None,
) -> dict[str, Any]:
    """One registration for HDX_AUTH_CLIENTS_FILE / POST /admin/clients."""
    entry: dict[str, Any] = {
        "client_id": client_id,
        "name": name or client_id,
        "jwks": {"keys": [public_jwk(key)]},
        "scope": scope,
    }
    if source:
        entry["source"] = source
    if subscriber:
        entry["subscriber"] = subscriber
    return entry


@dataclass
class LocalTokens:
    """An issuer and the matching authenticator in one process, with a key made for it:
    for running a service's app without an exchange (its own tests, tools). Production
    services check the exchange's tokens (Authenticator.from_settings)."""

    issuer: TokenIssuer

    @classmethod
    def generate(
        cls, issuer: str = "http://hdx.test", audience: str = "urn:hdx:api"
    ) -> LocalTokens:
        return cls(TokenIssuer(generate_key(), issuer, audience))

    def authenticator(self, rate_limit: str = "10000/second") -> Authenticator:
        verifier = TokenVerifier(
            self.issuer.issuer, self.issuer.audience, StaticKeys(self.issuer.key_set())
        )
        return Authenticator(verifier, parse_many(rate_limit))

    def token(
        self,
        scope: str,
        client_id: str = "test-client",
        *,
        source: str | None = None,
        subscriber: str | None = None,
    ) -> str:
        return self.issuer.issue(
            client_id, ScopeSet.parse(scope), source=source, subscriber=subscriber
        )

    def headers(
        self, scope: str, client_id: str = "test-client", **bindings: str
    ) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(scope, client_id, **bindings)}"}
