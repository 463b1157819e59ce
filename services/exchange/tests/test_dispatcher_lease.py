"""The rest-hook dispatcher with several exchange processes: a sender whose lease on a
subscription ran out (its retries outlasted it) stops, and leaves the notification to the
process that took the lease over."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import httpx

from hdx_exchange.dispatcher import RestHookDispatcher
from hdx_exchange.domain.routing import ChannelType, Criteria, PayloadContent, Subscription
from hdx_exchange.models import DeliveryRow
from hdx_exchange.settings import ExchangeSettings
from hdx_shared.messaging import Outgoing
from hdx_shared.topics import Topics

SUB = Subscription(
    id="s1",
    subscriber="home",
    recipient="Organization/home",
    purpose="TREAT",
    criteria=Criteria.parse("Observation"),
    channel=ChannelType.REST_HOOK,
    endpoint="http://receiver.invalid/hook",
    headers=(),
    payload=PayloadContent.FULL,
    active=True,
)


@dataclass
class LeaseStore:
    """Holds the lease for the first `held` claims, then another process has it."""

    held: int
    claims: int = 0
    attempts: list[str] = field(default_factory=list)
    released: int = 0

    def claim_dispatch(self, sid: str, owner: str, lease_seconds: float) -> bool:
        self.claims += 1
        return self.claims <= self.held

    def release_dispatch(self, sid: str, owner: str) -> None:
        self.released += 1

    def next_pending(self, sid: str) -> DeliveryRow | None:
        row = DeliveryRow(
            id=1, subscription_id=sid, event_id="e1", event_number=1, resource_type="Observation"
        )
        row.state, row.payload = "pending", b"{}"
        return row

    def record_attempt(
        self, delivery_id: int, *, state: str, error: str | None, next_at: datetime | None
    ) -> None:
        self.attempts.append(state)


@dataclass
class Registry:
    subscriptions: dict[str, Subscription]


async def _publish(records: Sequence[Outgoing]) -> None:
    raise AssertionError("nothing is dead-lettered while the lease is lost")


async def test_a_sender_that_lost_its_lease_stops_retrying() -> None:
    posts = 0

    def failing(request: httpx.Request) -> httpx.Response:
        nonlocal posts
        posts += 1
        return httpx.Response(503)

    store = LeaseStore(held=1)  # the claim before sending; lost before the first retry
    settings = ExchangeSettings(
        rest_hook_max_attempts=5,
        rest_hook_backoff_base_seconds=0.001,
        rest_hook_backoff_max_seconds=0.001,
    )
    dispatcher = RestHookDispatcher(
        store,  # type: ignore[arg-type]
        Registry({"s1": SUB}),  # type: ignore[arg-type]
        settings,
        Topics(),
        _publish,
        rng=random.Random(1),
    )
    dispatcher._client = httpx.AsyncClient(transport=httpx.MockTransport(failing))
    try:
        await dispatcher._send_all("s1")
    finally:
        await dispatcher._client.aclose()
    assert posts == 1, "the retry was sent without the lease"
    assert store.attempts == ["pending"], "the notification stays pending for the new holder"
    assert store.released == 1
