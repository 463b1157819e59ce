"""The FHIR R4 AuditEvent the patient index records for every identity change a person
makes (link, unlink, merge, unmerge, a review resolved), on hdx.audit beside consent's.

Shape (after IHE Basic Audit Log Patterns, like consent's decisions):
- type ``urn:hdx:audit#identity-change``; subtype the action (``link``, ``unlink``,
  ``merge``, ``unmerge``, ``separate``, ``confirm``); action U (update); outcome 0;
- agents: the reviewer (requestor, ``urn:hdx:user|<id>``) and the patient index;
- entities: every person concerned (``Patient/<enterprise id>``, the first one is the
  person the operation was made on), every source record concerned (its source and local
  id), and the evidence (grade, weight, fields that agreed and did not) as details.

Ids only: never names, birth dates or national numbers. Its id is derived from the
operation id, so publishing it twice yields the same AuditEvent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hdx_patient_index.domain.identity import USER_SYSTEM, IdentityChange
from hdx_shared.envelope import derive_event_id

AUDIT_SYSTEM = "urn:hdx:audit"
SERVICE_SYSTEM = "urn:hdx:service"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"


def identity_audit_id(operation: str) -> str:
    return derive_event_id("identity-change", operation)


def _instant(ms: int) -> str:
    at = datetime.fromtimestamp(ms / 1000, UTC)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _detail(kind: str, value: str) -> dict[str, str]:
    return {"type": kind, "valueString": value}


def identity_audit_event(
    change: IdentityChange, recorded_ms: int, service: str = "patient-index"
) -> dict[str, Any]:
    me = {
        "identifier": {"system": SERVICE_SYSTEM, "value": service},
        "display": f"HDX {service} service",
    }
    ev = change.evidence
    details = [_detail("action", change.action.value), _detail("by", "manual")]
    if ev.grade:
        details.append(_detail("grade", ev.grade))
    if ev.weight is not None:
        details.append(_detail("weight", f"{ev.weight:.3f}"))
    details += [_detail("agreed", f) for f in ev.agreed]
    details += [_detail("disagreed", f) for f in ev.disagreed]
    if change.task:
        details.append(_detail("reviewTask", change.task))
    if change.merge:
        details.append(_detail("merge", change.merge))
    entities: list[dict[str, Any]] = [
        {
            "what": {"reference": f"Patient/{person}"},
            "type": {"system": ENTITY_TYPE_SYSTEM, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE_SYSTEM, "code": "1", "display": "Patient"},
            **({"detail": details} if i == 0 else {}),
        }
        for i, person in enumerate(change.persons)
    ]
    entities += [
        {
            "what": {
                "identifier": {"system": source, "value": local_id},
                "display": f"Patient/{local_id} at {source}",
            },
            "type": {"system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE_SYSTEM, "code": "4", "display": "Domain Resource"},
        }
        for source, local_id in change.records
    ]
    return {
        "resourceType": "AuditEvent",
        "id": identity_audit_id(change.operation),
        "type": {"system": AUDIT_SYSTEM, "code": "identity-change", "display": "Identity change"},
        "subtype": [{"system": AUDIT_SYSTEM, "code": change.action.value}],
        "action": "U",
        "recorded": _instant(recorded_ms),
        "outcome": "0",
        "outcomeDesc": f"{change.action.value} by {change.reviewer} (operation {change.operation})",
        "agent": [
            {
                "type": {"coding": [{"system": DCM_SYSTEM, "code": "110153", "display": "Source"}]},
                "who": {"identifier": {"system": USER_SYSTEM, "value": change.reviewer}},
                "requestor": True,
            },
            {
                "type": {
                    "coding": [{"system": DCM_SYSTEM, "code": "110150", "display": "Application"}]
                },
                "who": me,
                "requestor": False,
            },
        ],
        "source": {
            "site": "hdx",
            "observer": me,
            "type": [{"system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}],
        },
        "entity": entities,
    }
