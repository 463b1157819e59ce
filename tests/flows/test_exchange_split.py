"""The exchange's stages split between two processes sharing one database (issue #8): a
hospital's Patient and Observation are validated and identified (ingress), routed and
consented (router) in one process, numbered and delivered (delivery) and audited
(audit-log) in the other — delivered once, the audit chain intact, invalid input
dead-lettered. Its own stack on the session's broker, under its own topic prefix."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint as Broker
from hdx_shared.envelope import derive_event_id
from hdx_shared.topics import Topics
from tests.support import (
    Publisher,
    Record,
    TopicReader,
    api,
    nhs_number,
    observation,
    patient,
    register_publisher,
    subscription_resource,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FRONT, BACK = "ingress,router", "delivery,audit-log"


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _stage_names(url: str) -> list[str]:
    return [s["name"] for s in httpx.get(f"{url}/readyz", timeout=5).json()["stages"]]


def _read_to_end(reader: TopicReader, timeout: float = 30) -> list[Record]:
    """Everything on the reader's topics up to their high watermarks as of now."""
    consumer = reader.consumer
    parts = consumer.assignment()
    ends = {(p.topic, p.partition): consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
    deadline = time.monotonic() + timeout
    while any(
        p.offset < ends[(p.topic, p.partition)]
        for p in consumer.position(parts)
        if ends[(p.topic, p.partition)] > 0
    ):
        assert time.monotonic() < deadline, f"could not read {reader.topics} to the end"
        reader.poll()
    return reader.records


def _observation_id(record: Record) -> str | None:
    for entry in record.json().get("entry", []):
        resource: dict[str, Any] = entry.get("resource", {})
        if resource.get("resourceType") == "Observation":
            return str(resource.get("id"))
    return None


def test_the_exchange_split_in_two_processes_delivers_once_and_audits(
    kafka: Broker, tmp_path: Path
) -> None:
    tag = _tag()
    topics = Topics(f"split{tag}.")
    stack = LocalStack(
        data_dir=tmp_path / "hdx",
        bootstrap_servers=kafka.bootstrap_servers,
        extra_env={
            "HDX_KAFKA_IDEMPOTENCE": str(kafka.idempotence).lower(),
            "HDX_ENVIRONMENT": "test",
            "HDX_LOG_JSON": "true",
            "HDX_REGISTRY_REFRESH_SECONDS": "0.5",
            "HDX_TOPIC_PREFIX": topics.prefix,
        },
        replica_env={"exchange": [{"HDX_EXCHANGE_STAGES": FRONT}, {"HDX_EXCHANGE_STAGES": BACK}]},
    )
    stack.start(ready_timeout=90)
    readers: list[TopicReader] = []
    try:
        front, back = stack.replicas_of("exchange")
        assert back.log_path.name == "exchange-2.log"
        assert _stage_names(front.url) == ["ingress", "router"]
        assert _stage_names(back.url) == ["delivery", "audit-log"]

        ex = stack.url("exchange")
        source = f"urn:hdx:org:split-{tag}"
        register_publisher(ex, source)
        org = f"split-care-{tag}"
        r = api(stack).post(
            f"{ex}/fhir/Subscription",
            content=orjson.dumps(subscription_resource(f"Organization/{org}")),
            headers={"content-type": "application/fhir+json"},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        feed = TopicReader(kafka.bootstrap_servers, [topics.feed(org)])
        dlq = TopicReader(kafka.bootstrap_servers, [topics.deadletter])
        readers += [feed, dlq]
        publisher = Publisher(kafka.bootstrap_servers, idempotence=kafka.idempotence)

        def publish(resource: dict[str, Any]) -> str:
            ce_id = publisher.publish(source, resource, topic=topics.inbound)
            return derive_event_id(source, ce_id, "0")

        pid = f"p-{tag}"
        publish(patient(pid, nhs_number()))
        oids = [f"o-{tag}-{i}" for i in range(3)]
        events = [publish(observation(oid, pid, value=i)) for i, oid in enumerate(oids)]
        bad = {"resourceType": "Observation", "id": f"bad-{tag}", "status": "final"}
        bad_id = publisher.publish(source, bad, topic=topics.inbound)

        for oid in oids:
            feed.wait_for(lambda rec, oid=oid: _observation_id(rec) == oid, 60, oid)
        dead = dlq.wait_for(lambda rec: rec.headers.get("ce_id") == bad_id, 60, "the bad one")
        assert dead.headers["hdx_reason"] == "invalid-resource"

        # Exactly once: each event in the feed one time, numbered 1, 2, 3 in order.
        records = [rec for rec in _read_to_end(feed) if rec.headers.get("ce_id") in events]
        assert [rec.headers["ce_id"] for rec in records] == events
        assert [rec.headers["hdx_event_number"] for rec in records] == ["1", "2", "3"]
        assert [_observation_id(rec) for rec in records] == oids
        # Made by the second process, they name the exchange's one public address.
        status_urls = [rec.json()["entry"][0]["request"]["url"] for rec in records]
        assert all(url.startswith(f"{ex}/fhir/Subscription/") for url in status_urls), status_urls

        # The audit log (in the second process) chained every decision; the chain and its
        # newest anchor verify, asked of the first process.
        deadline = time.monotonic() + 60
        while True:
            result = api(stack).get(f"{ex}/admin/audit/verify", timeout=60).json()
            anchor = result["anchor"]
            if result["records"] >= 3 and anchor and anchor["seq"] == result["records"]:
                break
            assert time.monotonic() < deadline, result
            time.sleep(0.5)
        assert result["intact"], result["problems"]
    finally:
        for reader in readers:
            reader.close()
        stack.stop()
