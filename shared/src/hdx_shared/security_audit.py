"""The FHIR R4 AuditEvent the exchange records when an authenticated client tries to do
what it is not bound to (a pure builder).

After IHE Basic Audit Log Patterns' security alert: type DICOM 110113 "Security Alert",
subtype urn:hdx:audit#<what was tried>, action E, outcome 8 (serious failure: refused);
the agent is the client (requestor, with its client id and network address), the observer
the exchange, the entity what it claimed (e.g. the source it tried to publish as). No
patient data: neither the body nor the patient it was about.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

AUDIT_SYSTEM = "urn:hdx:audit"
CLIENT_SYSTEM = "urn:hdx:client"
SERVICE_SYSTEM = "urn:hdx:service"
SOURCE_SYSTEM = "urn:hdx:source"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"


def security_alert(
    *,
    what: str,
    description: str,
    client_id: str,
    client_address: str | None,
    claimed_source: str | None,
    bound_source: str | None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """An AuditEvent for a refused attempt (`what`: e.g. "publish-as-other-source")."""
    now = now or datetime.now(UTC)
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM_SYSTEM, "code": "110153", "display": "Source Role ID"}]},
        "who": {"identifier": {"system": CLIENT_SYSTEM, "value": client_id}},
        "requestor": True,
    }
    if client_address:
        agent["network"] = {"address": client_address, "type": "2"}
    entities: list[dict[str, Any]] = []
    if claimed_source is not None:
        entities.append(
            {
                "what": {"identifier": {"system": SOURCE_SYSTEM, "value": claimed_source}},
                "type": {"system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object"},
                "description": "the publisher source the client claimed",
            }
        )
    if bound_source is not None:
        entities.append(
            {
                "what": {"identifier": {"system": SOURCE_SYSTEM, "value": bound_source}},
                "type": {"system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object"},
                "description": "the publisher source the client is bound to",
            }
        )
    return {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "type": {"system": DCM_SYSTEM, "code": "110113", "display": "Security Alert"},
        "subtype": [{"system": AUDIT_SYSTEM, "code": what}],
        "action": "E",
        "recorded": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "outcome": "8",
        "outcomeDesc": description,
        "agent": [agent],
        "source": {
            "observer": {
                "identifier": {"system": SERVICE_SYSTEM, "value": "exchange"},
                "display": "HDX exchange service",
            },
            "type": [{"system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}],
        },
        **({"entity": entities} if entities else {}),
    }
