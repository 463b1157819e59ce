"""The patient index's settings (HDX_ environment variables on top of the shared ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from hdx_patient_index.domain.identifiers import NHS_NUMBER
from hdx_shared.settings import HdxSettings


class PatientIndexSettings(HdxSettings):
    service_name: str = "patient-index"
    http_port: int = 8001
    # Identifier systems issued one per person. HDX_TRUSTED_IDENTIFIER_SYSTEMS takes a
    # comma-separated list (or a JSON array). NHS numbers are checked (modulus 11).
    trusted_identifier_systems: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [NHS_NUMBER]
    )
    # Fellegi–Sunter weights (sums of log2(m/u)): at or above upper → automatic link; from
    # lower up to upper → a new person plus a review task; below lower → a new person.
    match_upper_threshold: float = 30.0
    match_lower_threshold: float = 18.0
    # Prior log2 odds that two random records are one person: turns weights into $match scores.
    match_prior_log2_odds: float = -24.0
    # A match model file (JSON) from `hdx-patient-index train-model`: the m/u weights the
    # matcher runs on. Unset → the built-in prior weights. A file that is missing or not a
    # valid model stops the service at start (never a silent fall-back to the priors).
    match_model: Path | None = None
    # How long a resource waits for its Patient before it is dead-lettered (patient-unknown).
    park_timeout_seconds: float = Field(default=24 * 3600, gt=0)
    park_sweep_seconds: float = Field(default=60.0, gt=0)
    # How often the in-memory index picks up what other replicas wrote.
    index_refresh_seconds: float = Field(default=5.0, gt=0)
    # How often the outbox loop publishes what identity operations committed but could not
    # publish right away (the broker was away).
    outbox_seconds: float = Field(default=2.0, gt=0)
    # The base URL clients see in searchset Bundles.
    public_base_url: str = "http://127.0.0.1:8001/fhir"

    @field_validator("trusted_identifier_systems", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import orjson

                return orjson.loads(text)
            return [s.strip() for s in text.split(",") if s.strip()]
        return value

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> PatientIndexSettings:
        if self.match_lower_threshold > self.match_upper_threshold:
            raise ValueError(
                "HDX_MATCH_LOWER_THRESHOLD must not be above HDX_MATCH_UPPER_THRESHOLD"
            )
        return self

    @property
    def park_timeout_ms(self) -> int:
        return int(self.park_timeout_seconds * 1000)
