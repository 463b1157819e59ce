"""The exchange's stages' consumer settings."""

from __future__ import annotations

from hdx_exchange.app import audit_log_settings
from hdx_exchange.settings import ExchangeSettings


def test_the_audit_log_polls_less_briskly_than_the_pipeline() -> None:
    # The embedded broker's brisk 10 ms wait is for the path to the feeds.
    settings = ExchangeSettings(consumer_fetch_max_wait_ms=10, consumer_batch_size=321)
    audit = audit_log_settings(settings)
    assert audit.consumer_fetch_max_wait_ms == 100
    assert audit.consumer_batch_size == 321
    assert settings.consumer_fetch_max_wait_ms == 10  # the other stages' settings unchanged


def test_the_audit_log_never_polls_more_briskly_than_the_stages() -> None:
    settings = ExchangeSettings(consumer_fetch_max_wait_ms=500, audit_log_fetch_max_wait_ms=100)
    assert audit_log_settings(settings).consumer_fetch_max_wait_ms == 500
