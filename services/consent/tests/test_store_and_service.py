"""The store on SQLite (a temporary file) and the service around it: versions, history,
index in step with writes, the outbox and changes from other replicas."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from hdx_consent.domain import ConsentInvalid, DecisionRequest, Policy
from hdx_consent.examples import consent, provision
from hdx_consent.models import ConsentVersion
from hdx_consent.service import ConsentService, change_record
from hdx_consent.settings import ConsentSettings
from hdx_consent.store import ConsentStore, VersionConflict
from hdx_shared.db import make_engine
from hdx_shared.envelope import Header
from hdx_shared.messaging import Outgoing, Unavailable
from hdx_shared.topics import Topics

TOPICS = Topics("hdx.")
NHS = "https://fhir.nhs.uk/Id/nhs-number"


@pytest.fixture
def store(database_url: str) -> Iterator[ConsentStore]:
    """SQLite, and PostgreSQL too where one is reachable (the root conftest decides)."""
    s = ConsentStore(make_engine(ConsentSettings(database_url=database_url)))
    s.create_schema()
    yield s
    s.engine.dispose()


class FakeBus:
    def __init__(self) -> None:
        self.sent: list[Outgoing] = []
        self.down = False

    async def __call__(self, out: Sequence[Outgoing]) -> None:
        if self.down:
            raise ConnectionError("broker down")
        self.sent.extend(out)


def treat(person: str = "p1") -> DecisionRequest:
    return DecisionRequest(
        person=person,
        recipient="Organization/gp",
        purpose="TREAT",
        resource_type="Observation",
        at=datetime.now(UTC),
    )


def test_every_write_is_a_new_version(store: ConsentStore) -> None:
    v1 = store.append("c1", consent(), patient_key="Patient/p1", status="active")
    v2 = store.append(
        "c1", consent(status="inactive"), patient_key="Patient/p1", status="inactive", if_match=1
    )
    assert (v1.version, v2.version) == (1, 2)
    stored = orjson.loads(v2.resource)
    assert stored["id"] == "c1" and stored["meta"]["versionId"] == "2"
    assert stored["meta"]["lastUpdated"].endswith("Z")
    assert [r.version for r in store.history("c1")] == [2, 1]
    latest = store.latest("c1")
    assert latest is not None and latest.status == "inactive"
    one = store.version("c1", 1)
    assert one is not None and one.status == "active"
    assert [(r.consent_id, r.version) for r in store.latest_all()] == [("c1", 2)]


def test_conflicts(store: ConsentStore) -> None:
    store.append("c1", consent(), patient_key="Patient/p1", status="active")
    with pytest.raises(VersionConflict):
        store.append("c1", consent(), patient_key="Patient/p1", status="active", if_match=5)
    with pytest.raises(VersionConflict):
        store.append("c1", consent(), patient_key="Patient/p1", status="active", create_only=True)


def test_search_by_patient_and_identifier(store: ConsentStore) -> None:
    store.append("a", consent(), patient_key="Patient/p1", status="active")
    store.append(
        "b", consent(), patient_key="Patient/p1", status="active", patient_identifier=f"{NHS}|9"
    )
    store.append(
        "c", consent(), patient_key=f"{NHS}|9", status="active", patient_identifier=f"{NHS}|9"
    )
    store.append("a", consent(), patient_key="Patient/p2", status="active")  # moved
    assert [r.consent_id for r in store.search(["Patient/p1"])] == ["b"]
    assert [r.consent_id for r in store.search([f"{NHS}|9"])] == ["b", "c"]
    assert [r.consent_id for r in store.search(["Patient/p2"])] == ["a"]


def test_outbox(store: ConsentStore) -> None:
    store.append("a", consent(), patient_key="Patient/p1", status="active")
    store.append("a", consent(), patient_key="Patient/p1", status="active")
    assert [r.version for r in store.unpublished()] == [1, 2]
    store.mark_published([("a", 1)])
    assert [r.version for r in store.unpublished()] == [2]


def test_database_down_is_unavailable(tmp_path: Path) -> None:
    broken = ConsentStore(
        make_engine(ConsentSettings(database_url=f"sqlite:///{tmp_path}/missing/dir/x.db"))
    )
    with pytest.raises(Unavailable, match="consent database"):
        broken.ping()


async def test_write_updates_the_index_before_it_returns(store: ConsentStore) -> None:
    bus = FakeBus()
    service = ConsentService(store, Policy(), TOPICS, bus)
    await service.load()
    assert service.readiness() is None
    assert service.evaluate(treat()).permit  # no consent: direct care by default

    written = await service.write(consent(provision("deny")))
    assert written.created and written.row.version == 1
    assert not service.evaluate(treat()).permit  # effective for the very next decision

    cid = written.row.consent_id
    revoked = await service.write(
        consent(provision("deny"), status="inactive", id=cid), consent_id=cid, if_match=1
    )
    assert not revoked.created and revoked.row.version == 2
    assert service.evaluate(treat()).permit  # revocation effective at once too

    assert [(o.topic, o.key) for o in bus.sent] == [(TOPICS.consents, cid.encode())] * 2
    assert orjson.loads(bus.sent[1].value)["meta"]["versionId"] == "2"
    assert bus.sent[0].headers[Header.RESOURCE_TYPE] == "Consent"
    assert store.unpublished() == []


async def test_invalid_consents_are_not_stored(store: ConsentStore) -> None:
    service = ConsentService(store, Policy(), TOPICS, FakeBus())
    with pytest.raises(ConsentInvalid):
        await service.write(consent(provision("maybe")))
    assert store.latest_all() == []


async def test_unpublished_changes_are_sent_later(store: ConsentStore) -> None:
    bus = FakeBus()
    bus.down = True
    service = ConsentService(store, Policy(), TOPICS, bus, publish_timeout=1)
    await service.load()
    written = await service.write(consent(provision("deny")))  # accepted all the same
    assert not service.evaluate(treat()).permit
    assert [r.consent_id for r in store.unpublished()] == [written.row.consent_id]
    bus.down = False
    assert await service.publish_pending() == 1
    assert store.unpublished() == [] and len(bus.sent) == 1


async def test_index_is_rebuilt_from_the_database(store: ConsentStore) -> None:
    first = ConsentService(store, Policy(), TOPICS, FakeBus())
    await first.load()
    await first.write(consent(provision("deny"), patient="Patient/p7"))
    second = ConsentService(store, Policy(), TOPICS)
    assert second.readiness() == "consent index not loaded yet"
    with pytest.raises(Unavailable):
        second.evaluate(treat("p7"))
    await second.load()
    assert not second.evaluate(treat("p7")).permit


async def test_changes_from_other_replicas(store: ConsentStore) -> None:
    writer = ConsentService(store, Policy(), TOPICS, FakeBus())
    await writer.load()
    reader = ConsentService(store, Policy(), TOPICS)
    await reader.load()
    v1 = await writer.write(consent(provision("deny")))
    cid = v1.row.consent_id
    v2 = await writer.write(consent(provision("deny"), status="inactive", id=cid), consent_id=cid)
    record_v1 = change_record(TOPICS, v1.row).value
    record_v2 = change_record(TOPICS, v2.row).value
    assert reader.evaluate(treat()).permit  # not seen yet: the documented replica lag
    assert reader.apply_change(record_v1)
    assert not reader.evaluate(treat()).permit
    assert reader.apply_change(record_v2)
    assert not reader.apply_change(record_v1)  # late or replayed: older, ignored
    assert reader.evaluate(treat()).permit
    assert not reader.apply_change(None)
    assert not reader.apply_change(b"{broken")


async def test_a_change_the_topic_lost_reaches_other_replicas_from_the_database(
    store: ConsentStore,
) -> None:
    """A broker that restarts without its data loses consents-topic records: each replica
    re-reads what was recorded lately, so a withdrawal reaches it all the same."""
    writer = ConsentService(store, Policy(), TOPICS, FakeBus())
    await writer.load()
    reader = ConsentService(store, Policy(), TOPICS, reconcile_overlap=0)
    assert await reader.reconcile() == 0  # not loaded yet: nothing to catch up with
    await reader.load()
    assert await reader.reconcile() == 0

    v1 = await writer.write(consent(provision("deny")))  # its record never reaches reader
    cid = v1.row.consent_id
    assert reader.evaluate(treat()).permit
    assert await reader.reconcile() == 1
    assert not reader.evaluate(treat()).permit

    await writer.write(consent(provision("deny"), status="inactive", id=cid), consent_id=cid)
    assert await reader.reconcile() == 1
    assert reader.evaluate(treat()).permit
    assert await reader.reconcile() == 0  # nothing newer since
    assert not reader.apply_change(change_record(TOPICS, v1.row).value)  # the feed, late


async def test_reconcile_reaches_back_by_the_overlap(store: ConsentStore) -> None:
    """A version stamped by a writer whose clock is behind (or whose commit was slow) is
    still found: each re-read starts the overlap before the last one."""
    reader = ConsentService(store, Policy(), TOPICS, reconcile_overlap=300)
    await reader.load()
    await reader.reconcile()
    store.append(
        "late",
        consent(provision("deny"), id="late"),
        patient_key="Patient/p1",
        status="active",
    )
    with store._session() as s:  # as if stamped 2 minutes ago by a slow clock
        row = s.get(ConsentVersion, ("late", 1))
        assert row is not None
        row.recorded = datetime.now(UTC) - timedelta(minutes=2)
        s.add(row)
        s.commit()
    assert await reader.reconcile() == 1
    assert not reader.evaluate(treat()).permit


async def test_reconcile_fails_closed_when_the_database_is_down(tmp_path: Path) -> None:
    store = ConsentStore(make_engine(ConsentSettings(database_url=f"sqlite:///{tmp_path}/c.db")))
    service = ConsentService(store, Policy(), TOPICS)
    await service.load()
    (tmp_path / "c.db").unlink()
    (tmp_path / "c.db").mkdir()  # the file is gone and cannot be created again
    store.engine.dispose()
    with pytest.raises(Unavailable):
        await service.reconcile()
    assert service.readiness() is not None


async def test_database_check_sets_readiness(tmp_path: Path) -> None:
    broken = ConsentStore(
        make_engine(ConsentSettings(database_url=f"sqlite:///{tmp_path}/missing/dir/x.db"))
    )
    service = ConsentService(broken, Policy(), TOPICS)
    await service.check_database()
    reason = service.readiness()
    assert reason is not None and reason.startswith("consent database unavailable")
    with pytest.raises(Unavailable):
        service.require_ready()


class PingSwitch:
    """Stands in for ConsentStore.ping: counts pings, fails or hangs on demand."""

    def __init__(self) -> None:
        self.pings = 0
        self.down = False
        self.hang = 0.0

    def __call__(self) -> None:
        self.pings += 1
        if self.hang:
            time.sleep(self.hang)
        if self.down:
            raise Unavailable("consent database: OperationalError: gone")


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[ConsentStore]:
    s = ConsentStore(make_engine(ConsentSettings(database_url=f"sqlite:///{tmp_path}/c.db")))
    yield s
    s.engine.dispose()


async def test_the_gate_check_pings_the_database_before_every_batch(
    sqlite_store: ConsentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only the periodic check: a database that went away a moment ago stops the very
    next batch, and the first batch after it is back goes through."""
    service = ConsentService(sqlite_store, Policy(), TOPICS)
    await service.load()
    ping = PingSwitch()
    monkeypatch.setattr(sqlite_store, "ping", ping)
    await service.ensure_ready()
    ping.down = True
    with pytest.raises(Unavailable, match="gone"):
        await service.ensure_ready()
    reason = service.readiness()
    assert reason is not None and reason.startswith("consent database unavailable")
    ping.down = False
    await service.ensure_ready()
    assert service.readiness() is None
    assert ping.pings == 3


async def test_a_recent_good_ping_may_be_reused_when_configured(
    sqlite_store: ConsentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = ConsentService(sqlite_store, Policy(), TOPICS, db_probe_seconds=60)
    await service.load()
    ping = PingSwitch()
    monkeypatch.setattr(sqlite_store, "ping", ping)
    await service.ensure_ready()
    await service.ensure_ready()
    assert ping.pings == 1
    await service.check_database()  # the periodic check finds it down: no reuse then
    ping.down = True
    await service.check_database()
    with pytest.raises(Unavailable):
        await service.ensure_ready()


async def test_a_database_that_does_not_answer_counts_as_down(
    sqlite_store: ConsentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = ConsentService(sqlite_store, Policy(), TOPICS, db_ping_timeout=0.05)
    await service.load()
    ping = PingSwitch()
    ping.hang = 0.5
    monkeypatch.setattr(sqlite_store, "ping", ping)
    with pytest.raises(Unavailable, match="no answer within"):
        await service.ensure_ready()


async def test_an_index_not_loaded_at_start_is_loaded_by_the_gate_check(
    sqlite_store: ConsentStore,
) -> None:
    sqlite_store.create_schema()
    sqlite_store.append("c1", consent(provision("deny")), patient_key="Patient/p1", status="active")
    service = ConsentService(sqlite_store, Policy(), TOPICS)
    assert service.readiness() == "consent index not loaded yet"
    await service.ensure_ready()
    assert len(service.index) == 1 and not service.evaluate(treat()).permit
