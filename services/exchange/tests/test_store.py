from __future__ import annotations

from collections.abc import Callable

import pytest

from hdx_exchange.domain.ingress import Publisher
from hdx_exchange.store import ExchangeStore, Numbering, TopicTaken


@pytest.fixture
def st(store: ExchangeStore, subscribe: Callable[[ExchangeStore, str], None]) -> ExchangeStore:
    for sid in ("s1", "s2"):
        subscribe(store, sid)
    return store


def test_event_numbers_are_gapless_per_subscription_and_stable_on_redelivery(
    st: ExchangeStore,
) -> None:
    first = st.number_events(
        [
            Numbering("s1", "e1", "Observation"),
            Numbering("s1", "e2", "Observation"),
            Numbering("s2", "e1", "Observation"),
        ]
    )
    assert first == {("s1", "e1"): 1, ("s1", "e2"): 2, ("s2", "e1"): 1}
    # A redelivered batch, with one new event: old numbers kept, the new one is next.
    again = st.number_events(
        [Numbering("s1", "e2", "Observation"), Numbering("s1", "e3", "Observation")]
    )
    assert again == {("s1", "e2"): 2, ("s1", "e3"): 3}
    assert [d.event_number for d in st.deliveries("s1")] == [1, 2, 3]
    row = st.subscription_row("s1")
    assert row is not None and row.event_count == 3


def test_the_same_event_twice_in_one_batch_gets_one_number(st: ExchangeStore) -> None:
    assert st.number_events(
        [Numbering("s1", "e1", "Observation"), Numbering("s1", "e1", "Observation")]
    ) == {("s1", "e1"): 1}


def test_rest_hook_notifications_queue_once_and_leave_in_order(st: ExchangeStore) -> None:
    st.number_events([Numbering("s1", f"e{i}", "Observation") for i in range(3)])
    st.queue_notifications([("s1", f"e{i}", f"bundle{i}".encode()) for i in range(3)])
    first = st.next_pending("s1")
    assert first is not None and first.event_number == 1 and first.payload == b"bundle0"
    assert first.id is not None
    st.record_attempt(first.id, state="delivered", error=None, next_at=None)
    # A redelivered event does not queue a notification that was already sent.
    st.queue_notifications([("s1", "e0", b"bundle0")])
    nxt = st.next_pending("s1")
    assert nxt is not None and nxt.event_number == 2
    assert st.subscriptions_with_pending() == ["s1"]


def test_only_one_replica_dispatches_a_subscription(st: ExchangeStore) -> None:
    assert st.claim_dispatch("s1", "replica-a", 30)
    assert not st.claim_dispatch("s1", "replica-b", 30)
    assert st.claim_dispatch("s1", "replica-a", 30)  # renewal
    st.release_dispatch("s1", "replica-a")
    assert st.claim_dispatch("s1", "replica-b", 30)


def test_resource_owners_are_remembered_and_updated(st: ExchangeStore) -> None:
    st.remember_owners([("s", "Observation", "o1", "p1"), ("s", "Observation", "o2", "p1")])
    st.remember_owners([("s", "Observation", "o1", "p2")])
    assert st.owner_of("s", "Observation", "o1") == "p2"
    assert st.owner_of("s", "Observation", "o2") == "p1"
    assert st.owner_of("t", "Observation", "o1") is None


def test_the_audit_log_appends_once_per_audit_event_and_chains(st: ExchangeStore) -> None:
    from hdx_exchange.domain.audit_chain import verify_chain

    head = st.append_audit([("a1", "P1", b"{1}"), ("a2", None, b"{2}")])
    again = st.append_audit([("a2", None, b"{2}"), ("a3", "P1", b"{3}")])
    assert (head.seq, again.seq) == (2, 3)
    records = list(st.audit_chain())
    assert [r.audit_id for r in records] == ["a1", "a2", "a3"]
    assert verify_chain(records, again) == []
    assert st.audit_for_patient("P1") == [b"{3}", b"{1}"]


def test_two_publishers_cannot_share_an_inbound_topic(st: ExchangeStore) -> None:
    st.put_publisher(Publisher("urn:a", "A", "urn:a/id", topic_name="shared"))
    st.put_publisher(Publisher("urn:a", "A again", "urn:a/id", topic_name="shared"))  # update
    with pytest.raises(TopicTaken):
        st.put_publisher(Publisher("urn:b", "B", "urn:b/id", topic_name="shared"))
    # A derived name counts too: urn:c's default is "urn-c".
    st.put_publisher(Publisher("urn:c", "C", "urn:c/id"))
    with pytest.raises(TopicTaken):
        st.put_publisher(Publisher("urn:d", "D", "urn:d/id", topic_name="urn-c"))
    assert st.publishers()["urn:a"].topic_name == "shared"
