"""The event envelope: what every HDX record carries beside its FHIR payload.

Records travel in CloudEvents' Kafka binary mode: the value is the FHIR JSON itself (never
wrapped, never re-serialised by a model), and the event's attributes are record headers.
HDX adds a few headers of its own (``hdx_*``) as a message moves along the pipeline.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

CE_SPECVERSION = "1.0"
FHIR_JSON = "application/fhir+json"
# Event ids HDX derives are UUIDv5 in this namespace, so a redelivered record gets the same id.
EVENT_NAMESPACE = uuid.UUID("6f1d3c1e-7a43-4d0e-9a55-8e6c2f0b1d2a")


class Header(StrEnum):
    ID = "ce_id"
    SOURCE = "ce_source"
    TYPE = "ce_type"
    SPECVERSION = "ce_specversion"
    TIME = "ce_time"
    CONTENT_TYPE = "content-type"
    TRACEPARENT = "traceparent"
    TRACESTATE = "tracestate"
    # HDX's own, added hop by hop.
    RESOURCE_TYPE = "hdx_resource_type"
    PATIENT_REF = "hdx_patient_ref"  # the publisher's local Patient id
    PERSON = "hdx_person"  # the enterprise person id
    PERSON_IDENTIFIERS = "hdx_person_identifiers"  # trusted ids, "system|value" joined by " "
    RECEIVED_AT = "hdx_received_at"  # ms since the epoch, when ingress accepted it
    CANDIDATES = "hdx_candidates"  # JSON: subscriptions whose criteria matched
    PERMITTED = "hdx_permitted"  # JSON: subscriptions consent permitted
    REASON = "hdx_reason"  # dead letters: a short machine-readable reason code
    OUTCOME = "hdx_outcome"  # dead letters: the FHIR OperationOutcome (JSON)
    ORIGIN = "hdx_origin"  # dead letters: topic/partition/offset it came from


class ChangeType(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


# The headers' names as plain strings, for the per-record code below (an enum member's
# attribute lookup and hashing cost more than a str's, and this runs for every record at
# every hop).
_ID, _SOURCE, _TYPE = Header.ID.value, Header.SOURCE.value, Header.TYPE.value
_SPECVERSION, _CONTENT_TYPE = Header.SPECVERSION.value, Header.CONTENT_TYPE.value
_RESOURCE_TYPE, _PATIENT_REF = Header.RESOURCE_TYPE.value, Header.PATIENT_REF.value
_PERSON, _PERSON_IDENTIFIERS = Header.PERSON.value, Header.PERSON_IDENTIFIERS.value
_RECEIVED_AT = Header.RECEIVED_AT.value
_CHANGES = {c.value: c for c in ChangeType}


def uuid5_str(namespace: uuid.UUID, name: str) -> str:
    """`str(uuid.uuid5(namespace, name))`, without building a UUID object on the way.

    Derived ids are made for every record at several hops (AuditEvents, notifications);
    the stdlib's UUID construction and formatting cost three times the SHA-1 itself."""
    digest = bytearray(
        hashlib.sha1(namespace.bytes + name.encode(), usedforsecurity=False).digest()
    )
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def derive_event_id(*parts: str) -> str:
    """A stable event id from stable facts (source, publisher's id, entry index)."""
    return uuid5_str(EVENT_NAMESPACE, "|".join(parts))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Envelope:
    """The attributes of one event, read from and written to Kafka headers."""

    event_id: str
    source: str
    change: ChangeType = ChangeType.UPDATE
    resource_type: str | None = None
    patient_ref: str | None = None
    person: str | None = None
    person_identifiers: tuple[str, ...] = ()
    received_at_ms: int | None = None
    # Headers HDX passes along untouched (trace context, hop-specific JSON).
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, bytes]] | Mapping[str, str]) -> Self:
        """Read an envelope; missing ids are left empty for the caller to reject or derive."""
        items = headers.items() if isinstance(headers, Mapping) else headers
        h: dict[str, str] = {
            k: v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)
            for k, v in items
        }
        change_raw = h.pop(_TYPE, "update")
        change = _CHANGES.get(change_raw.rsplit(".", 1)[-1])
        if change is None:
            change = ChangeType.UPDATE
            h["hdx_invalid_type"] = change_raw
        received = h.pop(_RECEIVED_AT, None)
        idents = h.pop(_PERSON_IDENTIFIERS, "")
        h.pop(_SPECVERSION, None)
        h.pop(_CONTENT_TYPE, None)
        return cls(
            event_id=h.pop(_ID, ""),
            source=h.pop(_SOURCE, ""),
            change=change,
            resource_type=h.pop(_RESOURCE_TYPE, None),
            patient_ref=h.pop(_PATIENT_REF, None),
            person=h.pop(_PERSON, None),
            person_identifiers=tuple(idents.split()) if idents else (),
            received_at_ms=int(received)
            if received and received.isascii() and received.isdigit()
            else None,
            extra=h,
        )

    def to_headers(self) -> dict[str, str]:
        """Headers for the next hop: CloudEvents binary mode plus HDX's own."""
        # Plain str keys: Kafka clients' C extensions reject str subclasses such as Header.
        h = {str(k): v for k, v in self.extra.items() if not k.startswith("hdx_invalid")}
        h[_ID] = self.event_id
        h[_SOURCE] = self.source
        h[_TYPE] = self.change.value
        h[_SPECVERSION] = CE_SPECVERSION
        h[_CONTENT_TYPE] = FHIR_JSON
        if self.resource_type:
            h[_RESOURCE_TYPE] = self.resource_type
        if self.patient_ref:
            h[_PATIENT_REF] = self.patient_ref
        if self.person:
            h[_PERSON] = self.person
        if self.person_identifiers:
            h[_PERSON_IDENTIFIERS] = " ".join(self.person_identifiers)
        if self.received_at_ms is not None:
            h[_RECEIVED_AT] = str(self.received_at_ms)
        return h

    def with_extra(self, **headers: str) -> Envelope:
        merged = dict(self.extra)
        merged.update({str(k): v for k, v in headers.items()})
        return self._with(extra=merged)

    def without_extra(self, *names: str) -> Envelope:
        return self._with(extra={k: v for k, v in self.extra.items() if k not in names})

    def evolve(self, **changes: object) -> Envelope:
        return self._with(**changes)

    def _with(self, **changes: Any) -> Envelope:
        """A copy with `changes` — `dataclasses.replace` without its look at the fields on
        every call, which cost as much as the copy (envelopes are copied at every hop).
        A new field must be copied here too (test_envelope checks every field is)."""
        take = changes.pop
        copy = Envelope(
            take("event_id", self.event_id),
            take("source", self.source),
            take("change", self.change),
            take("resource_type", self.resource_type),
            take("patient_ref", self.patient_ref),
            take("person", self.person),
            take("person_identifiers", self.person_identifiers),
            take("received_at_ms", self.received_at_ms),
            take("extra", self.extra),
        )
        if changes:
            raise TypeError(f"Envelope has no field {', '.join(sorted(changes))}")
        return copy

    def key_by_person(self) -> bytes:
        """Keying by enterprise person keeps one patient's events in one partition, in order."""
        return (self.person or self.patient_ref or self.event_id).encode()
