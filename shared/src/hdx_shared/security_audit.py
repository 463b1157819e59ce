"""The FHIR R4 AuditEvent a service records when a caller tries what it may not: a request
without a valid token (401), one its token does not allow (403), a token request that is
refused, a publisher claiming another source (a pure builder).

After IHE Basic Audit Log Patterns' security alert: type DICOM 110113 "Security Alert",
subtype urn:hdx:audit#<what was tried>, action E, outcome 8 (serious failure: refused);
the agent is the client (requestor, with its client id if it proved one, and its network
address), or for a Kafka record whoever wrote the topic; the observer the service; the
entities what it claimed (e.g. the source it tried to publish as) and the request it made.
No patient data: neither the body nor the patient it was about.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from hdx_shared.fhir import FHIR_JSON
from hdx_shared.messaging import Outgoing
from hdx_shared.topics import Topics

AUDIT_SYSTEM = "urn:hdx:audit"
CLIENT_SYSTEM = "urn:hdx:client"
SERVICE_SYSTEM = "urn:hdx:service"
SOURCE_SYSTEM = "urn:hdx:source"
KAFKA_TOPIC_SYSTEM = "urn:hdx:kafka-topic"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"


def security_alert(
    *,
    what: str,
    description: str,
    observer: str,
    client_id: str | None = None,
    client_address: str | None = None,
    claimed_source: str | None = None,
    bound_source: str | None = None,
    kafka_topic: str | None = None,
    request: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """An AuditEvent for a refused attempt (`what`: e.g. "publish-as-other-source") seen by
    the service `observer` ("exchange", "consent", "patient-index").

    The agent is the HTTP client (`client_id`, None if it proved no identity), or for a
    Kafka record whoever wrote `kafka_topic`: Kafka tells a consumer the topic, not the
    writer's principal. `request` is what was asked, e.g. "GET /fhir/Consent" (no query)."""
    now = now or datetime.now(UTC)
    if client_id is not None:
        who: dict[str, Any] = {"identifier": {"system": CLIENT_SYSTEM, "value": client_id}}
    elif kafka_topic is not None:
        who = {
            "identifier": {"system": KAFKA_TOPIC_SYSTEM, "value": kafka_topic},
            "display": "the Kafka principal that wrote this topic",
        }
    else:
        who = {"display": "a caller that proved no identity"}
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM_SYSTEM, "code": "110153", "display": "Source Role ID"}]},
        "who": who,
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
    if request is not None:
        entities.append(
            {
                "what": {"display": request},
                "type": {"system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object"},
                "description": "the request that was refused",
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
                "identifier": {"system": SERVICE_SYSTEM, "value": observer},
                "display": f"HDX {observer} service",
            },
            "type": [{"system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}],
        },
        **({"entity": entities} if entities else {}),
    }


def security_alert_record(topics: Topics, alert: dict[str, Any]) -> Outgoing:
    """The alert as a record on the audit topic (keyed "security": alerts are about no
    patient, so they share one partition and stay in order)."""
    return Outgoing(topics.audit, orjson.dumps(alert), b"security", {"content-type": FHIR_JSON})
