from __future__ import annotations

from dataclasses import replace

import pytest

from hdx_exchange.domain.audit_chain import (
    GENESIS,
    Anchor,
    ChainedRecord,
    chain_hash,
    verify_chain,
)


def chain(n: int) -> list[ChainedRecord]:
    out, prev = [], GENESIS
    for seq in range(1, n + 1):
        body = f'{{"resourceType":"AuditEvent","id":"a{seq}"}}'.encode()
        h = chain_hash(prev, seq, body)
        out.append(ChainedRecord(seq, f"a{seq}", body, prev, h))
        prev = h
    return out


def test_an_intact_log_verifies() -> None:
    records = chain(5)
    assert verify_chain(records, Anchor(5, records[-1].hash)) == []


def test_an_altered_record_is_named() -> None:
    records = chain(5)
    records[2] = replace(records[2], body=b'{"resourceType":"AuditEvent","id":"forged"}')
    problems = verify_chain(records, Anchor(5, records[-1].hash))
    assert [(p.seq, p.what) for p in problems] == [(3, "content altered")]


@pytest.mark.parametrize("index", [0, 2, 3])
def test_a_removed_record_is_found(index: int) -> None:
    records = chain(5)
    del records[index]
    problems = verify_chain(records, Anchor(5, chain(5)[-1].hash))
    assert problems
    assert problems[0].seq == index + 1


def test_reordered_records_are_found() -> None:
    records = chain(5)
    records[1], records[2] = records[2], records[1]
    assert verify_chain(records, None)


def test_a_cut_off_tail_shows_against_the_anchor() -> None:
    full = chain(5)
    problems = verify_chain(full[:3], Anchor(5, full[-1].hash))
    assert problems
    assert "cut off" in problems[0].what
    # Without the anchor, a chain alone cannot tell.
    assert verify_chain(full[:3], None) == []


def test_a_rewritten_tail_differs_from_its_anchor() -> None:
    full = chain(5)
    forged = chain(4)
    body = b'{"resourceType":"AuditEvent","id":"a5-forged"}'
    forged.append(
        ChainedRecord(5, "a5", body, forged[-1].hash, chain_hash(forged[-1].hash, 5, body))
    )
    problems = verify_chain(forged, Anchor(5, full[-1].hash))
    assert [p.what for p in problems] == ["the newest record differs from its anchor"]
