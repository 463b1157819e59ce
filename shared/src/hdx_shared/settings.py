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
    consumer_batch_size: int = Field(default=500, ge=1)
    consumer_batch_timeout_ms: int = Field(default=20, ge=0)
    # How long a fetch waits for data. Kafka answers as soon as data arrives; the embedded
    # Tansu broker does not, so there a short wait is what keeps latency low.
    consumer_fetch_max_wait_ms: int = Field(default=100, ge=1)
    # A message whose handling raises this many times in a row is dead-lettered.
    max_delivery_attempts: int = Field(default=5, ge=1)

    # Persistence: SQLite under data_dir unless a database URL is given.
    data_dir: Path = Path("data")
    database_url: str | None = None

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    log_level: str = "INFO"
    log_json: bool = True

    @model_validator(mode="after")
    def _refuse_dev_secrets_outside_dev(self) -> HdxSettings:
        if self.environment == "production" and self.kafka_password == DEV_SECRET:
            raise ValueError("HDX_KAFKA_PASSWORD still holds the development default")
        return self

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
