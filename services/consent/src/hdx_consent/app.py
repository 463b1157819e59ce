"""The consent service's composition root: settings, database, index, Kafka and HTTP API.

Nothing happens at import time; `create_app()` wires, the app's lifespan starts:
schema → index loaded from the database → broker (the gate on hdx.routed, the change feed
on hdx.consents) → a loop that pings the database and sends unpublished changes, and one
that re-reads the versions recorded lately (what the change feed may have lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from fastapi import FastAPI
from faststream import AckPolicy
from faststream.kafka import KafkaMessage

from hdx_consent.api import build_router
from hdx_consent.gate import ConsentGate
from hdx_consent.service import ConsentService
from hdx_consent.settings import ConsentSettings
from hdx_consent.store import ConsentStore
from hdx_shared.db import make_engine
from hdx_shared.http import ServiceRuntime, create_service_app
from hdx_shared.messaging import (
    Outgoing,
    ResumeAfterReconnect,
    RewindFailed,
    Unavailable,
    add_stage,
    broker_connections,
    make_broker,
    publish_all,
    rewind_to_beginning,
)
from hdx_shared.telemetry import kafka_middlewares, setup_tracing
from hdx_shared.topics import Topics

log = logging.getLogger(__name__)


def create_app(settings: ConsentSettings | None = None) -> FastAPI:
    settings = settings or ConsentSettings()
    topics = Topics(settings.topic_prefix)
    tracer_provider = setup_tracing(settings)
    broker = make_broker(settings, middlewares=kafka_middlewares(tracer_provider))
    store = ConsentStore(make_engine(settings))

    async def publish(out: Sequence[Outgoing]) -> None:
        await publish_all(broker, out)

    service = ConsentService(
        store,
        settings.policy(),
        topics,
        publish,
        publish_timeout=settings.publish_timeout_seconds,
        db_probe_seconds=settings.gate_db_probe_seconds,
        db_ping_timeout=settings.db_ping_timeout_seconds,
        reconcile_overlap=settings.reconcile_overlap_seconds,
    )
    gate = ConsentGate(service, topics, service_name=settings.service_name)
    runtime = ServiceRuntime(settings=settings, topics=topics, broker=broker)
    runtime.stages.append(
        add_stage(
            broker,
            name="consent-gate",
            topic=topics.routed,
            group_id=topics.group("consent"),
            handler=gate.handle,
            settings=settings,
            topics=topics,
        )
    )
    runtime.readiness_checks.append(service.readiness)

    # Every replica reads every consent change: no consumer group, from the beginning of
    # the compacted topic at each start (versions make re-applying harmless). After a lost
    # broker connection it reads the topic again from the beginning: a broker that restarted
    # empty makes the old positions point past records written since.
    feed = ResumeAfterReconnect(
        "consent-changes", rewind=rewind_to_beginning, where="the beginning of the topic"
    )

    @broker.subscriber(
        topics.consents,
        batch=True,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.ACK_FIRST,
        title="consent-changes",
    )
    async def consent_changes(_body: list[bytes], msg: KafkaMessage) -> None:
        raw = msg.raw_message
        for record in raw if isinstance(raw, tuple) else (raw,):
            service.apply_change(record.value)  # applying is harmless: versions only rise
        consumer = getattr(msg, "consumer", None)
        # A failed rewind is tried again at the next batch; reconcile_index covers the gap.
        with contextlib.suppress(RewindFailed):
            await feed.rewound(consumer, broker_connections(consumer))

    async def housekeeping() -> None:
        while True:
            await asyncio.sleep(min(settings.db_check_seconds, settings.outbox_seconds))
            try:
                await service.check_database()
                if service.db_error is None:
                    await service.publish_pending()
            except Unavailable:
                pass  # readiness already says why
            except Exception:
                log.exception("consent housekeeping failed")

    async def reconcile_index() -> None:
        while True:
            await asyncio.sleep(settings.reconcile_seconds)
            try:
                await service.reconcile()
            except Unavailable:
                pass  # readiness already says why
            except Exception:
                log.exception("consent reconcile failed")

    async def start() -> None:
        try:
            await service.load()
        except Unavailable as exc:
            # Start anyway: /readyz says why and the gate waits until the database is back.
            log.error("consent database unavailable at start-up: %s", exc)

    async def stop() -> None:
        store.engine.dispose()

    runtime.background += [housekeeping, reconcile_index]

    runtime.on_start.append(start)
    runtime.on_stop.append(stop)
    app = create_service_app(
        runtime,
        title="HDX consent",
        routers=[build_router(service, base_url=settings.public_base_url)],
    )
    app.state.consent_service = service
    return app
