"""What the exchange accepts from a publisher, and how one message becomes routable events."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from hdx_shared.envelope import ChangeType, Envelope, derive_event_id, now_ms
from hdx_shared.fhir import FhirError, Issue, Limits, Reference, decode_resource


@dataclass(frozen=True, slots=True)
class Publisher:
    """A registered source: who may publish, the system its local patient ids belong to, and
    the name of its own inbound topic (`Topics.publisher_inbound`)."""

    source: str
    name: str
    patient_identifier_system: str
    active: bool = True
    topic_name: str = ""

    def __post_init__(self) -> None:
        if not self.topic_name:
            object.__setattr__(self, "topic_name", topic_name_for(self.source))


def topic_name_for(source: str) -> str:
    """The default name of a source's inbound topic: the source's letters and digits, e.g.
    "urn:hdx:source:st-marys" → "urn-hdx-source-st-marys" (registration may choose another)."""
    name = re.sub(r"[^A-Za-z0-9_]+", "-", source).strip("-_")[:100]
    return name or "publisher"


def bind_to_topic(envelope: Envelope, owner: Publisher | None, topic: str) -> Envelope:
    """A message on a publisher's own inbound topic is that publisher's: it may name its
    source in ce_source or leave it out, and any other source is refused (FhirError 403).

    Only the topic is to be trusted here: Kafka ACLs decide who may write it, while every
    header is whatever the writer put there."""
    if owner is None or not owner.active:
        raise FhirError(
            "unknown-publisher-topic",
            [Issue(f"no active publisher is registered for topic {topic}", code="security")],
            http_status=403,
        )
    if envelope.source and envelope.source != owner.source:
        raise FhirError(
            "source-not-bound",
            [
                Issue(
                    f"topic {topic} is {owner.source}'s; a message on it may not claim "
                    f"source '{envelope.source}'",
                    code="security",
                    expression="ce_source",
                )
            ],
            http_status=403,
        )
    return envelope if envelope.source else envelope.evolve(source=owner.source)


@dataclass(frozen=True, slots=True)
class AcceptedResource:
    """One FHIR resource ready for the patient index: payload bytes and its envelope."""

    value: bytes
    envelope: Envelope
    resource_id: str | None = None

    @property
    def owner(self) -> tuple[str, str, str, str] | None:
        """(source, type, id, local patient id): what a later DELETE is routed by."""
        env = self.envelope
        if self.resource_id and env.resource_type and env.patient_ref:
            return (env.source, env.resource_type, self.resource_id, env.patient_ref)
        return None

    @property
    def key(self) -> bytes:
        # source|local patient id: one patient's events from one source stay in order.
        return f"{self.envelope.source}|{self.envelope.patient_ref}".encode()


# Elements that point at the patient a resource is about, by resource type (FHIR R4).
PATIENT_ELEMENT: dict[str, str] = {
    "Observation": "subject",
    "Encounter": "subject",
    "Condition": "subject",
    "Procedure": "subject",
    "DiagnosticReport": "subject",
    "MedicationRequest": "subject",
    "MedicationStatement": "subject",
    "MedicationAdministration": "subject",
    "ServiceRequest": "subject",
    "CarePlan": "subject",
    "DocumentReference": "subject",
    "Immunization": "patient",
    "AllergyIntolerance": "patient",
    "Flag": "subject",
    "ClinicalImpression": "subject",
    "QuestionnaireResponse": "subject",
    "Specimen": "subject",
    "EpisodeOfCare": "patient",
    "Appointment": "participant",
}
BUNDLE_TYPES_ACCEPTED = frozenset({"transaction", "batch", "collection", "message"})


def patient_ref_of(resource: Mapping[str, Any], where: str = "") -> str:
    """The publisher's local Patient id this resource is about; FhirError if there is none."""
    rtype = resource["resourceType"]
    if rtype == "Patient":
        rid = resource.get("id")
        if not isinstance(rid, str):
            raise FhirError(
                "no-patient-id",
                [
                    Issue(
                        "a Patient needs its id: it is the publisher's local patient identifier",
                        code="required",
                        expression=f"{where}id",
                    )
                ],
            )
        return rid
    element = PATIENT_ELEMENT.get(rtype)
    if element is None:
        raise FhirError(
            "not-patient-data",
            [
                Issue(
                    f"HDX exchanges patient data; {rtype} is not routed",
                    code="not-supported",
                    expression=f"{where}resourceType",
                )
            ],
            http_status=422,
        )
    ref_obj = resource.get(element)
    if element == "participant" and isinstance(ref_obj, list):
        ref_obj = next(
            (
                p.get("actor")
                for p in ref_obj
                if isinstance(p, dict)
                and str((p.get("actor") or {}).get("reference", "")).startswith("Patient/")
            ),
            None,
        )
    ref = ref_obj.get("reference") if isinstance(ref_obj, dict) else None
    parsed = Reference.parse(ref) if isinstance(ref, str) else None
    if parsed is None or parsed.resource_type != "Patient":
        raise FhirError(
            "broken-reference",
            [
                Issue(
                    f"{rtype}.{element} must reference the patient as 'Patient/<local id>'",
                    code="required",
                    expression=f"{where}{element}.reference",
                )
            ],
            http_status=422,
        )
    return parsed.id


def check_own_identifier(resource: Mapping[str, Any], publisher: Publisher, where: str) -> None:
    """A Patient that carries the publisher's own identifier must carry it for itself.

    Patient.id is the publisher's local id; an identifier in the publisher's own system
    with another value means the message is about someone else, or came from someone else.
    """
    if resource.get("resourceType") != "Patient":
        return
    for i, ident in enumerate(resource.get("identifier", ())):
        if (
            isinstance(ident, dict)
            and ident.get("system") == publisher.patient_identifier_system
            and ident.get("value") != resource.get("id")
        ):
            raise FhirError(
                "mismatched-source",
                [
                    Issue(
                        f"identifier[{i}] in {publisher.source}'s own system "
                        f"({publisher.patient_identifier_system}) is '{ident.get('value')}', "
                        f"but the Patient's id is '{resource.get('id')}'",
                        code="business-rule",
                        expression=f"{where}identifier[{i}]",
                    )
                ],
                http_status=422,
            )


def accept_message(
    raw: bytes,
    envelope: Envelope,
    publishers: Mapping[str, Publisher],
    limits: Limits,
    fallback_id: str,
    expect: Callable[[dict[str, Any]], None] | None = None,
    parsed: dict[str, Any] | None = None,
) -> list[AcceptedResource]:
    """Validate one inbound message and split it into routable resources, or raise FhirError.

    A Bundle is accepted or rejected whole (an invalid entry rejects the message), so a
    publisher never has to guess which half of a transaction went through. `expect` sees the
    parsed document before validation (FHIR REST: the type and id the URL names); `parsed`
    is the document when the caller has already parsed `raw` strictly (`parse_json`).
    """
    publisher = publishers.get(envelope.source)
    if not envelope.source or publisher is None or not publisher.active:
        raise FhirError(
            "unknown-publisher",
            [
                Issue(
                    f"source '{envelope.source or '(missing ce_source)'}' is not a registered "
                    "publisher",
                    code="security",
                )
            ],
            http_status=403,
        )
    doc = decode_resource(raw, limits, expect, parsed)
    origin_id = envelope.event_id or fallback_id
    # HDX's own headers are HDX's to set: whatever a publisher put there is dropped, so no
    # one can claim an identity, a candidate or a consent decision from outside.
    envelope = Envelope(
        envelope.event_id,
        envelope.source,
        envelope.change,
        extra={k: v for k, v in envelope.extra.items() if not k.startswith("hdx_")},
    )
    received = now_ms()

    def event(
        resource: dict[str, Any], value: bytes, index: int, change: ChangeType, where: str
    ) -> AcceptedResource:
        check_own_identifier(resource, publisher, where)
        rid = resource.get("id")
        return AcceptedResource(
            value,
            envelope.evolve(
                event_id=derive_event_id(envelope.source, origin_id, str(index)),
                change=change,
                resource_type=resource["resourceType"],
                patient_ref=patient_ref_of(resource, where),
                received_at_ms=received,
            ),
            rid if isinstance(rid, str) else None,
        )

    if doc["resourceType"] != "Bundle":
        return [event(doc, raw, 0, envelope.change, "")]
    if doc.get("type") not in BUNDLE_TYPES_ACCEPTED:
        raise FhirError(
            "unsupported-bundle",
            [
                Issue(
                    f"Bundle.type '{doc.get('type')}' is not published; use transaction, batch, "
                    "collection or message",
                    code="not-supported",
                    expression="type",
                )
            ],
            http_status=422,
        )
    out: list[AcceptedResource] = []
    issues: list[Issue] = []
    for i, entry in enumerate(doc.get("entry", ())):
        resource = entry.get("resource")
        if resource is None or resource.get("resourceType") == "MessageHeader":
            continue  # a DELETE without a body, or the message's header: nothing to route
        method = (entry.get("request") or {}).get("method")
        change = {
            "POST": ChangeType.CREATE,
            "PUT": ChangeType.UPDATE,
            "DELETE": ChangeType.DELETE,
        }.get(method or "", envelope.change)
        try:
            out.append(event(resource, orjson.dumps(resource), i, change, f"entry[{i}].resource."))
        except FhirError as exc:
            issues.extend(exc.issues)
    if issues:
        raise FhirError("invalid-bundle-entry", issues, http_status=422)
    if not out:
        raise FhirError(
            "empty-bundle",
            [Issue("the Bundle carries no resource to route", code="required", expression="entry")],
        )
    return out


def tombstone(resource_type: str, resource_id: str, patient_ref: str) -> dict[str, Any]:
    """What a DELETE publishes: the resource's identity and its patient, nothing else."""
    if resource_type == "Patient":
        return {"resourceType": "Patient", "id": resource_id}
    element = PATIENT_ELEMENT.get(resource_type, "subject")
    ref = {"reference": f"Patient/{patient_ref}"}
    if element == "participant":
        return {"resourceType": resource_type, "id": resource_id, "participant": [{"actor": ref}]}
    return {"resourceType": resource_type, "id": resource_id, element: ref}
