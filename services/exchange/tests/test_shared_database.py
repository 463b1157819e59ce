"""Two exchange processes on one database (the stages run apart, or replicas): the audit
chain, event numbering and schema migrations stay right when real OS processes write at
the same moment — on SQLite (one file) and on PostgreSQL."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from hdx_exchange.domain.audit_chain import verify_chain
from hdx_exchange.models import TABLES
from hdx_exchange.store import ExchangeStore, Numbering
from hdx_shared.db import make_engine, schema_drift
from hdx_shared.settings import HdxSettings

PROCESSES = 2
# fork: the workers need no pickling of this (importlib-imported) test module; each makes
# its own engine after the fork, so no connection is shared.
CTX = multiprocessing.get_context("fork")


def _store(url: str, tmp: Path) -> ExchangeStore:
    return ExchangeStore(make_engine(HdxSettings(data_dir=tmp, database_url=url)))


def _run(
    work: Callable[[ExchangeStore, int], Any],
    url: str,
    tmp: Path,
    subscribe: Callable[[ExchangeStore, str], None] | None = None,
) -> list[Any]:
    """Run `work(store, worker)` in PROCESSES processes started together; their results.
    With `subscribe`, the schema is migrated and three subscriptions made first."""
    if subscribe is not None:
        store = _store(url, tmp)
        store.create_schema()
        for sid in ("s1", "s2", "s3"):
            subscribe(store, sid)
        store.engine.dispose()
    barrier = CTX.Barrier(PROCESSES)
    results = CTX.Queue()

    def main(worker: int, barrier: Barrier) -> None:
        store = _store(url, tmp)
        try:
            barrier.wait(30)
            results.put((worker, "ok", work(store, worker)))
        except BaseException:
            results.put((worker, "error", traceback.format_exc()))
        finally:
            store.engine.dispose()

    procs = [CTX.Process(target=main, args=(w, barrier)) for w in range(PROCESSES)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [f"process {w}:\n{detail}" for w, status, detail in got if status == "error"]
    assert not errors, "\n".join(errors)
    return [value for _, _, value in sorted(got, key=lambda g: int(g[0]))]


def _append(store: ExchangeStore, worker: int) -> int:
    # Small batches, many transactions: the appends interleave. Each batch also carries an
    # AuditEvent both processes got (a redelivery after a rebalance): appended once.
    for b in range(40):
        events = [
            (f"w{worker}-{b}-{i}", None, f'{{"id":"w{worker}-{b}-{i}"}}'.encode()) for i in range(3)
        ]
        events.append((f"both-{b}", None, f'{{"id":"both-{b}"}}'.encode()))
        store.append_audit(events)
    return 0


@pytest.mark.parametrize("head", ["absent", "present"])
def test_two_processes_extend_one_audit_chain(
    database_url: str, tmp_path: Path, head: str, subscribe: Callable[[ExchangeStore, str], None]
) -> None:
    # Absent: the first appends also race to create the chain's head row.
    seeded = 0
    if head == "present":
        store = _store(database_url, tmp_path)
        store.create_schema()
        store.append_audit([("seed", None, b'{"id":"seed"}')])
        store.engine.dispose()
        seeded = 1
    _run(_append, database_url, tmp_path, subscribe)
    store = _store(database_url, tmp_path)
    try:
        records = list(store.audit_chain())
        assert verify_chain(records, None) == []
        assert len(records) == seeded + PROCESSES * 40 * 3 + 40
        assert len({r.audit_id for r in records}) == len(records)
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
    finally:
        store.engine.dispose()


def _number(store: ExchangeStore, worker: int) -> dict[str, int]:
    # Both processes number the same events (as a batch redelivered to another member is),
    # some of them in the other order, for three subscriptions.
    got: dict[str, int] = {}
    for b in range(40):
        wanted = [
            Numbering(sid, f"e{b}-{i}", "Observation")
            for i in range(3)
            for sid in (("s1", "s2", "s3") if worker == 0 else ("s3", "s2", "s1"))
        ]
        wanted.append(Numbering("s1", f"w{worker}-{b}", "Observation"))
        for (sid, event), n in store.number_events(wanted).items():
            got[f"{sid}|{event}"] = n
    return got


def test_two_processes_never_hand_out_an_event_number_twice(
    database_url: str, tmp_path: Path, subscribe: Callable[[ExchangeStore, str], None]
) -> None:
    first, second = _run(_number, database_url, tmp_path, subscribe)
    # An event numbered by both has one number, whichever process asked.
    for key in first.keys() & second.keys():
        assert first[key] == second[key], key
    store = _store(database_url, tmp_path)
    try:
        for sid, expected in (("s1", 40 * 3 + 2 * 40), ("s2", 40 * 3), ("s3", 40 * 3)):
            numbers = [d.event_number for d in store.deliveries(sid, limit=10_000)]
            assert numbers == list(range(1, expected + 1)), sid  # unique and gap-free
            row = store.subscription_row(sid)
            assert row is not None and row.event_count == expected
    finally:
        store.engine.dispose()


def _migrate(store: ExchangeStore, worker: int) -> int:
    store.create_schema()
    return 0


@pytest.mark.parametrize("attempt", range(3))
def test_replicas_starting_together_migrate_once(
    database_url: str, tmp_path: Path, attempt: int
) -> None:
    _run(_migrate, database_url, tmp_path)  # no schema first: the replicas migrate
    store = _store(database_url, tmp_path)
    try:
        tables = [t.__table__ for t in TABLES]
        assert schema_drift(store.engine, tables) == []
    finally:
        store.engine.dispose()
