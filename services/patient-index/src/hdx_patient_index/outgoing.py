"""The records the patient index writes besides the stage's forwarding: link events on the
compacted links topic, identity events and re-evaluated events on hdx.identified, and
AuditEvents of identity changes on hdx.audit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from hdx_patient_index.domain.audit import identity_audit_event, identity_audit_id
from hdx_patient_index.domain.identity import (
    IDENTITY_CHANGE_HEADER,
    IDENTITY_HEADERS,
    PATIENT_INDEX_SOURCE,
    REEVALUATION_HEADER,
    RESOLUTION_HEADER,
    IdentityChange,
    IdentityState,
)
from hdx_patient_index.domain.stamping import stamp
from hdx_patient_index.service import LinkEvent, PersonRef
from hdx_shared.envelope import ChangeType, Envelope, Header, derive_event_id
from hdx_shared.messaging import Outgoing
from hdx_shared.topics import Topics

TRACE_HEADERS = (Header.TRACEPARENT.value, Header.TRACESTATE.value)


def link_outgoing(topics: Topics, link: LinkEvent, trace: Mapping[str, str]) -> Outgoing:
    """Key ``source|local id``; value ``{"person", "source", "local_id", "grade", "by"}``
    plus ``possible_match``, and for manual changes ``operation``, ``weight`` and
    ``no_link`` (the persons a person decided this record is not)."""
    grade = link.grade if isinstance(link.grade, str) else link.grade.value
    value: dict[str, Any] = {
        "person": link.person_id,
        "source": link.source,
        "local_id": link.local_id,
        "grade": str(grade),
        "by": link.by,
    }
    if link.possible_match:
        value["possible_match"] = True
    if link.operation:
        value["operation"] = link.operation
    if link.weight is not None:
        value["weight"] = round(link.weight, 3)
    if link.no_link:
        value["no_link"] = list(link.no_link)
    parts = ["link", link.source, link.local_id, link.person_id]
    if link.operation_id:
        parts.append(link.operation_id)
    headers = {
        Header.ID.value: derive_event_id(*parts),
        Header.SOURCE.value: link.source,
        Header.TYPE.value: "link",
        Header.SPECVERSION.value: "1.0",
        Header.CONTENT_TYPE.value: "application/json",
        Header.PERSON.value: link.person_id,
        Header.PATIENT_REF.value: link.local_id,
    }
    for name in TRACE_HEADERS:
        if name in trace:
            headers[name] = trace[name]
    return Outgoing(
        topics.links, orjson.dumps(value), f"{link.source}|{link.local_id}".encode(), headers
    )


def identity_outgoing(
    topics: Topics,
    patient: dict[str, Any],
    person: str,
    identifiers: Sequence[str],
    change: IdentityChange,
    state: IdentityState,
    now_ms: int,
) -> Outgoing:
    """An identity event (a Patient, see domain/identity.py) on hdx.identified, routed like
    any Patient; it carries the person's uncertainty like every other event."""
    env = Envelope(
        event_id=derive_event_id("identity", change.operation, person),
        source=PATIENT_INDEX_SOURCE,
        change=ChangeType.UPDATE,
        resource_type="Patient",
        person=person,
        person_identifiers=tuple(identifiers),
        received_at_ms=now_ms,
        extra={IDENTITY_CHANGE_HEADER: change.action.value, **state.headers()},
    )
    return Outgoing(topics.identified, orjson.dumps(patient), person.encode(), env.to_headers())


def audit_outgoing(topics: Topics, change: IdentityChange, now_ms: int) -> Outgoing:
    """The AuditEvent of an identity change; headers name the person, no identifiers."""
    person = change.persons[0] if change.persons else None
    env = Envelope(
        event_id=identity_audit_id(change.operation),
        source=PATIENT_INDEX_SOURCE,
        change=ChangeType.CREATE,
        resource_type="AuditEvent",
        person=person,
    )
    return Outgoing(
        topics.audit,
        orjson.dumps(identity_audit_event(change, now_ms)),
        (person or change.operation).encode(),
        env.to_headers(),
    )


def reemitted(
    topics: Topics,
    value: bytes,
    headers: Mapping[str, str],
    local_id: str,
    person: PersonRef,
    state: IdentityState,
    operation: str,
) -> Outgoing:
    """An event emitted while its identity was uncertain, again — its original event id,
    stamped with the resolved person, ``hdx_reevaluation: 1`` and ``hdx_resolution``."""
    doc = orjson.loads(value)
    stamp(doc, local_id, person.person_id)
    env = (
        Envelope.from_headers(headers)
        .without_extra(*IDENTITY_HEADERS)
        .evolve(patient_ref=local_id, person=person.person_id, person_identifiers=person.trusted)
        .with_extra(**state.headers(), **{REEVALUATION_HEADER: "1", RESOLUTION_HEADER: operation})
    )
    return Outgoing(
        topics.identified, orjson.dumps(doc), person.person_id.encode(), env.to_headers()
    )
