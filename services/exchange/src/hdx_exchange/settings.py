"""The exchange's settings (HDX_ environment variables on top of the shared ones)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from hdx_shared.settings import HdxSettings

# The exchange's Kafka stages, in pipeline order (docs/operations.md, "Running the
# exchange's stages apart").
STAGES = ("ingress", "router", "delivery", "audit-log")


class ExchangeSettings(HdxSettings):
    service_name: str = "exchange"
    http_port: int = 8003
    # Which Kafka stages this process runs: `all`, `none` (the HTTP API only) or a comma
    # list of ingress, router, delivery, audit-log. Each stage is its own consumer group,
    # so processes running different stages split the pipeline across cores, and processes
    # running the same stage share its partitions. The HTTP API, the rest-hook dispatcher
    # and the registry refresh run in every process.
    exchange_stages: str = "all"
    # Input limits enforced before anything is parsed.
    max_message_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(default=32, ge=4)
    max_bundle_entries: int = Field(default=10_000, ge=1)
    # How often each replica re-reads subscriptions and publishers written by another.
    registry_refresh_seconds: float = Field(default=2.0, gt=0)
    # Partitions of the inbound topic the exchange creates for each registered publisher.
    # The ingress reads every inbound topic in one consumer group, so it scales by their
    # partitions together; one publisher's records about one patient stay in order on any
    # count. A hospital's feed needs far fewer than six, but fewer measured no faster here
    # (docs/performance.md, "The publishers' own topics"); a region of many publishers may
    # want fewer partitions on its cluster.
    publisher_topic_partitions: int = Field(default=6, ge=1)
    # How long the audit log's fetches wait for AuditEvents (at least the stages' own
    # HDX_CONSUMER_FETCH_MAX_WAIT_MS). The audit log is off the path to the feeds: on a
    # broker that answers a fetch only when its wait is up (the embedded Tansu) it need not
    # poll as briskly as the pipeline, and each poll costs the broker and the exchange CPU;
    # fewer, larger batches also mean fewer transactions and anchors.
    audit_log_fetch_max_wait_ms: int = Field(default=100, ge=1)
    # The base URL subscribers see in notification Bundles.
    public_base_url: str = "http://127.0.0.1:8003/fhir"
    # rest-hook channels: each POST's timeout, retries with exponential back-off and full
    # jitter, then the notification is dead-lettered and the Subscription shows the error.
    rest_hook_timeout_seconds: float = Field(default=5.0, gt=0)
    rest_hook_max_attempts: int = Field(default=6, ge=1)
    rest_hook_backoff_base_seconds: float = Field(default=0.5, gt=0)
    rest_hook_backoff_max_seconds: float = Field(default=30.0, gt=0)
    rest_hook_lease_seconds: float = Field(default=30.0, gt=0)

    # The authorization server (docs/security.md). HDX's signing key, a PEM private key (EC
    # P-384 or RSA ≥ 2048): the value itself, or a file holding it. A secret: never logged.
    # Without either, development generates one into <data_dir>/auth/ once; anywhere else
    # the exchange refuses to start.
    auth_signing_key: SecretStr | None = None
    auth_signing_key_file: Path | None = None
    # Public keys (a JWKS, JSON) of signing keys just retired: tokens they signed stay
    # valid until they expire. Keep them for at least the token lifetime after a rotation.
    auth_retired_keys: str | None = None
    auth_token_lifetime_seconds: int = Field(default=300, ge=30, le=3600)
    # Token requests per client network address, per replica (`limits` notation): checking
    # an assertion costs a signature verification and a database write.
    auth_token_rate_limit: str = "10/second;300/minute"
    # The token endpoint's URL as clients see it: their assertions' aud must be this
    # (default: <HDX_AUTH_ISSUER>/auth/token).
    auth_token_url: str | None = None
    # Client registrations (a JSON list, as POST /admin/clients takes) loaded at start,
    # created or updated: how an operator registers the first admin client.
    auth_clients_file: Path | None = None

    @field_validator("exchange_stages")
    @classmethod
    def _known_stages(cls, value: str) -> str:
        parse_stages(value)
        return value

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this process runs, in pipeline order."""
        return parse_stages(self.exchange_stages)

    @model_validator(mode="after")
    def _signing_key_outside_development(self) -> ExchangeSettings:
        no_key = self.auth_signing_key is None and self.auth_signing_key_file is None
        if self.environment == "production" and self.auth_enabled and no_key:
            raise ValueError(
                "the exchange needs HDX_AUTH_SIGNING_KEY or HDX_AUTH_SIGNING_KEY_FILE "
                "in production (it signs every access token)"
            )
        return self

    @property
    def token_url(self) -> str:
        return self.auth_token_url or f"{self.auth_issuer.rstrip('/')}/auth/token"


def parse_stages(value: str) -> tuple[str, ...]:
    """HDX_EXCHANGE_STAGES as the stages it names, in pipeline order; ValueError if it
    names one the exchange does not have."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if names == ["all"]:
        return STAGES
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        problem = f"unknown stage(s) {', '.join(unknown)}" if unknown else "empty"
        raise ValueError(
            f"HDX_EXCHANGE_STAGES is {problem}: give 'all', 'none' "
            f"or a comma list of {', '.join(STAGES)}"
        )
    return tuple(s for s in STAGES if s in names)
