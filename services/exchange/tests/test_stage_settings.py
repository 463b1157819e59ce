"""The exchange's stages: which a process runs (HDX_EXCHANGE_STAGES), and their consumer
settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hdx_exchange.app import add_stages, audit_log_settings
from hdx_exchange.audit_log import AuditLog
from hdx_exchange.pipeline import ExchangePipeline, Registry
from hdx_exchange.settings import STAGES, ExchangeSettings
from hdx_exchange.store import ExchangeStore
from hdx_shared.db import make_engine
from hdx_shared.fhir import Limits
from hdx_shared.messaging import make_broker
from hdx_shared.topics import Topics


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


@pytest.mark.parametrize(
    ("value", "stages"),
    [
        ("all", STAGES),
        ("none", ()),
        ("ingress,router", ("ingress", "router")),
        (" audit-log , Delivery ", ("delivery", "audit-log")),  # pipeline order, any case
    ],
)
def test_the_stages_a_process_runs(value: str, stages: tuple[str, ...]) -> None:
    assert ExchangeSettings(exchange_stages=value).stages == stages


@pytest.mark.parametrize("value", ["ingress,routr", "", "all,router", "none,ingress"])
def test_an_unknown_stage_is_refused_at_start(value: str) -> None:
    with pytest.raises(ValidationError, match="HDX_EXCHANGE_STAGES"):
        ExchangeSettings(exchange_stages=value)


def test_the_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HDX_EXCHANGE_STAGES", "delivery,audit-log")
    assert ExchangeSettings().stages == ("delivery", "audit-log")


@pytest.mark.parametrize("value", ["all", "none", "ingress,router", "delivery,audit-log", "router"])
def test_only_the_chosen_stages_are_subscribed(value: str, tmp_path: Path) -> None:
    settings = ExchangeSettings(exchange_stages=value, data_dir=tmp_path)
    topics = Topics(settings.topic_prefix)
    store = ExchangeStore(make_engine(settings))
    registry = Registry(store)
    pipeline = ExchangePipeline(
        registry=registry, store=store, topics=topics, limits=Limits(), base_url="http://x"
    )
    broker = make_broker(settings)
    stages = add_stages(broker, settings, topics, pipeline, AuditLog(store, topics, settings))
    assert tuple(s.name for s in stages) == settings.stages
    assert len(broker.subscribers) == len(settings.stages)
    store.engine.dispose()
