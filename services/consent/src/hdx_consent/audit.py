"""The FHIR R4 AuditEvent HDX records for every consent decision (a pure builder).

Shape, after IHE Basic Audit Log Patterns:
- type urn:hdx:audit#consent-decision; subtype #permit or #deny, plus #break-glass when a
  break-glass permit overrode a deny; action E (execute); outcome 0 (permit) / 4 (deny);
- agents: the consent service (the decider), the recipient (information recipient, with
  the purpose of use) and the publishing source (custodian);
- source.observer: the consent service;
- entities: the patient (Patient/<enterprise id> — ids only, never names or birth dates),
  the data (resource type, event id, security labels), the subscription, and the Consent
  that decided (or, when none did, the exchange policy) with the reasons as details.

Its id is uuid5(event id, subscription id), so a redelivered message yields the same id; an
event the patient index re-emitted after resolving an uncertain identity is a new decision,
and its id is uuid5(event id, subscription id, "reevaluation", resolution).

When the record's identity was uncertain, the subtype also has ``identity-uncertain``, and
the decider entity's details say so (``identity``) and name each candidate person
(``candidatePerson``: Patient/<enterprise id> — never their identifiers).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from hdx_consent.domain.consent import RESOURCE_TYPES_SYSTEM
from hdx_consent.domain.decision import ConsentDecision, DecisionRequest
from hdx_consent.domain.timeutil import fhir_instant
from hdx_shared.envelope import derive_event_id

AUDIT_SYSTEM = "urn:hdx:audit"
EVENT_ID_SYSTEM = "urn:hdx:event-id"
SUBSCRIPTION_SYSTEM = "urn:hdx:subscription"
SERVICE_SYSTEM = "urn:hdx:service"
SOURCE_SYSTEM = "urn:hdx:source"
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"


def audit_event_id(event_id: str, subscription: str, reevaluation: str | None = None) -> str:
    """uuid5 of (event id, subscription id) in HDX's event namespace — plus the resolution
    when the event is a re-evaluation after an identity was resolved."""
    if reevaluation:
        return derive_event_id(event_id, subscription, "reevaluation", reevaluation)
    return derive_event_id(event_id, subscription)


def _service(name: str) -> dict[str, Any]:
    return {
        "identifier": {"system": SERVICE_SYSTEM, "value": name},
        "display": f"HDX {name} service",
    }


def _detail(kind: str, value: str) -> dict[str, str]:
    return {"type": kind, "valueString": value}


def audit_event(
    *,
    decision: ConsentDecision,
    request: DecisionRequest,
    event_id: str,
    subscription: str,
    subscriber: str,
    source: str,
    recorded: datetime,
    service: str = "consent",
    identity_uncertain: bool = False,
    candidate_persons: Sequence[str] = (),
    reevaluation: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent for one decision about one message and one subscription."""
    purpose = {"coding": [{"system": PURPOSE_SYSTEM, "code": request.purpose}]}
    subtype = [
        {
            "system": AUDIT_SYSTEM,
            "code": decision.decision,
            "display": "Permitted" if decision.permit else "Denied",
        }
    ]
    if decision.break_glass:
        subtype.append(
            {"system": AUDIT_SYSTEM, "code": "break-glass", "display": "Break-glass override"}
        )
    if identity_uncertain:
        subtype.append(
            {"system": AUDIT_SYSTEM, "code": "identity-uncertain", "display": "Identity uncertain"}
        )
    if reevaluation:
        subtype.append({"system": AUDIT_SYSTEM, "code": "reevaluation", "display": "Re-evaluation"})

    if request.person:
        patient_ref: dict[str, Any] = {"reference": f"Patient/{request.person}"}
    elif request.identifiers:
        system, _, value = request.identifiers[0].partition("|")
        patient_ref = {"identifier": {"system": system, "value": value}}
    else:
        patient_ref = {"display": "unidentified patient"}

    data: dict[str, Any] = {
        "what": {
            "identifier": {"system": EVENT_ID_SYSTEM, "value": event_id},
            "type": request.resource_type or "Resource",
        },
        "type": {"system": RESOURCE_TYPES_SYSTEM, "code": request.resource_type or "Resource"},
        "role": {"system": OBJECT_ROLE_SYSTEM, "code": "4", "display": "Domain Resource"},
    }
    if request.security_labels:
        data["securityLabel"] = [{"code": c} for c in sorted(request.security_labels)]

    details = [_detail("decision", decision.decision), _detail("basis", decision.basis.value)]
    details += [_detail("reason", r) for r in decision.reasons]
    if decision.provision_path:
        details.append(_detail("provision", decision.provision_path))
    if request.break_glass_reason:
        details.append(_detail("breakGlassReason", request.break_glass_reason))
    if identity_uncertain:
        details.append(_detail("identity", "identity-uncertain"))
        details += [_detail("candidatePerson", f"Patient/{p}") for p in candidate_persons]
    if reevaluation:
        details.append(_detail("reevaluation", reevaluation))
    if decision.consent_id:
        ref = f"Consent/{decision.consent_id}"
        if decision.consent_version:
            ref += f"/_history/{decision.consent_version}"
        decider: dict[str, Any] = {
            "what": {"reference": ref},
            "type": {"system": RESOURCE_TYPES_SYSTEM, "code": "Consent"},
            "role": {"system": OBJECT_ROLE_SYSTEM, "code": "13", "display": "Security Resource"},
        }
    else:
        decider = {
            "what": {"display": "HDX exchange consent policy"},
            "type": {"system": AUDIT_SYSTEM, "code": "policy", "display": "Exchange policy"},
            "role": {"system": OBJECT_ROLE_SYSTEM, "code": "13", "display": "Security Resource"},
        }
    decider["detail"] = details

    return {
        "resourceType": "AuditEvent",
        "id": audit_event_id(event_id, subscription, reevaluation),
        "type": {"system": AUDIT_SYSTEM, "code": "consent-decision", "display": "Consent decision"},
        "subtype": subtype,
        "action": "E",
        "recorded": fhir_instant(recorded),
        "outcome": "0" if decision.permit else "4",
        "outcomeDesc": "; ".join(decision.reasons)[:1000],
        "purposeOfEvent": [purpose],
        "agent": [
            {
                "type": {
                    "coding": [{"system": DCM_SYSTEM, "code": "110150", "display": "Application"}]
                },
                "who": _service(service),
                "requestor": False,
            },
            {
                "type": {
                    "coding": [
                        {
                            "system": PARTICIPATION_SYSTEM,
                            "code": "IRCP",
                            "display": "information recipient",
                        }
                    ]
                },
                "who": {"reference": request.recipient},
                "requestor": True,
                "purposeOfUse": [purpose],
            },
            {
                "type": {
                    "coding": [
                        {"system": PARTICIPATION_SYSTEM, "code": "CST", "display": "custodian"}
                    ]
                },
                "who": {"identifier": {"system": SOURCE_SYSTEM, "value": source or "unknown"}},
                "requestor": False,
            },
        ],
        "source": {
            "site": "hdx",
            "observer": _service(service),
            "type": [{"system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}],
        },
        "entity": [
            {
                "what": patient_ref,
                "type": {"system": ENTITY_TYPE_SYSTEM, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE_SYSTEM, "code": "1", "display": "Patient"},
            },
            data,
            {
                "what": {
                    "identifier": {"system": SUBSCRIPTION_SYSTEM, "value": subscription},
                    "type": "Subscription",
                },
                "type": {"system": RESOURCE_TYPES_SYSTEM, "code": "Subscription"},
                "role": {"system": OBJECT_ROLE_SYSTEM, "code": "23", "display": "Routing Criteria"},
                "detail": [_detail("subscriber", subscriber)],
            },
            decider,
        ],
    }
