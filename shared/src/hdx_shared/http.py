"""HTTP plumbing every service's FHIR API shares: FHIR JSON responses, OperationOutcome for
every error, health endpoints, and the app factory that runs the Kafka broker in the same
lifespan as the HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from faststream.kafka import KafkaBroker
from limits import RateLimitItem, parse_many
from prometheus_client import Counter, make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hdx_shared.auth import Authenticator, RateLimit, install_auth
from hdx_shared.fhir import FHIR_JSON, FhirError, Issue, operation_outcome
from hdx_shared.messaging import (
    Outgoing,
    StageHealth,
    Unavailable,
    ensure_topics,
    keep_topics,
    publish_all,
    start_broker,
)
from hdx_shared.security_audit import security_alert, security_alert_record
from hdx_shared.settings import HdxSettings
from hdx_shared.telemetry import instrument_app
from hdx_shared.topics import Topics

log = logging.getLogger(__name__)


class FhirResponse(Response):
    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        return orjson.dumps(content)


def outcome_response(status: int, issues: Sequence[Issue]) -> FhirResponse:
    return FhirResponse(operation_outcome(issues), status_code=status)


RefusalHook = Callable[[Request, FhirError], Awaitable[None]]


def install_fhir_errors(app: FastAPI, on_refused: RefusalHook | None = None) -> None:
    """Every error an HDX API returns is a FHIR OperationOutcome; a 401 or 403 is also handed
    to `on_refused` (SecurityAlerts.refused records it) before it is answered."""

    @app.exception_handler(FhirError)
    async def _fhir_error(req: Request, exc: FhirError) -> Response:
        if on_refused is not None and exc.http_status in (401, 403) and not exc.audited:
            await on_refused(req, exc)
        return FhirResponse(exc.outcome(), status_code=exc.http_status, headers=exc.headers)

    @app.exception_handler(Unavailable)
    async def _unavailable(_req: Request, exc: Unavailable) -> Response:
        # Fail closed, and say so: the caller may retry once the dependency is back.
        return outcome_response(503, [Issue(f"unavailable: {exc}", code="transient")])

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> Response:
        issues = [
            Issue(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}") for e in exc.errors()[:20]
        ]
        return outcome_response(400, issues)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> Response:
        code = {
            404: "not-found",
            401: "login",
            403: "forbidden",
            413: "too-costly",
            405: "not-supported",
            409: "conflict",
            412: "conflict",
        }.get(exc.status_code, "processing")
        return outcome_response(exc.status_code, [Issue(str(exc.detail), code=code)])

    @app.exception_handler(Exception)
    async def _crash(_req: Request, exc: Exception) -> Response:
        log.exception("unhandled error in HTTP handler")
        return outcome_response(
            500, [Issue(f"internal error: {type(exc).__name__}", code="exception")]
        )


SECURITY_ALERTS_SUPPRESSED = Counter(
    "hdx_security_alerts_suppressed_total",
    "Refused requests not written as security alerts: over HDX_AUTH_ALERT_LIMIT",
    ["kind"],
)


@dataclass
class SecurityAlerts:
    """Writes a security-alert AuditEvent (hdx_shared.security_audit) to the audit topic for
    each request a service refuses: no valid token, a token that does not allow it, a
    refused token request. At most `limits` per caller and kind, so a flood of bad requests
    is counted, not written; a broker that does not take the alert within 5 s is logged,
    and the refusal is answered anyway."""

    settings: HdxSettings
    topics: Topics
    publish: Callable[[Sequence[Outgoing]], Awaitable[None]]
    limits: list[RateLimitItem]
    _limit: RateLimit = field(init=False)

    def __post_init__(self) -> None:
        self._limit = RateLimit(self.limits)

    async def refused(self, request: Request, error: FhirError) -> None:
        caller = getattr(request.state, "hdx_caller", None)
        await self.record(
            request,
            "unauthenticated" if error.http_status == 401 else "forbidden",
            "; ".join(i.diagnostics for i in error.issues),
            client_id=getattr(caller, "client_id", None),
        )

    async def record(
        self, request: Request, kind: str, description: str, client_id: str | None
    ) -> None:
        address = request.client.host if request.client else None
        agent = client_id or address or "?"
        if self._limit.retry_after(kind, agent) is not None:
            SECURITY_ALERTS_SUPPRESSED.labels(kind).inc()
            return
        alert = security_alert(
            what=kind,
            description=description,
            observer=self.settings.service_name,
            client_id=client_id,
            client_address=address,
            request=f"{request.method} {request.url.path}",
        )
        try:
            record = security_alert_record(self.topics, alert)
            await asyncio.wait_for(self.publish([record]), 5)
        except Exception as exc:  # the refusal stands; the missing alert is logged
            log.warning("security alert %s for %s not recorded: %s", kind, agent, exc)


ReadinessCheck = Callable[[], str | None]


@dataclass
class ServiceRuntime:
    """What a running service is made of, as its composition root wired it."""

    settings: HdxSettings
    topics: Topics
    broker: KafkaBroker
    stages: list[StageHealth] = field(default_factory=list)
    readiness_checks: list[ReadinessCheck] = field(default_factory=list)
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Long-running loops (refreshes, sweeps, senders): started after on_start, cancelled
    # before on_stop.
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    started: bool = False

    def not_ready_reasons(self) -> list[str]:
        reasons = [] if self.started else ["starting"]
        # A stage waiting on a dependency, whose consume loop ended, or whose commits,
        # publishes or fetches keep failing (StageHealth.problem).
        reasons += [f"{s.name}: {problem}" for s in self.stages if (problem := s.problem())]
        reasons += [r for check in self.readiness_checks if (r := check())]
        return reasons


def health_router(runtime: ServiceRuntime) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> Response:
        """Liveness: the process is up and serving, and no stage's consume loop has ended
        (a stopped loop never comes back by itself: the process must be restarted)."""
        stopped = [s.name for s in runtime.stages if s.loop_stopped()]
        body = {
            "status": "ok" if not stopped else "consume loop stopped",
            "service": runtime.settings.service_name,
            **({"stages": stopped} if stopped else {}),
        }
        return Response(
            orjson.dumps(body),
            status_code=200 if not stopped else 503,
            media_type="application/json",
        )

    @router.get("/readyz")
    async def readyz() -> Response:
        """Readiness: connected, state loaded, every stage consuming: none waiting on an
        unavailable dependency, none whose consume loop ended, none whose commits,
        publishes or fetches have been failing longer than HDX_STAGE_FAILURE_SECONDS."""
        reasons = runtime.not_ready_reasons()
        body = {
            "status": "ready" if not reasons else "not-ready",
            "reasons": reasons,
            "stages": [
                {
                    "name": s.name,
                    "ready": s.ready,
                    "reason": s.reason,
                    "problem": s.problem(),
                    "messages": s.messages,
                    "dead_lettered": s.dead_lettered,
                }
                for s in runtime.stages
            ],
        }
        return Response(
            orjson.dumps(body),
            status_code=200 if not reasons else 503,
            media_type="application/json",
        )

    return router


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before it is
    read — at once when Content-Length says so, else as soon as the count passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False
                if too_large:
                    issue = Issue(str(BodyTooLarge(self.max_bytes).detail), code="too-costly")
                    await outcome_response(413, [issue])(scope, receive, send)
                    return
        seen = 0

        async def counting() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting, send)


def create_service_app(
    runtime: ServiceRuntime,
    *,
    title: str,
    routers: Sequence[APIRouter],
    auth: Authenticator | None = None,
) -> FastAPI:
    """The HTTP app and the Kafka broker share one lifespan: both start, both stop.

    Every route a router brings is as protected as its dependencies say (hdx_shared.auth);
    `auth` defaults to checking tokens against the issuer's JWKS from the settings."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await ensure_topics(runtime.settings, runtime.topics.core())
        for hook in runtime.on_start:
            await hook()
        await start_broker(runtime.broker)
        tasks = [asyncio.create_task(loop()) for loop in runtime.background]
        # A broker that restarted without its data: its topics come back (see keep_topics).
        tasks.append(asyncio.create_task(keep_topics(runtime.settings, runtime.topics.core)))
        runtime.started = True
        log.info("%s started", runtime.settings.service_name)
        try:
            yield
        finally:
            runtime.started = False
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Stopping the broker leaves the group and flushes the producer; an in-flight
            # batch that is cut short is not committed and will be redelivered.
            await runtime.broker.stop()
            for hook in runtime.on_stop:
                await hook()
            log.info("%s stopped", runtime.settings.service_name)

    app = FastAPI(title=title, lifespan=lifespan, default_response_class=FhirResponse)

    async def publish(records: Sequence[Outgoing]) -> None:
        await publish_all(runtime.broker, records)

    alerts = SecurityAlerts(
        runtime.settings, runtime.topics, publish, parse_many(runtime.settings.auth_alert_limit)
    )
    app.state.hdx_security_alerts = alerts  # for refusals an app answers itself (OAuth)
    install_fhir_errors(app, on_refused=alerts.refused)
    install_auth(app, auth or Authenticator.from_settings(runtime.settings))
    app.add_middleware(BodyLimit, max_bytes=runtime.settings.max_request_bytes)
    app.include_router(health_router(runtime))
    # Prometheus scrapes this; the Kafka middleware and the stages feed it.
    app.mount("/metrics", make_asgi_app())
    instrument_app(app)
    for r in routers:
        app.include_router(r)
    return app


def serve(app: FastAPI, settings: HdxSettings) -> None:
    """Run one service in this process until SIGINT/SIGTERM."""
    import uvicorn

    settle_heap_after_start(app, settings)
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )


def settle_heap_after_start(app: FastAPI, settings: HdxSettings) -> None:
    """A service process's garbage collector, set for a long-lived service with a large
    heap (settings.gc_young_threshold says why): the young generation's threshold raised,
    and — once the app has started, its modules imported and its state loaded — what is
    alive moved to the permanent generation, which full passes do not scan. Freed objects
    are still freed by reference counting; only cycles among frozen ones would stay.

    Only for a process of its own (`serve`): tests run many apps in one interpreter."""
    if settings.gc_young_threshold <= 0:
        return
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(settings.gc_young_threshold, older, oldest)
    started = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(inner: FastAPI) -> AsyncIterator[Any]:
        async with started(inner) as state:
            gc.collect()
            gc.freeze()
            log.info("heap settled: %d objects frozen", gc.get_freeze_count())
            yield state

    app.router.lifespan_context = lifespan
