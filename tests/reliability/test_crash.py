"""Nothing lost and nothing delivered without consent while every service is SIGKILLed and
restarted in turn, mid-stream.

Its own stack (topic prefix crash<tag>., consumer groups follow it) on the session's broker:
three publishers, three Kafka-feed subscriptions (two for every Observation, one for
laboratory results only), consents that deny one recipient a fifth of the patients. The
stream (HDX_RELIABILITY_MESSAGES, default below; 100 patients, HDX_RELIABILITY_PATIENTS;
each patient's Patient first, then its Observations) goes out in bursts, and after each
burst one service is SIGKILLed as soon as the hop it runs has work in hand, then started
again (HDX_RELIABILITY_KILLS, default 5: exchange, patient index, consent, exchange,
patient index). Then, once every hop has committed everything it read:
every permitted Observation is in its subscriber's feed, nothing denied is, every duplicate
carries the number its event already had, and each subscription's numbers are 1..max.
"""

from __future__ import annotations

import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint as Broker
from hdx_shared.envelope import derive_event_id
from hdx_shared.topics import Topics
from tests.reliability.harness import (
    BulkPublisher,
    FeedCheck,
    Subscriber,
    TopicTail,
    deny_recipient,
    env_int,
    group_lag,
    pipeline_groups,
    record_figures,
    stack_env,
    subscribe,
    tag,
    wait_drained,
)
from tests.support import nhs_number, observation, patient, register_publisher

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# The target. The five kill-and-restart cycles, not the message count, set the run
# time (about 100 s on a two-core machine with the embedded broker); scale it down with
# HDX_RELIABILITY_MESSAGES if a run must be shorter.
DEFAULT_MESSAGES = 5000
LAB = "laboratory"
VITALS = "vital-signs"
SEED = 20261125


@dataclass(frozen=True)
class SourceRecord:
    """One publisher's record of one patient: (source, local id) → the patient's NHS number."""

    source: str
    local_id: str
    nhs: str
    denied: bool  # consent denies the care home this patient's data


@dataclass
class Plan:
    """What is published, in order, and which event ids each subscription must receive."""

    messages: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    observations: dict[str, tuple[SourceRecord, str]] = field(default_factory=dict)
    patients: int = 0

    def expected(self, sub: Subscriber, care: Subscriber) -> set[str]:
        out = set()
        for event, (rec, category) in self.observations.items():
            if sub.criteria.endswith(f"category={LAB}") and category != LAB:
                continue
            if sub == care and rec.denied:
                continue
            out.add(event)
        return out

    def denied_for(self, sub: Subscriber, care: Subscriber) -> set[str]:
        if sub != care:
            return set()
        return {e for e, (rec, _) in self.observations.items() if rec.denied}


def _lab_or_vitals(local_id: str, patient_id: str, value: float, category: str) -> dict[str, Any]:
    obs = observation(local_id, patient_id, value)
    obs["category"][0]["coding"][0]["code"] = category
    return obs


def make_plan(t: str, sources: list[str], n_messages: int, n_patients: int) -> Plan:
    """Patients first per patient, then their Observations, interleaved across patients."""
    rng = random.Random(SEED)
    records: list[SourceRecord] = []
    for i in range(n_patients):
        nhs = nhs_number(rng)
        denied = i % 5 == 0
        records.append(SourceRecord(sources[i % 3], f"p{i}-{t}", nhs, denied))
        if i % 10 == 3:  # also known at a second hospital, under its own local id
            records.append(SourceRecord(sources[(i + 1) % 3], f"q{i}-{t}", nhs, denied))
    plan = Plan(patients=len(records))
    queues: list[list[tuple[str, dict[str, Any], str]]] = []
    n_obs = max(n_messages - len(records), 0)
    for r, rec in enumerate(records):
        given = f"Rel{r}"
        q = [(rec.source, patient(rec.local_id, rec.nhs, family="Crashtest", given=given), "")]
        queues.append(q)
    for k in range(n_obs):
        rec = records[k % len(records)]
        category = LAB if k % 2 == 0 else VITALS
        oid = f"o{k}-{t}"
        q = queues[k % len(records)]
        q.append((rec.source, _lab_or_vitals(oid, rec.local_id, 1.0 + k % 50, category), ""))
    # Merge the per-record queues at random, keeping each queue's order.
    heads = [0] * len(queues)
    live = [i for i, q in enumerate(queues) if q]
    n = 0
    while live:
        i = rng.choice(live)
        source, resource, _ = queues[i][heads[i]]
        heads[i] += 1
        if heads[i] == len(queues[i]):
            live.remove(i)
        ce_id = f"crash-{t}-{n}"
        n += 1
        plan.messages.append((source, resource, ce_id))
        if resource["resourceType"] == "Observation":
            category = resource["category"][0]["coding"][0]["code"]
            plan.observations[derive_event_id(source, ce_id, "0")] = (records[i], category)
    return plan


# (service to kill, the consumer group that should be busy when it dies)
KILLS = (
    ("exchange", "exchange-delivery"),
    ("patient-index", "patient-index"),
    ("consent", "consent"),
    ("exchange", "exchange-ingress"),
    ("patient-index", "patient-index"),
)


def wait_busy(bootstrap: str, group: str, topic: str, timeout: float) -> int:
    """Poll until the group has records it has not committed (it is working); its lag."""
    deadline = time.monotonic() + timeout
    while True:
        lag = group_lag(bootstrap, group, topic)
        if lag or time.monotonic() > deadline:
            return lag
        time.sleep(0.05)  # a polling interval


def explain_lost(
    bootstrap: str, stack: LocalStack, topics: Topics, sub: Subscriber, lost: set[str]
) -> list[dict[str, Any]]:
    """Where each lost event got to: its number in the exchange's database, whether it is
    on the decided topic with this subscription permitted, and whether a second, fresh
    read of the feed finds it after all (then the first read, not HDX, was wrong)."""
    db = stack.data_dir / "exchange.db"
    again = TopicTail(bootstrap, [sub.feed])
    decided = TopicTail(bootstrap, [topics.decided])
    try:
        on_feed = {r.headers.get("ce_id") for r in again.to_end()}
        permitted = {
            r.headers.get("ce_id")
            for r in decided.to_end()
            if sub.subscription in r.headers.get("hdx_permitted", "")
        }
    finally:
        again.close()
        decided.close()
    out: list[dict[str, Any]] = []
    with sqlite3.connect(db) as conn:
        for event in sorted(lost)[:5]:
            row = conn.execute(
                "SELECT event_number, created_at, state FROM delivery "
                "WHERE subscription_id = ? AND event_id = ?",
                (sub.subscription, event),
            ).fetchone()
            out.append(
                {
                    "event": event,
                    "numbered": list(row) if row else None,
                    "permitted_on_decided": event in permitted,
                    "found_on_second_read": event in on_feed,
                }
            )
    return out


@pytest.mark.timeout(600)
def test_kills_of_every_service_lose_nothing_and_deliver_nothing_denied(
    kafka: Broker, tmp_path: Path
) -> None:
    n_messages = env_int("HDX_RELIABILITY_MESSAGES", DEFAULT_MESSAGES)
    n_patients = env_int("HDX_RELIABILITY_PATIENTS", 100)
    n_kills = env_int("HDX_RELIABILITY_KILLS", 5)
    started = time.monotonic()
    t = tag()
    prefix = f"crash{t}."
    topics = Topics(prefix)
    stack = LocalStack(
        data_dir=tmp_path / "hdx",
        bootstrap_servers=kafka.bootstrap_servers,
        extra_env=stack_env(prefix, idempotence=kafka.idempotence),
    )
    stack.start(ready_timeout=90)
    readers: list[TopicTail] = []
    try:
        sources = [f"urn:hdx:org:crash-{t}-{i}" for i in range(3)]
        for source in sources:
            register_publisher(stack.url("exchange"), source)
        care = subscribe(stack, topics, f"crash-care-{t}", "Observation")
        gp = subscribe(stack, topics, f"crash-gp-{t}", "Observation")
        lab = subscribe(stack, topics, f"crash-lab-{t}", f"Observation?category={LAB}")
        subs = [care, gp, lab]
        plan = make_plan(t, sources, n_messages, n_patients)
        denied_nhs = sorted({rec.nhs for rec, _ in plan.observations.values() if rec.denied})
        for nhs in denied_nhs:
            deny_recipient(stack, nhs, care.recipient)

        publisher = BulkPublisher(
            kafka.bootstrap_servers, idempotence=kafka.idempotence, topic=topics.inbound
        )
        # The stream goes out in bursts, one before each kill, and each kill waits until
        # the hop it aims at has work in hand, so the services die mid-batch.
        bursts = n_kills + 1
        step = -(-len(plan.messages) // bursts)
        chunks = [plan.messages[i : i + step] for i in range(0, len(plan.messages), step)]
        groups = dict(pipeline_groups(topics))
        kills: list[dict[str, Any]] = []
        for k in range(max(n_kills, len(chunks))):
            for source, resource, ce_id in chunks[k] if k < len(chunks) else ():
                publisher.resource(source, resource, ce_id)
            publisher.flush(60)
            if k >= n_kills:
                continue
            name, busy = KILLS[k % len(KILLS)]
            group = topics.group(busy)
            lag = wait_busy(kafka.bootstrap_servers, group, groups[group], timeout=30)
            t0 = time.monotonic()
            stack.restart(name, kill=True, ready_timeout=120)
            kills.append(
                {
                    "at": time.strftime("%H:%M:%S", time.gmtime()),
                    "service": name,
                    "published_at_kill": publisher.sent,
                    "busy_group": busy,
                    "its_lag_at_kill": lag,
                    "restart_seconds": round(time.monotonic() - t0, 1),
                }
            )
            print(f"[reliability] kill {k + 1}: {kills[-1]}")
        published_at = time.monotonic()

        wait_drained(kafka.bootstrap_servers, topics, timeout=300)
        drained_at = time.monotonic()

        feeds = {s.subscription: TopicTail(kafka.bootstrap_servers, [s.feed]) for s in subs}
        dlq = TopicTail(kafka.bootstrap_servers, [topics.deadletter])
        readers += [*feeds.values(), dlq]
        checks = {s.subscription: FeedCheck(s) for s in subs}
        for s in subs:
            for r in feeds[s.subscription].to_end():
                checks[s.subscription].add(r)
        our_ids = {ce for _, _, ce in plan.messages}
        dead = [r for r in dlq.to_end() if r.headers.get("ce_id") in our_ids]

        figures: dict[str, Any] = {
            "broker": kafka.kind,
            "messages_sent": len(plan.messages),
            "patients_records": plan.patients,
            "observations_sent": len(plan.observations),
            "kills": len(kills),
            "kill_log": kills,
            "dead_lettered": len(dead),
            "seconds_publishing": round(published_at - started, 1),
            "seconds_to_drain_after_publishing": round(drained_at - published_at, 1),
        }
        problems: list[str] = []
        per_sub: dict[str, Any] = {}
        for s in subs:
            c = checks[s.subscription]
            expected = plan.expected(s, care)
            denied = plan.denied_for(s, care)
            got = set(c.numbers)
            lost = expected - got
            unauthorised = got & denied
            unexpected = got - expected - denied
            per_sub[s.feed] = {
                "expected": len(expected),
                "delivered_events": len(got),
                "records": len(c.records),
                "duplicates": c.duplicates,
                "denied_by_consent": len(denied),
                "lost": len(lost),
                "unauthorised": len(unauthorised),
                "unexpected": len(unexpected),
                "renumbered_duplicates": len(c.renumbered),
                "number_gaps": len(c.gaps()),
                "numbers_shared": len(c.shared_numbers()),
                "max_number": max(c.numbers.values(), default=0),
            }
            if lost:
                problems.append(
                    f"{s.feed}: {len(lost)} permitted events lost: "
                    f"{explain_lost(kafka.bootstrap_servers, stack, topics, s, lost)}"
                )
            if unauthorised:
                problems.append(f"{s.feed}: {len(unauthorised)} denied events delivered")
            if unexpected:
                problems.append(f"{s.feed}: {len(unexpected)} events it never asked for")
            if c.renumbered:
                problems.append(f"{s.feed}: duplicates renumbered {c.renumbered[:3]}")
            if c.gaps() or c.shared_numbers():
                problems.append(
                    f"{s.feed}: numbers missing {c.gaps()[:10]}, shared {c.shared_numbers()[:10]}"
                )
            if c.status_mismatch:
                problems.append(f"{s.feed}: Bundle event-number ≠ header {c.status_mismatch[:3]}")
        figures["feeds"] = per_sub
        figures["delivered"] = sum(v["delivered_events"] for v in per_sub.values())
        figures["denied"] = sum(v["denied_by_consent"] for v in per_sub.values())
        figures["duplicates_seen"] = sum(v["duplicates"] for v in per_sub.values())
        figures["lost"] = sum(v["lost"] for v in per_sub.values())
        figures["unauthorised"] = sum(v["unauthorised"] for v in per_sub.values())
        figures["seconds_total"] = round(time.monotonic() - started, 1)
        record_figures("crash", figures)
        if dead:
            problems.append(
                f"{len(dead)} valid messages dead-lettered: "
                f"{sorted({r.headers.get('hdx_reason', '?') for r in dead})}"
            )
        assert len(kills) == n_kills
        assert not problems, "\n".join(problems)
    finally:
        for reader in readers:
            reader.close()
        stack.stop()
