"""What `hdx trace` says about each kind of record (hdx_shared.message_path.describe)."""

from __future__ import annotations

from types import SimpleNamespace

import orjson

from hdx_shared.message_path import describe
from hdx_shared.security_audit import security_alert
from hdx_shared.topics import Topics

TOPICS = Topics("hdx.")


def record(topic: str, value: bytes = b"{}", **headers: str) -> SimpleNamespace:
    return SimpleNamespace(
        topic=topic, value=value, headers=[(k, v.encode()) for k, v in headers.items()]
    )


def test_a_record_on_a_publishers_own_topic_is_published_by_that_publisher() -> None:
    assert describe(record("hdx.inbound.st-marys"), TOPICS) == (
        "published",
        "on st-marys's own topic",
    )
    claimed = record("hdx.inbound.st-marys", ce_source="urn:hdx:org:st-marys")
    assert describe(claimed, TOPICS)[1] == "on st-marys's own topic as urn:hdx:org:st-marys"
    assert describe(record("hdx.inbound", ce_source="urn:a"), TOPICS) == ("published", "by urn:a")


def test_a_security_alert_is_not_taken_for_a_consent_decision() -> None:
    alert = security_alert(
        what="publish-as-other-source",
        description="topic hdx.inbound.a is urn:a's",
        observer="exchange",
        kafka_topic="hdx.inbound.a",
    )
    what, detail = describe(record("hdx.audit", orjson.dumps(alert)), TOPICS)
    assert what == "security alert (publish-as-other-source)"
    assert detail == "topic hdx.inbound.a is urn:a's"
