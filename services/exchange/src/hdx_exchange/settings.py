"""The exchange's settings (HDX_ environment variables on top of the shared ones)."""

from __future__ import annotations

from pydantic import Field

from hdx_shared.settings import HdxSettings


class ExchangeSettings(HdxSettings):
    service_name: str = "exchange"
    http_port: int = 8003
    # Input limits enforced before anything is parsed.
    max_message_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(default=32, ge=4)
    max_bundle_entries: int = Field(default=10_000, ge=1)
    # How often each replica re-reads subscriptions and publishers written by another.
    registry_refresh_seconds: float = Field(default=2.0, gt=0)
    # The base URL subscribers see in notification Bundles.
    public_base_url: str = "http://127.0.0.1:8003/fhir"
    # rest-hook channels: each POST's timeout, retries with exponential back-off and full
    # jitter, then the notification is dead-lettered and the Subscription shows the error.
    rest_hook_timeout_seconds: float = Field(default=5.0, gt=0)
    rest_hook_max_attempts: int = Field(default=6, ge=1)
    rest_hook_backoff_base_seconds: float = Field(default=0.5, gt=0)
    rest_hook_backoff_max_seconds: float = Field(default=30.0, gt=0)
    rest_hook_lease_seconds: float = Field(default=30.0, gt=0)
