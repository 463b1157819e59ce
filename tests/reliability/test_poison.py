"""Poison messages: real inputs that make a real service's handler raise are dead-lettered
(`processing-failed`, with an OperationOutcome) after a bounded number of attempts, and the
partition moves on.

Two inputs found by the hostile corpus and by reading the handlers:
- the exchange's ingress raises TypeError on a Bundle whose `entry` is a number
  (hdx_shared.fhir.decode_resource takes len() of it);
- the patient index raises ValueError on a valid Patient whose NHS number holds a digit
  that is not a decimal digit, such as '²' (str.isdigit() is true, int() fails).
Both are bugs (tests/reliability/test_regressions.py); here they serve as real poison. The
poison and the traffic after it share one partition of the stage's input, so each batch the
stage retries is the same batch (see test_regressions for what happens when it is not).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint as Broker
from hdx_shared.envelope import derive_event_id
from hdx_shared.topics import Topics
from tests.reliability.harness import (
    BulkPublisher,
    Rec,
    TopicTail,
    assert_alive,
    ce_headers,
    log_events,
    pids,
    record_figures,
    subscribe,
    tag,
    validated_partition,
)
from tests.support import nhs_number, observation, patient, register_publisher

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MAX_ATTEMPTS = 5  # HDX_MAX_DELIVERY_ATTEMPTS' default, which the shared stack keeps


def _same_partition_ids(source: str, like: str, n: int, t: str) -> list[str]:
    """Local patient ids whose validated key lands on the same partition as `like`'s."""
    target = validated_partition(f"{source}|{like}")
    out: list[str] = []
    i = 0
    while len(out) < n:
        pid = f"pf{i}-{t}"
        if validated_partition(f"{source}|{pid}") == target:
            out.append(pid)
        i += 1
    return out


def _wait_event(feed: TopicTail, event: str) -> None:
    def has(r: Rec) -> bool:
        return r.headers.get("ce_id") == event

    feed.wait_for(has, 60, f"event {event} in the feed")


def _check_dead_letter(record: Rec, stage: str, log: list[str]) -> dict[str, Any]:
    assert record.headers["hdx_reason"] == "processing-failed", record.headers
    outcome = orjson.loads(record.headers["hdx_outcome"])
    assert outcome["resourceType"] == "OperationOutcome"
    issue = outcome["issue"][0]
    assert issue["code"] == "exception" and stage in issue["diagnostics"], outcome
    origin = record.headers["hdx_origin"]
    retries = [e for e in log if e.startswith(f"stage {stage} failed on {origin} (attempt")]
    gave_up = [e for e in log if e.startswith(f"stage {stage} dead-letters {origin} ")]
    assert len(retries) == MAX_ATTEMPTS - 1, retries
    assert len(gave_up) == 1, gave_up
    return {"origin": origin, "attempts": len(retries) + 1, "diagnostics": issue["diagnostics"]}


@pytest.mark.timeout(120)
def test_ingress_poison_is_dead_lettered_after_bounded_attempts_and_the_partition_moves_on(
    shared_stack: tuple[LocalStack, Topics], kafka: Broker
) -> None:
    stack, topics = shared_stack
    t = tag()
    source = f"urn:hdx:org:poison-in-{t}"
    register_publisher(stack.url("exchange"), source)
    sub = subscribe(stack, topics, f"poison-in-{t}", "Observation")
    before = pids(stack)
    publisher = BulkPublisher(
        kafka.bootstrap_servers, idempotence=kafka.idempotence, topic=topics.inbound
    )
    # All on inbound partition 0: the poison first, then valid traffic behind it.
    poison_id = f"poison-{t}"
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": 5}
    publisher.send(
        orjson.dumps(bundle),
        key=f"{source}|x",
        headers=ce_headers(source, poison_id),
        partition=0,
    )
    events = []
    for p in range(3):
        pid = f"pp{p}-{t}"
        publisher.resource(source, patient(pid, nhs_number()), f"pp{p}-{t}", partition=0)
        for k in range(2):
            obs = observation(f"po{p}-{k}-{t}", pid)
            events.append(publisher.resource(source, obs, f"po{p}-{k}-{t}", partition=0))
    publisher.flush()
    published = time.monotonic()
    dlq = TopicTail(kafka.bootstrap_servers, [topics.deadletter])
    feed = TopicTail(kafka.bootstrap_servers, [sub.feed])
    try:
        dead = dlq.wait_for(
            lambda r: r.headers.get("ce_id") == poison_id, 60, "the poison Bundle dead-lettered"
        )
        dead_after = time.monotonic() - published
        for ev in events:
            _wait_event(feed, ev)
        delivered_after = time.monotonic() - published
        facts = _check_dead_letter(dead, "ingress", log_events(stack.services["exchange"].log_path))
        assert dead.value == orjson.dumps(bundle), "the original bytes are kept"
        assert_alive(stack, before)
        record_figures(
            "poison_ingress",
            {
                **facts,
                "seconds_to_dead_letter": round(dead_after, 1),
                "seconds_to_deliver_what_followed": round(delivered_after, 1),
                "followers_delivered": len(events),
            },
        )
    finally:
        dlq.close()
        feed.close()


@pytest.mark.timeout(120)
def test_patient_index_poison_is_dead_lettered_after_bounded_attempts_and_the_partition_moves_on(
    shared_stack: tuple[LocalStack, Topics], kafka: Broker
) -> None:
    stack, topics = shared_stack
    t = tag()
    source = f"urn:hdx:org:poison-pix-{t}"
    register_publisher(stack.url("exchange"), source)
    sub = subscribe(stack, topics, f"poison-pix-{t}", "Observation")
    before = pids(stack)
    publisher = BulkPublisher(
        kafka.bootstrap_servers, idempotence=kafka.idempotence, topic=topics.inbound
    )
    poison_pid = f"poison-{t}"
    # Valid FHIR; the NHS number's first digit is a superscript two.
    poison = patient(poison_pid, "²434765919")
    poison_event = publisher.resource(source, poison, f"poison-{t}", partition=0)
    events = []
    for p, pid in enumerate(_same_partition_ids(source, poison_pid, 3, t)):
        publisher.resource(source, patient(pid, nhs_number()), f"pp{p}-{t}", partition=0)
        for k in range(2):
            obs = observation(f"po{p}-{k}-{t}", pid)
            events.append(publisher.resource(source, obs, f"po{p}-{k}-{t}", partition=0))
    publisher.flush()
    published = time.monotonic()
    dlq = TopicTail(kafka.bootstrap_servers, [topics.deadletter])
    feed = TopicTail(kafka.bootstrap_servers, [sub.feed])
    try:
        dead = dlq.wait_for(
            lambda r: r.headers.get("ce_id") == poison_event, 60, "the poison Patient dead-lettered"
        )
        dead_after = time.monotonic() - published
        for ev in events:
            _wait_event(feed, ev)
        delivered_after = time.monotonic() - published
        log = log_events(stack.services["patient-index"].log_path)
        facts = _check_dead_letter(dead, "patient-index", log)
        assert "ValueError" in facts["diagnostics"], facts
        assert orjson.loads(dead.value)["id"] == poison_pid
        assert derive_event_id(source, f"poison-{t}", "0") == poison_event
        assert_alive(stack, before)
        record_figures(
            "poison_patient_index",
            {
                **facts,
                "seconds_to_dead_letter": round(dead_after, 1),
                "seconds_to_deliver_what_followed": round(delivered_after, 1),
                "followers_delivered": len(events),
            },
        )
    finally:
        dlq.close()
        feed.close()
