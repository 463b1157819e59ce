"""Settings every HDX service shares; each service subclasses `HdxSettings` for its own.

Everything comes from the environment (prefix ``HDX_``) or a ``.env`` file, read once at
start-up by the service's composition root — never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET = "change-me-dev-only"


class HdxSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HDX_", env_file=".env", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    service_name: str = "hdx"

    # Kafka. Idempotent producers are right for Apache Kafka; the embedded Tansu broker
    # cannot do InitProducerId, so `make run` and the tests turn it off.
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_idempotence: bool = True
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_username: str | None = None
    kafka_password: str | None = None
    topic_prefix: str = "hdx."
    # Replicas for topics a service creates itself (feeds; core topics when no job made them).
    topic_replication_factor: int = Field(default=1, ge=1)
    # How old the clients' topic metadata may get. Short, so a topic that was re-created
    # (a broker that restarted without its data) or grew partitions is seen within seconds.
    kafka_metadata_max_age_ms: int = Field(default=5_000, ge=100)
    # How often a service checks that its topics exist and re-creates missing ones.
    topic_check_seconds: float = Field(default=5.0, gt=0)
    consumer_batch_size: int = Field(default=500, ge=1)
    # The largest record batch a producer builds for one partition (aiokafka's default,
    # 16 KiB, holds a few dozen of HDX's records at most). A stage publishes up to a whole
    # consumed batch at once; larger record batches mean fewer of them for the broker and
    # the clients to handle (measured: ≈ −0.45 CPU-ms a message over the pipeline, broker
    # included; docs/performance.md). At most Kafka's default message.max.bytes and
    # aiokafka's max_request_size (1 MiB).
    producer_max_batch_bytes: int = Field(default=256 * 1024, ge=1024, le=1024 * 1024)
    # How long a producer holds a record for others to join its batch. A stage appends all
    # of a batch's records before the producer's sender next runs, so they are batched
    # without waiting, and 0 would save ≈ 1.3 ms a hop (produce + ack p50 2.1 → 0.8 ms on
    # the embedded broker). It stays 1 ms: with 0, records re-sent just after an embedded
    # broker restart were lost in 3 of 15 runs of the broker-restart test, and in none of
    # 13 with 1 ms (docs/performance.md, "Light-load latency").
    producer_linger_ms: int = Field(default=1, ge=0)
    # Python's collector runs a young-generation pass every 700 new container objects, and
    # a full pass — 170-190 ms here, the heap being fhir.resources' thousands of model
    # classes — every few seconds under load: 10-13 % of each service's CPU, and pauses
    # in the middle of a batch. A service process sets this threshold and, once started,
    # moves everything it loaded out of the collector's way (gc.freeze). 0: Python's own.
    gc_young_threshold: int = Field(default=10_000, ge=0)
    consumer_batch_timeout_ms: int = Field(default=20, ge=0)
    # How long a fetch waits for data. Kafka answers as soon as data arrives; the embedded
    # Tansu broker does not, so there a short wait is what keeps latency low.
    consumer_fetch_max_wait_ms: int = Field(default=100, ge=1)
    # How long a stage's consumer group waits for a member's heartbeat before it takes the
    # member's partitions away (aiokafka's default; heartbeats go at 3/10 of it). The
    # embedded Tansu answers a JoinGroup only after half of it, so there every start and
    # every rebalance — a replica joining, a new publisher's inbound topic — holds the stage
    # that long: it gets 2 s (`embedded_broker.EMBEDDED_CLIENT_SETTINGS`).
    consumer_session_timeout_ms: int = Field(default=10_000, ge=1_000)
    # A message whose handling raises this many times in a row is dead-lettered.
    max_delivery_attempts: int = Field(default=5, ge=1)
    # /readyz turns not-ready when a stage's commits, publishes or fetches keep failing
    # this long (or at once when its consume loop has ended).
    stage_failure_seconds: float = Field(default=30.0, gt=0)

    # Persistence: SQLite under data_dir unless a database URL is given.
    data_dir: Path = Path("data")
    database_url: str | None = None

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    log_level: str = "INFO"
    log_json: bool = True
    # The largest request body any HTTP endpoint takes; a larger one is refused with 413
    # before it is read (Content-Length, or counted while it streams in).
    max_request_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)

    # Authentication (docs/security.md). Every API but health, metrics, the
    # CapabilityStatement and the token endpoints needs an access token issued by the
    # exchange. Off only in development (and then loudly): HDX_AUTH_ENABLED=false.
    auth_enabled: bool = True
    # Who issues access tokens (the exchange's base URL) and the audience they carry.
    auth_issuer: str = "http://127.0.0.1:8003"
    auth_audience: str = "urn:hdx:api"
    # Where the issuer's public keys are (default: <issuer>/auth/jwks); fetched once,
    # cached, and fetched again for a key id not seen yet, at most this often.
    auth_jwks_url: str | None = None
    auth_jwks_refresh_seconds: float = Field(default=10.0, ge=0)
    # Where the issuer lists revoked tokens (default: <issuer>/auth/revoked), and how often
    # at most it is fetched again: how long a revoked token may still be taken.
    auth_revocations_url: str | None = None
    auth_revocation_refresh_seconds: float = Field(default=5.0, ge=0)
    # Requests per client on every authenticated endpoint, per replica (the `limits`
    # notation: "100/second", "6000/minute", or several separated by ";").
    auth_rate_limit: str = "100/second"
    # Security alerts (AuditEvents) for refused requests, per caller and kind, per replica:
    # beyond it a flood is counted (hdx_security_alerts_suppressed_total), not written.
    auth_alert_limit: str = "30/minute"

    @model_validator(mode="after")
    def _refuse_dev_secrets_outside_dev(self) -> HdxSettings:
        if self.environment == "production" and self.kafka_password == DEV_SECRET:
            raise ValueError("HDX_KAFKA_PASSWORD still holds the development default")
        if not self.auth_enabled and self.environment != "development":
            raise ValueError("HDX_AUTH_ENABLED=false is allowed only in development")
        return self

    @property
    def jwks_url(self) -> str:
        return self.auth_jwks_url or f"{self.auth_issuer.rstrip('/')}/auth/jwks"

    @property
    def revocations_url(self) -> str:
        return self.auth_revocations_url or f"{self.auth_issuer.rstrip('/')}/auth/revoked"

    def sqlalchemy_url(self) -> str:
        """The database this service uses: HDX_DATABASE_URL, else SQLite in data_dir."""
        if self.database_url:
            url = self.database_url
            # Plain postgresql:// means psycopg 3, the driver HDX ships.
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
            return url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.data_dir / (self.service_name + '.db')}"
