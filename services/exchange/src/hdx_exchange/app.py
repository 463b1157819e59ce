"""The exchange's composition root: settings, database, Kafka stages and HTTP API."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fastapi import FastAPI
from faststream.kafka import KafkaBroker

from hdx_exchange.api import build_routers, publisher_topic
from hdx_exchange.audit_log import AuditLog
from hdx_exchange.dispatcher import RestHookDispatcher
from hdx_exchange.oauth import (
    AuthorizationServer,
    auth_routers,
    load_clients_file,
    signing_key,
    verification_keys,
)
from hdx_exchange.pipeline import ExchangePipeline, Registry
from hdx_exchange.rest_publish import publishing_router
from hdx_exchange.settings import ExchangeSettings
from hdx_exchange.store import ExchangeStore
from hdx_shared.auth import Authenticator, Revocations, StaticKeys, TokenIssuer
from hdx_shared.db import make_engine
from hdx_shared.fhir import Limits
from hdx_shared.http import ServiceRuntime, create_service_app
from hdx_shared.messaging import (
    Outgoing,
    StageHealth,
    add_stage,
    ensure_topics,
    make_broker,
    publish_all,
)
from hdx_shared.telemetry import kafka_middlewares, setup_tracing
from hdx_shared.topics import Topics


def audit_log_settings(settings: ExchangeSettings) -> ExchangeSettings:
    """The audit log stage's settings: its fetches wait `audit_log_fetch_max_wait_ms`, or
    the stages' own wait if that is longer."""
    wait = max(settings.consumer_fetch_max_wait_ms, settings.audit_log_fetch_max_wait_ms)
    return settings.model_copy(update={"consumer_fetch_max_wait_ms": wait})


def add_stages(
    broker: KafkaBroker,
    settings: ExchangeSettings,
    topics: Topics,
    pipeline: ExchangePipeline,
    audit_log: AuditLog,
) -> list[StageHealth]:
    """Subscribe the stages HDX_EXCHANGE_STAGES names. Each is its own consumer group, so
    the same stage in several processes shares its topic's partitions, and different
    stages in different processes work side by side."""
    chosen = settings.stages
    stages: list[StageHealth] = []
    if "ingress" in chosen:
        # Ingress reads hdx.inbound and every publisher's own hdx.inbound.<name>, including
        # those registered later (found at the consumer's next metadata refresh).
        stages.append(
            add_stage(
                broker,
                name="ingress",
                pattern=topics.inbound_pattern,
                group_id=topics.group("exchange-ingress"),
                handler=pipeline.ingress,
                settings=settings,
                topics=topics,
            )
        )
    stages += [
        add_stage(
            broker,
            name=name,
            topic=topic,
            group_id=topics.group(f"exchange-{name}"),
            handler=handler,
            settings=stage_settings,
            topics=topics,
        )
        for name, topic, handler, stage_settings in (
            ("router", topics.identified, pipeline.route, settings),
            ("delivery", topics.decided, pipeline.deliver, settings),
            ("audit-log", topics.audit, audit_log.record, audit_log_settings(settings)),
        )
        if name in chosen
    ]
    return stages


def create_app(settings: ExchangeSettings | None = None) -> FastAPI:
    settings = settings or ExchangeSettings()
    topics = Topics(settings.topic_prefix)
    tracer_provider = setup_tracing(settings)
    broker = make_broker(settings, middlewares=kafka_middlewares(tracer_provider))
    store = ExchangeStore(make_engine(settings))
    registry = Registry(store)
    pipeline = ExchangePipeline(
        registry=registry,
        store=store,
        topics=topics,
        limits=Limits(
            settings.max_message_bytes, settings.max_json_depth, settings.max_bundle_entries
        ),
        base_url=settings.public_base_url,
    )

    async def publish(outgoing: Sequence[Outgoing]) -> None:
        await publish_all(broker, outgoing)

    audit_log = AuditLog(store, topics, settings)
    dispatcher = RestHookDispatcher(store, registry, settings, topics, publish)
    pipeline.on_queued = dispatcher.wake
    runtime = ServiceRuntime(settings=settings, topics=topics, broker=broker)
    runtime.stages += add_stages(broker, settings, topics, pipeline, audit_log)
    runtime.readiness_checks.append(lambda: registry.error)

    async def keep_registry_fresh() -> None:
        while True:
            await asyncio.sleep(settings.registry_refresh_seconds)
            await asyncio.to_thread(registry.refresh)

    # The authorization server: HDX's signing key, and its tokens checked with its own keys.
    key = signing_key(settings)
    verification = verification_keys(settings, key)
    token_issuer = TokenIssuer(
        key, settings.auth_issuer, settings.auth_audience, settings.auth_token_lifetime_seconds
    )
    auth_server = AuthorizationServer(store, token_issuer, settings.token_url)

    async def revoked_tokens() -> dict[str, int]:
        return await asyncio.to_thread(store.revoked_tokens)

    authenticator = Authenticator.from_settings(
        settings,
        StaticKeys(verification),
        Revocations(revoked_tokens, settings.auth_revocation_refresh_seconds),
    )

    async def start() -> None:
        store.create_schema()
        if settings.auth_clients_file is not None:
            load_clients_file(store, settings.auth_clients_file)
        registry.refresh()
        # Each registered publisher's own inbound topic (registration creates it; this
        # brings it back on a broker that lost it, or for publishers loaded from a file).
        await ensure_topics(
            settings,
            [publisher_topic(topics, settings, p.topic_name) for p in registry.publishers.values()],
        )

    async def stop() -> None:
        store.engine.dispose()

    runtime.background += [keep_registry_fresh, dispatcher.run]

    runtime.on_start.append(start)
    runtime.on_stop.append(stop)

    routers = [
        *auth_routers(auth_server, settings, verification),
        *build_routers(store, registry, topics, settings, audit_log),
        publishing_router(registry, topics, pipeline.limits, publish),
    ]
    return create_service_app(runtime, title="HDX exchange", routers=routers, auth=authenticator)
