"""The in-memory person index: every source record's demographics, filed by blocking key and
by trusted identifier, so finding a record's candidates never touches the database.

The database is the durable copy; the index is loaded from it at start-up and kept current
by the stage that writes it (and refreshed from it for what other replicas wrote). It is
safe to read from the HTTP API's threads while the stage writes: one lock guards it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from hdx_patient_index.domain.blocking import index_keys, keyed_keys, query_keys
from hdx_patient_index.domain.comparators import Level, compare_identifiers
from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.identifiers import Identifier

RecordKey = tuple[str, str]  # (source, the source's local patient id)


@dataclass(frozen=True, slots=True)
class IndexedRecord:
    key: RecordKey
    person_id: str
    demographics: Demographics
    blocks: frozenset[str]


class PersonIndex:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._records: dict[RecordKey, IndexedRecord] = {}
        self._persons: dict[str, set[RecordKey]] = {}
        self._blocks: dict[str, set[RecordKey]] = {}
        self._trusted: dict[Identifier, set[RecordKey]] = {}
        # Untrusted identifiers by deletion variant (`blocking.keyed_keys`). Tuples, not
        # sets: ~7 variants a record, nearly all held by one record, and tuples of strings
        # are no work for the garbage collector.
        self._keyed: dict[str, tuple[RecordKey, ...]] = {}

    def __len__(self) -> int:
        return len(self._records)

    @property
    def person_count(self) -> int:
        return len(self._persons)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._persons.clear()
            self._blocks.clear()
            self._trusted.clear()
            self._keyed.clear()

    def put(self, key: RecordKey, person_id: str, demographics: Demographics) -> None:
        """File (or re-file) one source record; idempotent."""
        with self._lock:
            old = self._records.get(key)
            if old is not None:
                if old.person_id == person_id and old.demographics == demographics:
                    return
                self._unfile(old)
            rec = IndexedRecord(key, person_id, demographics, index_keys(demographics))
            self._records[key] = rec
            self._persons.setdefault(person_id, set()).add(key)
            for b in rec.blocks:
                self._blocks.setdefault(b, set()).add(key)
            for t in demographics.trusted:
                self._trusted.setdefault(t, set()).add(key)
            keyed = self._keyed
            for b in keyed_keys(demographics):
                keyed[b] = (*keyed.get(b, ()), key)

    def remove(self, key: RecordKey) -> None:
        with self._lock:
            old = self._records.get(key)
            if old is not None:
                self._unfile(old)

    def _unfile(self, rec: IndexedRecord) -> None:
        del self._records[rec.key]
        keys = self._persons.get(rec.person_id)
        if keys is not None:
            keys.discard(rec.key)
            if not keys:
                del self._persons[rec.person_id]
        for b in rec.blocks:
            bucket = self._blocks.get(b)
            if bucket is not None:
                bucket.discard(rec.key)
                if not bucket:
                    del self._blocks[b]
        for t in rec.demographics.trusted:
            holders = self._trusted.get(t)
            if holders is not None:
                holders.discard(rec.key)
                if not holders:
                    del self._trusted[t]
        for b in keyed_keys(rec.demographics):
            rest = tuple(k for k in self._keyed.get(b, ()) if k != rec.key)
            if rest:
                self._keyed[b] = rest
            else:
                self._keyed.pop(b, None)

    def person_of(self, key: RecordKey) -> str | None:
        rec = self._records.get(key)
        return rec.person_id if rec else None

    def record(self, key: RecordKey) -> IndexedRecord | None:
        return self._records.get(key)

    def records(self) -> list[IndexedRecord]:
        """Every source record filed, in key order."""
        with self._lock:
            return [self._records[k] for k in sorted(self._records)]

    def records_of(self, person_id: str) -> list[IndexedRecord]:
        with self._lock:
            return [self._records[k] for k in sorted(self._persons.get(person_id, ()))]

    def trusted_of(self, person_id: str) -> dict[str, set[str]]:
        """The person's trusted identifiers by system (from all its records)."""
        out: dict[str, set[str]] = {}
        for rec in self.records_of(person_id):
            for t in rec.demographics.trusted:
                out.setdefault(t.system, set()).add(t.value)
        return out

    def owners(self, identifiers: Iterable[Identifier]) -> set[str]:
        """Persons one of whose records carries one of these (trusted) identifiers."""
        with self._lock:
            return {
                self._records[k].person_id for i in identifiers for k in self._trusted.get(i, ())
            }

    def candidates(self, demographics: Demographics) -> set[str]:
        """Persons sharing at least one blocking key with these demographics, or an
        untrusted identifier one keying error away (`blocking.keyed_keys`)."""
        with self._lock:
            found = {
                self._records[k].person_id
                for b in query_keys(demographics)
                for k in self._blocks.get(b, ())
            }
            for b in keyed_keys(demographics):
                for k in self._keyed.get(b, ()):
                    rec = self._records[k]
                    if rec.person_id not in found and (
                        compare_identifiers(demographics, rec.demographics) is Level.ONE_DIGIT
                    ):
                        found.add(rec.person_id)
            return found
