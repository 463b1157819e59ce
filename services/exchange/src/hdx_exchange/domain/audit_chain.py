"""The audit log's hash chain: each record's hash covers its content and the hash before it.

Changing, removing or reordering any record breaks the chain at that record. A chain alone
cannot show that its newest records were cut off, so the head (sequence number and hash) is
also written somewhere else after every append — the anchors topic — and verification
compares the log's end with the newest anchor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

GENESIS = "0" * 64


def chain_hash(previous: str, seq: int, body: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(previous.encode())
    digest.update(seq.to_bytes(8, "big"))
    digest.update(hashlib.sha256(body).digest())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ChainedRecord:
    seq: int
    audit_id: str
    body: bytes
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class Anchor:
    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class Problem:
    seq: int
    audit_id: str | None
    what: str


def verify_chain(records: Iterable[ChainedRecord], anchor: Anchor | None) -> list[Problem]:
    """Every place the log is not what was written, in order; empty when it is intact."""
    problems: list[Problem] = []
    previous, expected_seq = GENESIS, 1
    last: ChainedRecord | None = None
    for r in records:
        if r.seq != expected_seq:
            problems.append(
                Problem(
                    expected_seq,
                    None,
                    f"records {expected_seq}..{r.seq - 1} are missing"
                    if r.seq > expected_seq
                    else f"record {r.seq} is out of order",
                )
            )
        if r.prev_hash != previous:
            problems.append(
                Problem(
                    r.seq,
                    r.audit_id,
                    "does not follow the record before it (removed, inserted or reordered)",
                )
            )
        if chain_hash(r.prev_hash, r.seq, r.body) != r.hash:
            problems.append(Problem(r.seq, r.audit_id, "content altered"))
        previous, expected_seq, last = r.hash, r.seq + 1, r
    if anchor is not None:
        end = last.seq if last else 0
        if anchor.seq > end:
            problems.append(
                Problem(
                    end + 1,
                    None,
                    f"the log ends at {end} but was anchored at {anchor.seq}: records were cut off",
                )
            )
        elif last is not None and anchor.seq == end and anchor.hash != last.hash:
            problems.append(
                Problem(end, last.audit_id, "the newest record differs from its anchor")
            )
    return problems
