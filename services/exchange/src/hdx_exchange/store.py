"""The exchange's database adapter: publishers, subscriptions and event numbering."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel, col, select

from hdx_exchange.domain.ingress import Publisher
from hdx_exchange.domain.routing import (
    ChannelType,
    Criteria,
    PayloadContent,
    Subscription,
)
from hdx_exchange.models import DeliveryRow, PublisherRow, SubscriptionRow
from hdx_shared.messaging import Unavailable


def _subscription(row: SubscriptionRow) -> Subscription:
    return Subscription(
        id=row.id,
        subscriber=row.subscriber,
        recipient=row.recipient,
        purpose=row.purpose,
        criteria=Criteria.parse(row.criteria),
        channel=ChannelType(row.channel),
        endpoint=row.endpoint,
        headers=tuple(h for h in row.headers.split("\n") if h),
        payload=PayloadContent(row.payload),
        active=row.status == "active",
    )


class ExchangeStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create_schema(self) -> None:
        SQLModel.metadata.create_all(self.engine)

    # Publishers -----------------------------------------------------------------------
    def publishers(self) -> dict[str, Publisher]:
        with Session(self.engine) as s:
            return {
                r.source: Publisher(r.source, r.name, r.patient_identifier_system, r.active)
                for r in s.exec(select(PublisherRow))
            }

    def put_publisher(self, p: Publisher) -> None:
        with Session(self.engine) as s:
            s.merge(
                PublisherRow(
                    source=p.source,
                    name=p.name,
                    patient_identifier_system=p.patient_identifier_system,
                    active=p.active,
                )
            )
            s.commit()

    # Subscriptions --------------------------------------------------------------------
    def subscriptions(self) -> list[Subscription]:
        with Session(self.engine) as s:
            return [_subscription(r) for r in s.exec(select(SubscriptionRow))]

    def subscription_rows(self, subscriber: str | None = None) -> list[SubscriptionRow]:
        with Session(self.engine) as s:
            q = select(SubscriptionRow)
            if subscriber:
                q = q.where(SubscriptionRow.subscriber == subscriber)
            return list(s.exec(q))

    def subscription_row(self, sid: str) -> SubscriptionRow | None:
        with Session(self.engine) as s:
            return s.get(SubscriptionRow, sid)

    def save_subscription(self, row: SubscriptionRow) -> None:
        with Session(self.engine) as s:
            s.merge(row)
            s.commit()

    # Deliveries -----------------------------------------------------------------------
    def number_events(self, wanted: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str], int]:
        """Event numbers for (subscription, event id, resource type), in the order given.

        An event numbered before keeps its number; new ones take the subscription's next
        numbers. One transaction: numbers are never handed out twice or skipped.
        """
        try:
            return self._number_events(wanted)
        except OperationalError as exc:
            raise Unavailable(f"exchange database: {exc.orig!s}"[:200]) from exc

    def _number_events(self, wanted: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str], int]:
        numbers: dict[tuple[str, str], int] = {}
        if not wanted:
            return numbers
        with Session(self.engine) as s:
            subs = {w[0] for w in wanted}
            events = {w[1] for w in wanted}
            for row in s.exec(
                select(DeliveryRow).where(
                    col(DeliveryRow.subscription_id).in_(subs),
                    col(DeliveryRow.event_id).in_(events),
                )
            ):
                numbers[(row.subscription_id, row.event_id)] = row.event_number
            fresh: dict[str, list[tuple[str, str]]] = {}
            for sub, event, rtype in wanted:
                if (sub, event) not in numbers and (event, rtype) not in fresh.get(sub, []):
                    fresh.setdefault(sub, []).append((event, rtype))
            for sub, items in fresh.items():
                # One atomic increment per subscription reserves a block of numbers, so two
                # replicas numbering for the same subscription never collide.
                last = s.execute(
                    update(SubscriptionRow)
                    .where(col(SubscriptionRow.id) == sub)
                    .values(event_count=SubscriptionRow.event_count + len(items))
                    .returning(col(SubscriptionRow.event_count))
                ).scalar_one()
                first = last - len(items) + 1
                for n, (event, rtype) in enumerate(items, start=first):
                    numbers[(sub, event)] = n
                    s.add(
                        DeliveryRow(
                            subscription_id=sub, event_id=event, event_number=n, resource_type=rtype
                        )
                    )
            s.commit()
        return numbers

    def deliveries(self, subscription_id: str, since: int = 0) -> list[DeliveryRow]:
        with Session(self.engine) as s:
            return list(
                s.exec(
                    select(DeliveryRow)
                    .where(
                        DeliveryRow.subscription_id == subscription_id,
                        DeliveryRow.event_number > since,
                    )
                    .order_by(col(DeliveryRow.event_number))
                )
            )
