"""The tamper-evident audit log: every AuditEvent on hdx.audit, appended to a hash chain in
the exchange's database, its head anchored on hdx.audit.anchors after every batch.

`GET /fhir/AuditEvent?patient=…` answers from it; `GET /admin/audit/verify` (and `hdx audit
verify`) recomputes the chain and compares its end with the newest anchor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from hdx_exchange.domain.audit_chain import Anchor, Problem, verify_chain
from hdx_exchange.store import ExchangeStore
from hdx_shared.fhir import Issue, operation_outcome
from hdx_shared.messaging import Inbound, Outgoing, Unavailable, client_config, dead_letter
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics

log = logging.getLogger(__name__)
# How long verification may take to read the newest anchor before it calls the log unverifiable.
ANCHOR_READ_SECONDS = 15.0


def patient_of(event: dict[str, Any]) -> str | None:
    """The enterprise person an AuditEvent is about (its Patient entity), if any."""
    for entity in event.get("entity", ()):
        ref = (entity.get("what") or {}).get("reference", "") if isinstance(entity, dict) else ""
        if isinstance(ref, str) and ref.startswith("Patient/"):
            return ref.removeprefix("Patient/")
    return None


@dataclass
class AuditLog:
    store: ExchangeStore
    topics: Topics
    settings: HdxSettings

    async def record(self, batch: Sequence[Inbound]) -> list[Outgoing]:
        """Stage handler: append the batch to the chain, then anchor the new head."""
        events: list[tuple[str, str | None, bytes]] = []
        out: list[Outgoing] = []
        for m in batch:
            try:
                doc = orjson.loads(m.value)
                audit_id = doc["id"]
                if doc.get("resourceType") != "AuditEvent" or not isinstance(audit_id, str):
                    raise ValueError("not an AuditEvent with an id")
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                out.append(
                    dead_letter(
                        self.topics,
                        m,
                        "invalid-audit-event",
                        operation_outcome(
                            [Issue(f"the audit log takes AuditEvents with ids: {exc}")]
                        ),
                    )
                )
                continue
            events.append((audit_id, patient_of(doc), m.value))
        if events:
            head = await asyncio.to_thread(self.store.append_audit, events)
            out.append(
                Outgoing(
                    self.topics.audit_anchors,
                    orjson.dumps({"seq": head.seq, "hash": head.hash}),
                    b"head",
                    {"content-type": "application/json"},
                )
            )
        return out

    async def latest_anchor(self) -> Anchor | None:
        """The newest anchor: the last record of each anchors partition, highest seq wins.

        Anchors are appended in chain order, so only each partition's tail matters. A tail
        that exists but cannot be read in time raises Unavailable: "no anchor" would make a
        cut-off log look intact.
        """
        consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_config(self.settings))
        await consumer.start()
        try:
            topic = self.topics.audit_anchors
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await consumer.topics()  # metadata for a topic created after we connected
                partitions = consumer.partitions_for_topic(topic)
            parts = [TopicPartition(topic, p) for p in partitions or ()]
            if not parts:
                return None
            consumer.assign(parts)
            ends = await consumer.end_offsets(parts)
            tails = {tp: ends[tp] - 1 for tp in parts if ends[tp] > 0}
            for tp, last in tails.items():
                consumer.seek(tp, last)
            best: Anchor | None = None
            deadline = asyncio.get_running_loop().time() + ANCHOR_READ_SECONDS
            while tails:
                if asyncio.get_running_loop().time() > deadline:
                    raise Unavailable(f"the audit anchors on {topic} could not be read in time")
                batch = await consumer.getmany(*tails, timeout_ms=500)
                for tp, records in batch.items():
                    for r in records:
                        a = orjson.loads(r.value)
                        if best is None or a["seq"] > best.seq:
                            best = Anchor(int(a["seq"]), str(a["hash"]))
                        if r.offset >= tails.get(tp, r.offset + 1):
                            tails.pop(tp, None)
            return best
        finally:
            await consumer.stop()

    async def verify(self) -> tuple[int, Anchor | None, list[Problem]]:
        anchor = await self.latest_anchor()

        def check() -> tuple[int, list[Problem]]:
            records = list(self.store.audit_chain())
            return len(records), verify_chain(records, anchor)

        count, problems = await asyncio.to_thread(check)
        return count, anchor, problems
