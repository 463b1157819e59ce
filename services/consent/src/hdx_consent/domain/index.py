"""The in-memory consent index: the latest version of every consent, by person and by
identifier, so the gate decides without I/O."""

from __future__ import annotations

from collections.abc import Iterable

from hdx_consent.domain.consent import Consent, identifier_key, person_key


class ConsentIndex:
    """Latest consent versions, looked up by enterprise person id or trusted identifier.

    Not thread-safe: mutate it from the event loop only (the gate reads it there).
    """

    def __init__(self) -> None:
        self._by_id: dict[str, Consent] = {}
        self._by_key: dict[str, dict[str, Consent]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, consent_id: str) -> Consent | None:
        return self._by_id.get(consent_id)

    def put(self, consent: Consent) -> bool:
        """Index a version unless a newer (or the same) one is already here; True if taken."""
        current = self._by_id.get(consent.id)
        if current is not None:
            if current.version >= consent.version:
                return False
            self._unlink(current)
        self._by_id[consent.id] = consent
        for key in consent.index_keys:
            self._by_key.setdefault(key, {})[consent.id] = consent
        return True

    def replace_all(self, consents: Iterable[Consent]) -> None:
        self._by_id.clear()
        self._by_key.clear()
        for c in consents:
            self.put(c)

    def _unlink(self, consent: Consent) -> None:
        for key in consent.index_keys:
            bucket = self._by_key.get(key)
            if bucket is not None:
                bucket.pop(consent.id, None)
                if not bucket:
                    del self._by_key[key]

    def for_person(self, person: str | None, identifiers: Iterable[str] = ()) -> list[Consent]:
        """Every consent filed under the person id or any of the identifiers, once each."""
        found: dict[str, Consent] = {}
        if person is not None:
            bucket = self._by_key.get(person_key(person))
            if bucket:
                found.update(bucket)
        for ident in identifiers:
            bucket = self._by_key.get(identifier_key(ident))
            if bucket:
                found.update(bucket)
        return list(found.values())
