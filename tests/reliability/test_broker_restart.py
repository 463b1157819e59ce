"""The broker restarts and forgets everything (the embedded Tansu keeps topics, records and
committed offsets in memory only); the publisher re-sends what it had sent. HDX's services
are left running throughout: they must come through it on their own.

Its own embedded broker on a fixed port and its own stack on it. While the broker is down
every service's /readyz turns not-ready (HDX_STAGE_FAILURE_SECONDS is short here). After the
restart the publisher reconnects and re-sends every record of the first batch with the same
ce_id, at once, then a second batch. The services reconnect: their consumers rejoin their
groups and read the re-created topics from the start (a batch fetched before the rejoin is
not committed), their producers refresh their metadata (a record acknowledged on a partition
the re-created topic lacks is published again), and the topics nobody asked for yet are
re-created (`keep_topics`). Topics that clients asked for first come back as the broker
makes them (Tansu: 4 partitions, no configuration).

A small run is in the normal suite; the full one (HDX_RELIABILITY_RESTART_MESSAGES) is
`soak`, run by `make test-reliability`.

No subscriber may get an event under two numbers (the exchange's database remembers the
number of each event), nothing may be lost, the numbers stay 1..max, and no service may
have been restarted.
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
    assert_alive,
    env_int,
    pids,
    readyz,
    record_figures,
    stack_env,
    subscribe,
    tag,
)
from tests.support import nhs_number, observation, patient, register_publisher

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SEED = 77
# How long /readyz may take to say what it sees (HDX_STAGE_FAILURE_SECONDS is 2 s here).
READINESS_WAIT = 60.0
RECOVERY_WAIT = 150.0


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


def _wait_readiness(stack: LocalStack, status: int, timeout: float) -> dict[str, Any]:
    """Poll every service's /readyz until each answers `status`; what they answered."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {name: readyz(stack, name) for name in stack.services}
        if all(code == status for code, _ in seen.values()):
            return {name: body.get("reasons") for name, (_, body) in seen.items()}
        assert time.monotonic() < deadline, f"/readyz did not turn {status}: {seen}"
        time.sleep(0.25)  # a polling interval


@pytest.mark.timeout(300)
def test_services_ride_out_a_broker_restart(tmp_path: Path) -> None:
    """The normal suite's version: a few messages (about 40 s, most of it the restart)."""
    _restart_and_resend(tmp_path, n_first=20, n_patients=5, figures="broker_restart_small")


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_broker_restart_and_resend_never_renumbers_or_loses_an_event(tmp_path: Path) -> None:
    n_first = env_int("HDX_RELIABILITY_RESTART_MESSAGES", 100)
    _restart_and_resend(tmp_path, n_first=n_first, n_patients=20, figures="broker_restart")


def _restart_and_resend(tmp_path: Path, *, n_first: int, n_patients: int, figures: str) -> None:
    started = time.monotonic()
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "broker.log").start()
    t = tag()
    prefix = f"brk{t}."
    topics = Topics(prefix)
    stack = LocalStack(
        data_dir=tmp_path / "hdx",
        bootstrap_servers=broker.bootstrap_servers,
        extra_env=stack_env(prefix, idempotence=False, HDX_STAGE_FAILURE_SECONDS="2"),
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
        running = pids(stack)

        broker.stop()
        stopped_at = time.monotonic()
        not_ready = _wait_readiness(stack, 503, READINESS_WAIT)
        seconds_to_not_ready = time.monotonic() - stopped_at
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
        after = _collect(broker.bootstrap_servers, subs, want, timeout=RECOVERY_WAIT)
        recovered_at = time.monotonic()
        assert_alive(stack, running)  # the same processes: none was restarted
        ready = _wait_readiness(stack, 200, READINESS_WAIT)
        shapes_after = _topic_shapes(broker.bootstrap_servers, _hdx_topics(topics, subs))

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
            if lost_first:
                problems.append(f"{s.feed}: {len(lost_first)} re-sent events never delivered")
            if lost_new:
                problems.append(f"{s.feed}: {len(lost_new)} new events never delivered")
            if gaps or a.shared_numbers():
                problems.append(f"{s.feed}: numbers missing {gaps[:10]}")
            if a.status_mismatch:
                problems.append(f"{s.feed}: Bundle event-number ≠ header")
        record_figures(
            figures,
            {
                "messages_first": len(first),
                "messages_resent": len(first),
                "messages_new": len(second),
                "services_restarted": False,
                "seconds_to_not_ready": round(seconds_to_not_ready, 1),
                "readyz_while_broker_down": not_ready,
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
