"""The broker restarts and forgets everything (the embedded Tansu keeps topics, records and
committed offsets in memory only); the publisher re-sends what it had sent.

Its own embedded broker on a fixed port and its own stack on it. After the restart the
publisher reconnects and re-sends every record of the first batch with the same ce_id, at
once, then a second batch. The services are first left running, for a bounded time: they
reconnect, but HDX's ensure_topics runs at service start only, so the topics come back only
as the broker creates them on first use (4 partitions, no HDX configuration), and records
produced with metadata from before the restart go where no consumer reads. What they
deliver is recorded. If not everything arrives, the services are restarted too (and the
figures say so), and the publisher sends everything once more.

Either way no subscriber may get an event under two numbers (the exchange's database
remembers the number of each event), nothing may be lost, and the numbers stay 1..max.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    ResourceType,
)

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import EmbeddedBroker, free_port
from hdx_shared.topics import Topics
from tests.reliability.harness import (
    BulkPublisher,
    FeedCheck,
    Subscriber,
    TopicTail,
    env_int,
    readyz,
    record_figures,
    restart_services,
    stack_env,
    subscribe,
    tag,
)
from tests.support import nhs_number, observation, patient, register_publisher

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.soak]

SEED = 77
# How long the services get to recover on their own after the broker restarted.
BROKER_ONLY_WAIT = 15.0


def _batch(
    t: str, source: str, first: int, count: int, patients: int
) -> list[tuple[dict[str, Any], str]]:
    """Patients (once, in the first batch) then Observations, with their ce_ids."""
    rng = random.Random(SEED)
    out: list[tuple[dict[str, Any], str]] = []
    if first == 0:
        out += [
            (patient(f"p{i}-{t}", nhs_number(rng), family="Brokerrestart"), f"brk-{t}-p{i}")
            for i in range(patients)
        ]
    out += [
        (observation(f"o{k}-{t}", f"p{k % patients}-{t}", 1.0 + k), f"brk-{t}-o{k}")
        for k in range(first, first + count)
    ]
    return out


def _publish(
    publisher: BulkPublisher, source: str, batch: list[tuple[dict[str, Any], str]]
) -> set[str]:
    events = set()
    for resource, ce_id in batch:
        event = publisher.resource(source, resource, ce_id)
        if resource["resourceType"] == "Observation":
            events.add(event)
    publisher.flush(120)
    return events


def _collect(
    bootstrap: str, subs: list[Subscriber], want: set[str], timeout: float
) -> dict[str, FeedCheck]:
    """Read each feed until it holds every wanted event (or the deadline passes)."""
    checks: dict[str, FeedCheck] = {}
    deadline = time.monotonic() + timeout
    for s in subs:
        tail = TopicTail(bootstrap, [s.feed])
        try:
            seen: set[str] = set()
            while True:
                tail.poll(0.5)
                seen = {r.headers.get("ce_id", "") for r in tail.records}
                if want <= seen or time.monotonic() > deadline:
                    break
            check = FeedCheck(s)
            for r in tail.to_end(30):
                check.add(r)
            checks[s.subscription] = check
        finally:
            tail.close()
    return checks


def _topic_shapes(bootstrap: str, topics: list[str]) -> dict[str, Any]:
    """Partitions and cleanup policy of each topic as the broker has it now."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(timeout=10).topics
    out: dict[str, Any] = {}
    present = [t for t in topics if t in md]
    configs: dict[str, Any] = {}
    if present:
        futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in present])
        for res, fut in futures.items():
            try:
                entries = fut.result(timeout=10)
                policy = entries.get("cleanup.policy")
                configs[res.name] = policy.value if policy is not None else None
            except Exception as exc:  # a broker that cannot describe configs
                configs[res.name] = f"unknown ({type(exc).__name__})"
    for t in topics:
        out[t] = (
            {"partitions": len(md[t].partitions), "cleanup.policy": configs.get(t)}
            if t in md
            else None
        )
    return out


@pytest.mark.timeout(300)
def test_broker_restart_and_resend_never_renumbers_or_loses_an_event(tmp_path: Path) -> None:
    n_first = env_int("HDX_RELIABILITY_RESTART_MESSAGES", 100)
    n_patients = 20
    started = time.monotonic()
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "broker.log").start()
    t = tag()
    prefix = f"brk{t}."
    topics = Topics(prefix)
    stack = LocalStack(
        data_dir=tmp_path / "hdx",
        bootstrap_servers=broker.bootstrap_servers,
        extra_env=stack_env(prefix, idempotence=False),
    )
    stack.start(ready_timeout=90)
    try:
        source = f"urn:hdx:org:broker-restart-{t}"
        register_publisher(stack.url("exchange"), source)
        subs = [
            subscribe(stack, topics, f"brk-care-{t}", "Observation"),
            subscribe(stack, topics, f"brk-gp-{t}", "Observation"),
        ]
        shapes_before = _topic_shapes(broker.bootstrap_servers, _hdx_topics(topics, subs))
        first = _batch(t, source, 0, n_first, n_patients)
        publisher = BulkPublisher(broker.bootstrap_servers, idempotence=False, topic=topics.inbound)
        first_events = _publish(publisher, source, first)
        before = _collect(broker.bootstrap_servers, subs, first_events, timeout=120)
        for s in subs:
            assert set(before[s.subscription].numbers) == first_events, (
                f"{s.feed}: the first batch was not delivered before the restart"
            )

        broker.stop()
        broker.start()
        restarted_at = time.monotonic()
        # The publisher reconnects and retries: everything again, same ce_ids, at once;
        # then new records. (A producer kept across the restart fails: its metadata names
        # partitions the recreated topic does not have.)
        publisher = BulkPublisher(broker.bootstrap_servers, idempotence=False, topic=topics.inbound)
        second = _batch(t, source, n_first, n_first // 2, n_patients)
        assert _publish(publisher, source, first) == first_events
        new_events = _publish(publisher, source, second)
        want = first_events | new_events
        # First with the services left running, for a bounded time.
        survived = _collect(broker.bootstrap_servers, subs, want, timeout=BROKER_ONLY_WAIT)
        without_restart = {s.feed: len(want & set(survived[s.subscription].numbers)) for s in subs}
        services_restarted = any(not want <= set(survived[s.subscription].numbers) for s in subs)
        ready_before_service_restart = {name: readyz(stack, name)[0] for name in stack.services}
        if services_restarted:
            # HDX did not recover with its services running: restart them (ensure_topics
            # runs at start) and have the publisher send everything once more.
            restart_services(stack)
            publisher = BulkPublisher(
                broker.bootstrap_servers, idempotence=False, topic=topics.inbound
            )
            _publish(publisher, source, first + second)
        after = _collect(broker.bootstrap_servers, subs, want, timeout=150)
        recovered_at = time.monotonic()
        shapes_after = _topic_shapes(broker.bootstrap_servers, _hdx_topics(topics, subs))
        ready = {name: readyz(stack, name)[0] for name in stack.services}

        problems: list[str] = []
        per_sub: dict[str, Any] = {}
        for s in subs:
            b, a = before[s.subscription], after[s.subscription]
            renumbered = {
                e: (n, a.numbers[e])
                for e, n in b.numbers.items()
                if e in a.numbers and a.numbers[e] != n
            }
            lost_first = first_events - set(a.numbers)
            lost_new = new_events - set(a.numbers)
            union = dict(b.numbers) | dict(a.numbers)
            numbers = sorted(union.values())
            gaps = sorted(set(range(1, (numbers[-1] if numbers else 0) + 1)) - set(numbers))
            per_sub[s.feed] = {
                "numbered_before": len(b.numbers),
                "redelivered_after_restart": len(first_events & set(a.numbers)),
                "new_delivered": len(new_events & set(a.numbers)),
                "renumbered": len(renumbered),
                "lost_resent": len(lost_first),
                "lost_new": len(lost_new),
                "number_gaps": len(gaps),
                "duplicates_after": a.duplicates + len(a.renumbered),
            }
            if renumbered:
                problems.append(f"{s.feed}: events renumbered {list(renumbered.items())[:3]}")
            if a.renumbered:
                problems.append(f"{s.feed}: duplicates renumbered {a.renumbered[:3]}")
            if lost_new:
                problems.append(f"{s.feed}: {len(lost_new)} new events never delivered")
            if gaps or a.shared_numbers():
                problems.append(f"{s.feed}: numbers missing {gaps[:10]}")
            if a.status_mismatch:
                problems.append(f"{s.feed}: Bundle event-number ≠ header")
        record_figures(
            "broker_restart",
            {
                "messages_first": len(first),
                "messages_resent": len(first),
                "messages_new": len(second),
                "services_restarted": services_restarted,
                "delivered_with_services_left_running": without_restart,
                "readyz_while_not_delivering": ready_before_service_restart,
                "seconds_to_recover": round(recovered_at - restarted_at, 1),
                "seconds_total": round(time.monotonic() - started, 1),
                "feeds": per_sub,
                "readyz_after": ready,
                "topics_before": shapes_before,
                "topics_after": shapes_after,
            },
        )
        assert not problems, "\n".join(problems)
    finally:
        stack.stop()
        broker.stop()


def _hdx_topics(topics: Topics, subs: list[Subscriber]) -> list[str]:
    return [s.name for s in topics.core()] + [s.feed for s in subs]
