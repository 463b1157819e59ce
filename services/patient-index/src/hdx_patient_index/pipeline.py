"""The patient index's Kafka stage: hdx.validated → hdx.identified (+ hdx.links, hdx.deadletter).

Input: one validated FHIR resource per record (ingress splits Bundles), with the envelope's
``ce_source`` (the publisher) and ``hdx_patient_ref`` (its local Patient id).

- A Patient is linked to an enterprise person and forwarded with the identifier
  ``urn:hdx:person|<id>`` appended; a new or changed link is also published to hdx.links.
  Resources parked while waiting for this Patient follow it, in the order they arrived.
- Any other resource gets the person identifier on its patient Reference (``subject``,
  ``patient``, …; the literal ``reference`` stays). If its Patient has not arrived yet it is
  parked in the database; after the park timeout it is dead-lettered ("patient-unknown").
- A resource that references no Patient is dead-lettered ("no-patient"): HDX routes
  patient data only.

Everything forwarded is keyed by the person id and carries ``hdx_person`` and
``hdx_person_identifiers`` (the person's trusted identifiers, "system|value"). While the
person's identity is uncertain (an open review task, a merge not yet reviewed) it also
carries ``hdx_identity: uncertain`` and ``hdx_candidate_persons`` (domain/identity.py), and
the event is logged with its validated bytes, to be re-emitted once a person resolves it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from hdx_patient_index.domain.identity import IDENTITY_HEADERS
from hdx_patient_index.domain.stamping import (
    find_patient_reference,
    local_patient_id,
    stamp_patient,
    stamp_reference,
)
from hdx_patient_index.outgoing import link_outgoing
from hdx_patient_index.service import (
    BatchWork,
    LinkEvent,
    ParkedMessage,
    PatientIndexService,
    PersonRef,
)
from hdx_shared.envelope import Envelope
from hdx_shared.fhir import FhirError, Issue, operation_outcome
from hdx_shared.messaging import Inbound, Outgoing, dead_letter, dead_letter_for, handling
from hdx_shared.topics import Topics

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[Outgoing]], Awaitable[None]]


MATCHES = Counter(
    "hdx_patient_index_matches",
    "Patients linked, by match grade (certain, probable, possible; known-record when the "
    "source record was linked before) and whether a review task was opened",
    ["grade", "review"],
)
# Read from the database at every park sweep, so every replica reports the same figure.
PARKED = Gauge("hdx_parked_messages", "Resources parked until their Patient arrives")


def _parse(value: bytes) -> Any:
    """The record's JSON, or the error that says why it is not JSON."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return exc


def _no_patient(resource_type: str) -> FhirError:
    return FhirError(
        "no-patient",
        [
            Issue(
                f"HDX routes patient data only: this {resource_type} references no Patient "
                "(subject or patient as 'Patient/<local id>')",
                code="required",
                expression="subject",
            )
        ],
        http_status=422,
    )


class IdentifyStage:
    def __init__(self, service: PatientIndexService, topics: Topics) -> None:
        self.service = service
        self.topics = topics

    async def handle(self, batch: Sequence[Inbound]) -> list[Outgoing]:
        """The stage handler: the database work runs on a worker thread."""
        return await asyncio.to_thread(self.process, batch)

    def process(self, batch: Sequence[Inbound]) -> list[Outgoing]:
        out: list[Outgoing] = []
        docs = [_parse(m.value) for m in batch]  # each value parsed once
        with self.service.batch() as work:
            work.prefetch(
                {
                    (m.envelope.source, m.envelope.patient_ref)
                    for m in batch
                    if m.envelope.patient_ref
                },
                {m.envelope.event_id for m in batch if m.envelope.event_id},
                {
                    (m.envelope.source, m.envelope.patient_ref)
                    for m in batch
                    if m.envelope.patient_ref and m.envelope.resource_type == "Patient"
                },
                [
                    doc
                    for m, doc in zip(batch, docs, strict=True)
                    if isinstance(doc, dict)
                    and doc.get("resourceType") == "Patient"
                    and isinstance(local := doc.get("id") or m.envelope.patient_ref, str)
                    and local
                ],
            )
            for m, doc in zip(batch, docs, strict=True):
                with handling(m):  # log lines carry this message's trace_id/span_id
                    out.extend(self._one(work, m, doc))
        return out

    def _one(self, work: BatchWork, m: Inbound, doc: Any) -> list[Outgoing]:
        if isinstance(doc, orjson.JSONDecodeError):
            err = FhirError("invalid-json", [Issue(f"not valid JSON: {doc}", code="structure")])
            return [dead_letter_for(self.topics, m, err)]
        if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
            err = FhirError("not-fhir", [Issue("not a FHIR resource", code="structure")])
            return [dead_letter_for(self.topics, m, err)]
        env = m.envelope
        rtype: str = doc["resourceType"]
        if rtype == "Patient":
            return self._patient(work, m, doc)
        ref = find_patient_reference(doc, env.patient_ref) or find_patient_reference(doc)
        local_id = local_patient_id(ref.get("reference")) if ref is not None else None
        if ref is None or local_id is None:
            return [dead_letter_for(self.topics, m, _no_patient(rtype))]
        person = work.person_for(env.source, local_id)
        if person is None:
            work.park(
                ParkedMessage(
                    source=env.source,
                    local_id=local_id,
                    event_id=env.event_id,
                    topic=m.topic,
                    partition=m.partition,
                    offset=m.offset,
                    key=m.key,
                    value=m.value,
                    headers=env.to_headers(),
                )
            )
            return []
        stamp_reference(ref, person.person_id)
        return [self._identified(work, doc, env, local_id, person, m.value, env)]

    def _patient(self, work: BatchWork, m: Inbound, doc: dict[str, Any]) -> list[Outgoing]:
        env = m.envelope
        local_id = doc.get("id") or env.patient_ref
        if not isinstance(local_id, str) or not local_id:
            return [dead_letter_for(self.topics, m, _no_patient("Patient"))]
        outcome = work.link_patient(env.source, local_id, doc, env.event_id or m.origin)
        stamp_patient(doc, outcome.person.person_id)
        out = [self._identified(work, doc, env, local_id, outcome.person, m.value, env)]
        if outcome.link is not None:
            grade = outcome.link.grade
            MATCHES.labels(getattr(grade, "value", grade), str(outcome.link.possible_match)).inc()
            out.append(self._link(outcome.link, env))
        else:
            MATCHES.labels("known-record", "False").inc()
        out.extend(self._released(work, p, outcome.person) for p in outcome.released)
        return out

    def _identified(
        self,
        work: BatchWork,
        doc: dict[str, Any],
        env: Envelope,
        local_id: str,
        person: PersonRef,
        validated: bytes,
        validated_headers: Envelope | dict[str, str],
    ) -> Outgoing:
        """Forward a stamped resource for the patient ``local_id``, with the person's identity
        state; log it if the identity is uncertain or a merge is in force (``validated``: the
        bytes as read; ``validated_headers``: their headers, or the envelope they come from,
        turned into headers only when the event is logged)."""
        state = work.identity(person.person_id)
        # The index alone says whether an identity is uncertain: never a header from upstream.
        extra = {k: v for k, v in env.extra.items() if k not in IDENTITY_HEADERS}
        extra.update(state.headers())
        env = env.evolve(
            patient_ref=local_id,
            person=person.person_id,
            person_identifiers=person.trusted,
            extra=extra,
        )
        if state.uncertain or state.merges:
            work.record_event(
                state,
                event_id=env.event_id,
                source=env.source,
                local_id=local_id,
                resource_type=env.resource_type or str(doc.get("resourceType") or ""),
                value=validated,
                headers=validated_headers.to_headers()
                if isinstance(validated_headers, Envelope)
                else validated_headers,
            )
        return Outgoing(
            self.topics.identified, orjson.dumps(doc), person.person_id.encode(), env.to_headers()
        )

    def _released(self, work: BatchWork, parked: ParkedMessage, person: PersonRef) -> Outgoing:
        env = Envelope.from_headers(parked.headers)
        doc = orjson.loads(parked.value)
        ref = find_patient_reference(doc, parked.local_id)
        if ref is not None:
            stamp_reference(ref, person.person_id)
        return self._identified(
            work, doc, env, parked.local_id, person, parked.value, parked.headers
        )

    def _link(self, link: LinkEvent, env: Envelope) -> Outgoing:
        return link_outgoing(self.topics, link, env.extra)

    # The park timeout ------------------------------------------------------------------
    async def expire_parked(self, publish: Publish, timeout_ms: int) -> int:
        """Dead-letter what waited longer than the timeout ("patient-unknown"); the count.

        Published first, forgotten after: a crash in between dead-letters it twice, never
        loses it.
        """
        expired = await asyncio.to_thread(self.service.expired_parked, timeout_ms)
        if expired:
            await publish([self._expired(p, timeout_ms) for p in expired])
            log.info("dead-lettered %d parked resources: patient unknown", len(expired))
        cutoff = self.service.clock() - timeout_ms
        await asyncio.to_thread(self.service.drop_parked, expired, cutoff)
        PARKED.set(await asyncio.to_thread(self.service.store.count_parked))
        return len(expired)

    def _expired(self, p: ParkedMessage, timeout_ms: int) -> Outgoing:
        message = Inbound(
            topic=p.topic,
            partition=p.partition,
            offset=p.offset,
            key=p.key,
            value=p.value,
            envelope=Envelope.from_headers(p.headers),
        )
        hours = timeout_ms / 3_600_000
        outcome = operation_outcome(
            [
                Issue(
                    f"Patient/{p.local_id} from {p.source} did not arrive within "
                    f"{hours:g} h of this resource; it was parked and is now dead-lettered",
                    code="not-found",
                    expression="subject",
                )
            ]
        )
        return dead_letter(self.topics, message, "patient-unknown", outcome)
