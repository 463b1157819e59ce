"""Telemetry bootstrap: JSON logs that carry trace ids, and OpenTelemetry tracing configured
only by the standard OTEL_* variables (off unless an exporter is asked for)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from hdx_shared.settings import HdxSettings


def _add_trace_ids(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event["trace_id"] = format(ctx.trace_id, "032x")
        event["span_id"] = format(ctx.span_id, "016x")
    return event


class RepeatThrottle(logging.Filter):
    """Let a Kafka client's record through at most once per `seconds` for each message
    template, and say how many like it were held back.

    While a broker is away, aiokafka logs the same connection and fetch errors every ~100 ms
    for every consumer and producer; a minute's outage would be thousands of lines."""

    def __init__(
        self,
        prefix: str = "aiokafka",
        seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefix, self.seconds, self.clock = prefix, seconds, clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.seconds:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if len(self._last) > 1000:  # bounded: templates, not values, are the keys
            self._last.clear()
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} like it in the last {self.seconds:.0f}s held back)"
        return True


def setup_logging(settings: HdxSettings) -> None:
    """Route stdlib and structlog through one JSON (or console) renderer on stderr."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.log_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(RepeatThrottle())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # aiokafka is chatty at INFO about group membership; keep it to warnings.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def setup_tracing(settings: HdxSettings) -> TracerProvider | None:
    """A tracer provider when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER asks for one."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter_name in ("", "none") and not endpoint:
        return None
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"hdx-{settings.service_name}")}
    )
    provider = TracerProvider(resource=resource)
    if exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        exporter: Any
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            exporter = HttpExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def kafka_middlewares(provider: TracerProvider | None) -> list[Any]:
    """faststream middlewares for HDX's brokers: none.

    Tracing is hdx_shared.messaging's: faststream's batch subscribers would make one span
    per batch, and HDX wants one trace per message across every hop (two tracing layers
    would double the spans and the traceparent headers). Metrics are the stages' own
    (hdx_stage_*), and records are published straight through aiokafka, so faststream's
    per-message Prometheus middleware would only cost time.
    """
    del provider
    return []


def tracing_enabled() -> bool:
    """True once setup_tracing installed the SDK's provider (else the API's no-op one)."""
    return type(trace.get_tracer_provider()).__module__.startswith("opentelemetry.sdk")


def instrument_app(app: Any) -> None:
    """HTTP server spans for a service's FastAPI app, when tracing is on."""
    if not tracing_enabled():
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics")


def instrument_engine(engine: Any) -> None:
    """Database spans for a service's SQLAlchemy engine, when tracing is on."""
    if not tracing_enabled():
        return
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    # The instrumentation declares SQLAlchemy < 2.1 and refuses 2.1 without this; its
    # cursor events are unchanged in 2.1 (checked by tests/flows/test_tracing.py).
    SQLAlchemyInstrumentor().instrument(engine=engine, skip_dep_check=True)
