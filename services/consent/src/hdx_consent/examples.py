"""Builders for FHIR R4 Consent JSON, for tests, docs and demos (plain dicts, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hdx_consent.domain.consent import ACT_CODE_SYSTEM, RESOURCE_TYPES_SYSTEM, SCOPE_SYSTEM

PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"
ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


def provision(
    type: str = "permit",
    *,
    actor: Sequence[str] = (),
    role: str = "PRCP",
    action: Sequence[str] = (),
    purpose: Sequence[str] = (),
    cls: Sequence[str] = (),
    code: Sequence[tuple[str, str]] = (),
    label: Sequence[str] = (),
    data: Sequence[str] = (),
    period: tuple[str | None, str | None] | None = None,
    provisions: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A Consent.provision; each keyword constrains one element (empty = unconstrained)."""
    p: dict[str, Any] = {"type": type}
    if period is not None:
        p["period"] = {k: v for k, v in zip(("start", "end"), period, strict=True) if v}
    if actor:
        p["actor"] = [
            {
                "role": {"coding": [{"system": ROLE_SYSTEM, "code": role}]},
                "reference": {"reference": a},
            }
            for a in actor
        ]
    if action:
        p["action"] = [{"coding": [{"system": ACTION_SYSTEM, "code": a}]} for a in action]
    if label:
        p["securityLabel"] = [
            {
                "system": CONFIDENTIALITY_SYSTEM
                if lab in ("R", "V", "N", "M", "L", "U")
                else ACT_CODE_SYSTEM,
                "code": lab,
            }
            for lab in label
        ]
    if purpose:
        p["purpose"] = [{"system": PURPOSE_SYSTEM, "code": c} for c in purpose]
    if cls:
        p["class"] = [{"system": RESOURCE_TYPES_SYSTEM, "code": c} for c in cls]
    if code:
        p["code"] = [{"coding": [{"system": s, "code": c}]} for s, c in code]
    if data:
        p["data"] = [{"meaning": "instance", "reference": {"reference": d}} for d in data]
    if provisions:
        p["provision"] = list(provisions)
    return p


def consent(
    prov: dict[str, Any] | None = None,
    *,
    patient: str | None = "Patient/p1",
    identifier: tuple[str, str] | None = None,
    status: str = "active",
    policy_rule: str | None = None,
    id: str | None = None,
    date_time: str = "2024-01-01T00:00:00Z",
) -> dict[str, Any]:
    """A patient-privacy Consent for `patient` (a reference) and/or `identifier`."""
    doc: dict[str, Any] = {
        "resourceType": "Consent",
        "status": status,
        "scope": {"coding": [{"system": SCOPE_SYSTEM, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "dateTime": date_time,
        "provision": prov if prov is not None else provision("permit"),
    }
    if id is not None:
        doc["id"] = id
    pat: dict[str, Any] = {}
    if patient is not None:
        pat["reference"] = patient
    if identifier is not None:
        pat["identifier"] = {"system": identifier[0], "value": identifier[1]}
    if pat:
        doc["patient"] = pat
    if policy_rule is not None:
        doc["policyRule"] = {"coding": [{"system": ACT_CODE_SYSTEM, "code": policy_rule}]}
    return doc
