"""The path of one message through HDX, read back from the records it left on the topics.

`hdx trace EVENT_ID` uses this: it needs no tracing backend, only the broker. It reads every
HDX topic's retained records (so it is an operator's tool for one message, not a query
engine) and lists, in time order, each hop the event took: accepted or dead-lettered,
identified, routed, each consent decision with its reasons, each delivery with its number.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from hdx_shared.envelope import Header, derive_event_id
from hdx_shared.messaging import client_config
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics


@dataclass(frozen=True)
class Hop:
    timestamp_ms: int
    topic: str
    what: str
    detail: str


async def _records(settings: HdxSettings, topics: list[str]) -> list[Any]:
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_config(settings))
    await consumer.start()
    try:
        parts = [
            TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())
        ]
        if not parts:
            return []
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        remaining = {tp for tp in parts if ends[tp] > 0}
        out: list[Any] = []
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            if not batch:
                break
            for tp, records in batch.items():
                out.extend(records)
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
        return out
    finally:
        await consumer.stop()


def _headers(record: Any) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in (record.headers or ())}


def describe(record: Any, topics: Topics) -> tuple[str, str]:
    """What a record says about the event: (what, detail); no patient data."""
    h = _headers(record)
    topic = record.topic
    if topic == topics.deadletter:
        outcome = orjson.loads(h.get(Header.OUTCOME.value, "{}") or "{}")
        why = "; ".join(i.get("diagnostics", "") for i in outcome.get("issue", []))
        return f"dead-lettered ({h.get(Header.REASON.value)})", why
    if topic == topics.audit:
        ev = orjson.loads(record.value)
        if ev.get("type", {}).get("code") == "110113":  # hdx_shared.security_audit
            kind = next((s.get("code") for s in ev.get("subtype", [])), "?")
            return f"security alert ({kind})", str(ev.get("outcomeDesc", ""))
        decision = "permit" if ev.get("outcome") == "0" else "deny"
        recipient = next(
            (
                a.get("who", {}).get("reference")
                for a in ev.get("agent", [])
                if a.get("who", {}).get("reference")
            ),
            "?",
        )
        return f"consent {decision} → {recipient}", str(ev.get("outcomeDesc", ""))
    if topic.startswith(f"{topics.prefix}feed."):
        return (
            f"delivered to {topic.removeprefix(topics.prefix + 'feed.')}",
            f"subscription {h.get('hdx_subscription')} event #{h.get('hdx_event_number')}",
        )
    if topic == topics.inbound:
        return "published", f"by {h.get(Header.SOURCE.value)}"
    if (name := topics.publisher_topic_name(topic)) is not None:
        return "published", f"on {name}'s own topic" + (
            f" as {h[Header.SOURCE.value]}" if h.get(Header.SOURCE.value) else ""
        )
    if topic == topics.validated:
        return "accepted", f"{h.get(Header.RESOURCE_TYPE.value)} from {h.get(Header.SOURCE.value)}"
    if topic == topics.identified:
        return "identified", f"person {h.get(Header.PERSON.value)}"
    if topic == topics.routed:
        candidates = orjson.loads(h.get(Header.CANDIDATES.value, "[]") or "[]")
        return "routed", ", ".join(c.get("recipient", "?") for c in candidates)
    if topic == topics.decided:
        permitted = orjson.loads(h.get(Header.PERMITTED.value, "[]") or "[]")
        return "permitted", ", ".join(c.get("recipient", "?") for c in permitted)
    return topic, ""


async def message_path(
    settings: HdxSettings, event_id: str, source: str | None = None
) -> list[Hop]:
    """Every record about one event. `event_id` is HDX's event id, or — with `source` — the
    publisher's own ce_id (its resources' HDX ids are derived from it)."""
    topics = Topics(settings.topic_prefix)
    wanted = {event_id}
    if source:
        # A Bundle's entries each get their own derived id; 10,000 is the entry limit.
        wanted |= {derive_event_id(source, event_id, str(i)) for i in range(10_000)}
    admin = AIOKafkaConsumer(**client_config(settings))
    await admin.start()
    try:
        names = await admin.topics()
    finally:
        await admin.stop()
    scanned = [
        t for t in names if t.startswith(topics.prefix) and t not in (topics.links, topics.consents)
    ]
    hops: list[Hop] = []
    for record in await _records(settings, scanned):
        h = _headers(record)
        ids = {h.get(Header.ID.value), h.get("hdx_subject_event")}
        published = record.topic == topics.inbound or topics.publisher_topic_name(record.topic)
        claimed = h.get(Header.SOURCE.value)
        if published and source and claimed and claimed != source:
            continue  # another publisher's event of the same ce_id
        if wanted & ids:
            what, detail = describe(record, topics)
            hops.append(Hop(record.timestamp, record.topic, what, detail))
    return sorted(hops, key=lambda hop: hop.timestamp_ms)


def find_path(settings: HdxSettings, event_id: str, source: str | None = None) -> list[Hop]:
    return asyncio.run(message_path(settings, event_id, source))
