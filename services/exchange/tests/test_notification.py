from __future__ import annotations

import orjson

from hdx_exchange.domain.notification import build_notification, notification_id
from hdx_exchange.domain.routing import ChannelType, Criteria, PayloadContent, Subscription

RESOURCE = b'{"resourceType":"Observation","id":"o1","status":"final"}'


def subscription(payload: PayloadContent = PayloadContent.FULL) -> Subscription:
    return Subscription(
        "s1",
        "home",
        "Organization/home",
        "TREAT",
        Criteria.parse("Observation"),
        ChannelType.KAFKA,
        payload=payload,
    )


def notify(payload: PayloadContent = PayloadContent.FULL, number: int = 7) -> dict:  # type: ignore[type-arg]
    return orjson.loads(
        build_notification(
            subscription(payload),
            event_id="e1",
            event_number=number,
            resource_type="Observation",
            resource_id="o1",
            resource=RESOURCE,
            source="urn:hdx:org:a",
            base_url="http://hdx/fhir",
        )
    )


def test_full_resource_notification_has_the_backport_shape() -> None:
    bundle = notify()
    assert bundle["type"] == "history"
    status, focus = (e["resource"] for e in bundle["entry"])
    params = {p["name"]: p for p in status["parameter"]}
    assert status["meta"]["profile"][0].endswith("backport-subscription-status-r4")
    assert params["type"]["valueCode"] == "event-notification"
    assert params["events-since-subscription-start"]["valueString"] == "7"
    parts = {p["name"]: p for p in params["notification-event"]["part"]}
    assert parts["event-number"]["valueString"] == "7"
    assert parts["focus"]["valueReference"]["reference"] == "Observation/o1"
    assert focus == orjson.loads(RESOURCE)


def test_the_same_event_gives_the_same_notification_id() -> None:
    assert notify()["id"] == notify()["id"] == notification_id("s1", "e1")


def test_id_only_and_empty_payloads_carry_no_resource() -> None:
    id_only = notify(PayloadContent.ID_ONLY)
    assert "resource" not in id_only["entry"][1]
    assert id_only["entry"][1]["request"]["url"] == "Observation/o1"
    assert len(notify(PayloadContent.EMPTY)["entry"]) == 1


def test_a_deletion_tells_the_subscriber_to_delete_and_carries_no_content() -> None:
    bundle = orjson.loads(
        build_notification(
            subscription(),
            event_id="e9",
            event_number=8,
            resource_type="Observation",
            resource_id="o1",
            resource=RESOURCE,
            source="urn:hdx:org:a",
            base_url="http://hdx/fhir",
            deleted=True,
        )
    )
    entry = bundle["entry"][1]
    assert entry["request"] == {"method": "DELETE", "url": "Observation/o1"}
    assert "resource" not in entry
