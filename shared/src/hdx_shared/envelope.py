"""The event envelope: what every HDX record carries beside its FHIR payload.

Records travel in CloudEvents' Kafka binary mode: the value is the FHIR JSON itself (never
wrapped, never re-serialised by a model), and the event's attributes are record headers.
HDX adds a few headers of its own (``hdx_*``) as a message moves along the pipeline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Self

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


def derive_event_id(*parts: str) -> str:
    """A stable event id from stable facts (source, publisher's id, entry index)."""
    return str(uuid.uuid5(EVENT_NAMESPACE, "|".join(parts)))


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
        h: dict[str, str] = {}
        for k, v in items:
            h[k] = v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)
        change_raw = h.pop(Header.TYPE, ChangeType.UPDATE.value)
        try:
            change = ChangeType(change_raw.rsplit(".", 1)[-1])
        except ValueError:
            change = ChangeType.UPDATE
            h["hdx_invalid_type"] = change_raw
        received = h.pop(Header.RECEIVED_AT, None)
        idents = h.pop(Header.PERSON_IDENTIFIERS, "")
        for known in (Header.SPECVERSION, Header.CONTENT_TYPE):
            h.pop(known, None)
        return cls(
            event_id=h.pop(Header.ID, ""),
            source=h.pop(Header.SOURCE, ""),
            change=change,
            resource_type=h.pop(Header.RESOURCE_TYPE, None),
            patient_ref=h.pop(Header.PATIENT_REF, None),
            person=h.pop(Header.PERSON, None),
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
        h[Header.ID.value] = self.event_id
        h[Header.SOURCE.value] = self.source
        h[Header.TYPE.value] = self.change.value
        h[Header.SPECVERSION.value] = CE_SPECVERSION
        h[Header.CONTENT_TYPE.value] = FHIR_JSON
        if self.resource_type:
            h[Header.RESOURCE_TYPE.value] = self.resource_type
        if self.patient_ref:
            h[Header.PATIENT_REF.value] = self.patient_ref
        if self.person:
            h[Header.PERSON.value] = self.person
        if self.person_identifiers:
            h[Header.PERSON_IDENTIFIERS.value] = " ".join(self.person_identifiers)
        if self.received_at_ms is not None:
            h[Header.RECEIVED_AT.value] = str(self.received_at_ms)
        return h

    def with_extra(self, **headers: str) -> Envelope:
        merged = dict(self.extra)
        merged.update({str(k): v for k, v in headers.items()})
        return replace(self, extra=merged)

    def without_extra(self, *names: str) -> Envelope:
        return replace(self, extra={k: v for k, v in self.extra.items() if k not in names})

    def evolve(self, **changes: object) -> Envelope:
        return replace(self, **changes)  # type: ignore[arg-type]

    def key_by_person(self) -> bytes:
        """Keying by enterprise person keeps one patient's events in one partition, in order."""
        return (self.person or self.patient_ref or self.event_id).encode()
