"""rest-hook delivery: each subscription's notifications POSTed in order, with retries.

Every subscription with work gets its own task, so a slow or dead endpoint holds up only its
own notifications. A failed POST is retried with exponential back-off and full jitter; after
`rest_hook_max_attempts` the notification goes to the dead-letter topic (reason
`rest-hook-failed`, with the subscription id), the Subscription's status shows the error, and
the next notification is tried. A subscriber that sees a gap in the event numbers can ask
`$events` for what it missed.

Notifications wait in the database (queued by the delivery stage before it commits), so a
crash loses none; one sent but not yet marked sent is sent again with the same event number
and Bundle id, which the subscriber can drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import orjson

from hdx_exchange.domain.routing import Subscription
from hdx_exchange.models import DeliveryRow
from hdx_exchange.pipeline import Registry
from hdx_exchange.settings import ExchangeSettings
from hdx_exchange.store import ExchangeStore
from hdx_shared.fhir import FHIR_JSON, Issue, operation_outcome
from hdx_shared.messaging import Outgoing, Publish
from hdx_shared.topics import Topics

log = logging.getLogger(__name__)


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: a random wait up to base·2^attempt, capped."""
    return rng.uniform(0, min(cap, base * 2**attempt))


def _headers(sub: Subscription) -> dict[str, str]:
    headers = {"content-type": FHIR_JSON}
    for line in sub.headers:
        name, _, value = line.partition(":")
        if name.strip() and value.strip():
            headers[name.strip()] = value.strip()
    return headers


@dataclass
class RestHookDispatcher:
    store: ExchangeStore
    registry: Registry
    settings: ExchangeSettings
    topics: Topics
    publish: Publish
    owner: str = field(default_factory=lambda: f"exchange-{uuid.uuid4()}")
    rng: random.Random = field(default_factory=random.Random)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _client: httpx.AsyncClient | None = None
    _errored: set[str] = field(default_factory=set)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Find subscriptions with pending notifications and keep one sender per each."""
        self._client = httpx.AsyncClient(timeout=self.settings.rest_hook_timeout_seconds)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                self._wake.clear()
                try:
                    pending = await asyncio.to_thread(self.store.subscriptions_with_pending)
                except Exception as exc:  # the database is down: try again shortly
                    log.warning("rest-hook dispatcher cannot read the queue: %s", exc)
                    continue
                for sid in pending:
                    task = self._tasks.get(sid)
                    if task is None or task.done():
                        self._tasks[sid] = asyncio.create_task(self._send_all(sid))
        finally:
            for task in self._tasks.values():
                task.cancel()
            for task in self._tasks.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._client.aclose()

    async def _claim(self, sid: str) -> bool:
        """Take or renew the lease on sending `sid`'s notifications (an atomic conditional
        UPDATE, so of several exchange processes one holds it)."""
        lease = self.settings.rest_hook_lease_seconds
        return await asyncio.to_thread(self.store.claim_dispatch, sid, self.owner, lease)

    async def _send_all(self, sid: str) -> None:
        if not await self._claim(sid):
            return  # another exchange process sends this subscription's notifications
        try:
            while True:
                row = await asyncio.to_thread(self.store.next_pending, sid)
                if row is None:
                    return
                sub = self.registry.subscriptions.get(sid)
                if sub is None or not sub.endpoint:
                    return
                if not await self._send(sub, row) or not await self._claim(sid):
                    return  # the lease ran out and another process took over
        finally:
            await asyncio.to_thread(self.store.release_dispatch, sid, self.owner)

    async def _send(self, sub: Subscription, row: DeliveryRow) -> bool:
        """POST one notification until it is sent or given up on; False if the lease was
        lost on the way (retries can outlast it), leaving the notification to its holder."""
        assert self._client is not None and row.id is not None and sub.endpoint
        max_attempts = self.settings.rest_hook_max_attempts
        attempt = row.attempts
        while True:
            if attempt > row.attempts and not await self._claim(sub.id):
                return False
            error: str | None
            try:
                response = await self._client.post(
                    sub.endpoint, content=row.payload or b"", headers=_headers(sub)
                )
                error = None if response.is_success else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
            attempt += 1
            if error is None:
                await asyncio.to_thread(
                    self.store.record_attempt, row.id, state="delivered", error=None, next_at=None
                )
                if sub.id in self._errored:
                    self._errored.discard(sub.id)
                    await asyncio.to_thread(
                        self.store.set_subscription_status, sub.id, "active", None
                    )
                return True
            if attempt >= max_attempts:
                await self._give_up(sub, row, error)
                return True
            wait = backoff_seconds(
                attempt,
                self.settings.rest_hook_backoff_base_seconds,
                self.settings.rest_hook_backoff_max_seconds,
                self.rng,
            )
            log.info(
                "rest-hook %s event %d failed (%s); retry %d in %.2fs",
                sub.id,
                row.event_number,
                error,
                attempt,
                wait,
            )
            await asyncio.to_thread(
                self.store.record_attempt,
                row.id,
                state="pending",
                error=error,
                next_at=datetime.now(UTC) + timedelta(seconds=wait),
            )
            await asyncio.sleep(wait)

    async def _give_up(self, sub: Subscription, row: DeliveryRow, error: str) -> None:
        assert row.id is not None
        outcome = operation_outcome(
            [
                Issue(
                    f"rest-hook {sub.endpoint} failed "
                    f"{self.settings.rest_hook_max_attempts} times; last: {error}",
                    code="transient",
                )
            ]
        )
        headers = {
            "hdx_reason": "rest-hook-failed",
            "hdx_outcome": orjson.dumps(outcome).decode(),
            "hdx_subscription": sub.id,
            "hdx_event_number": str(row.event_number),
            "ce_id": row.event_id,
            "content-type": FHIR_JSON,
        }
        # The dead letter first: if it cannot be written, the notification stays pending.
        await self.publish(
            [Outgoing(self.topics.deadletter, row.payload or b"", sub.id.encode(), headers)]
        )
        await asyncio.to_thread(
            self.store.record_attempt, row.id, state="failed", error=error, next_at=None
        )
        self._errored.add(sub.id)
        await asyncio.to_thread(
            self.store.set_subscription_status,
            sub.id,
            "error",
            f"event {row.event_number}: {error}",
        )
        log.warning("rest-hook %s gave up on event %d: %s", sub.id, row.event_number, error)
