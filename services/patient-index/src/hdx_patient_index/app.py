"""The patient index's composition root: settings, database, in-memory index, the Kafka
stage (hdx.validated → hdx.identified) and the HTTP API. Nothing happens at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from fastapi import FastAPI

from hdx_patient_index.api import build_router
from hdx_patient_index.domain.identifiers import TrustedSystems
from hdx_patient_index.domain.matching import Matcher
from hdx_patient_index.match_model import match_config
from hdx_patient_index.operations import IdentityOperations
from hdx_patient_index.pipeline import IdentifyStage
from hdx_patient_index.service import PatientIndexService
from hdx_patient_index.settings import PatientIndexSettings
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.db import make_engine
from hdx_shared.http import ServiceRuntime, create_service_app
from hdx_shared.messaging import Outgoing, add_stage, make_broker, publish_all
from hdx_shared.telemetry import kafka_middlewares, setup_tracing
from hdx_shared.topics import Topics

log = logging.getLogger(__name__)


def create_app(settings: PatientIndexSettings | None = None) -> FastAPI:
    settings = settings or PatientIndexSettings()
    # First, before anything is set up: a bad HDX_MATCH_MODEL stops the start (ModelFileError).
    matcher = Matcher(match_config(settings))
    topics = Topics(settings.topic_prefix)
    tracer_provider = setup_tracing(settings)
    broker = make_broker(settings, middlewares=kafka_middlewares(tracer_provider))
    store = PatientIndexStore(make_engine(settings))
    service = PatientIndexService(
        store,
        matcher,
        TrustedSystems.of(settings.trusted_identifier_systems),
    )
    stage = IdentifyStage(service, topics)
    ops = IdentityOperations(service, topics)
    runtime = ServiceRuntime(settings=settings, topics=topics, broker=broker)
    runtime.stages.append(
        add_stage(
            broker,
            name="patient-index",
            topic=topics.validated,
            group_id=topics.group("patient-index"),
            handler=stage.handle,
            settings=settings,
            topics=topics,
        )
    )
    runtime.readiness_checks.append(lambda: service.error)
    tasks: list[asyncio.Task[None]] = []

    async def publish(out: Sequence[Outgoing]) -> None:
        await publish_all(broker, out)

    async def every(seconds: float, job: Callable[[], Awaitable[object]], what: str) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("%s failed; trying again in %.0f s", what, seconds)

    async def start() -> None:
        await asyncio.to_thread(service.load)  # not ready (and retried) if the DB is down
        tasks.append(
            asyncio.create_task(
                every(
                    settings.index_refresh_seconds,
                    lambda: asyncio.to_thread(service.refresh),
                    "index refresh",
                )
            )
        )
        tasks.append(
            asyncio.create_task(
                every(
                    settings.park_sweep_seconds,
                    lambda: stage.expire_parked(publish, settings.park_timeout_ms),
                    "parked-message sweep",
                )
            )
        )
        # What identity operations committed but could not publish at once (broker down).
        tasks.append(
            asyncio.create_task(
                every(settings.outbox_seconds, lambda: ops.flush_outbox(publish), "outbox")
            )
        )

    async def stop() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        store.engine.dispose()

    runtime.on_start.append(start)
    runtime.on_stop.append(stop)
    return create_service_app(
        runtime,
        title="HDX patient index",
        routers=[
            build_router(service, settings.public_base_url.rstrip("/"), ops=ops, publish=publish)
        ],
    )
