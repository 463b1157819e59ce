"""Small FHIR Patient builders and identifiers the patient-index tests share."""

from __future__ import annotations

import itertools
from typing import Any

import orjson

from hdx_patient_index.domain.demographics import Demographics, extract_demographics
from hdx_patient_index.domain.identifiers import NHS_NUMBER, TrustedSystems
from hdx_shared.envelope import ChangeType, Envelope
from hdx_shared.messaging import Inbound
from hdx_shared.topics import Topics

# Valid NHS numbers (modulus 11) for tests.
NHS_A = "9434765919"
NHS_B = "9434765870"
NHS_C = "4010232137"


def patient(
    local_id: str = "p1",
    *,
    family: str | None = "Lovelace",
    given: str | list[str] | None = "Ada",
    birth_date: str | None = "1815-12-10",
    gender: str | None = "female",
    postcode: str | None = None,
    phone: str | None = None,
    nhs: str | None = None,
    identifiers: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {"resourceType": "Patient", "id": local_id}
    idents = list(identifiers or [])
    if nhs:
        idents.insert(0, {"system": NHS_NUMBER, "value": nhs})
    if idents:
        doc["identifier"] = idents
    name: dict[str, Any] = {}
    if family:
        name["family"] = family
    if given:
        name["given"] = [given] if isinstance(given, str) else given
    if name:
        doc["name"] = [{"use": "official", **name}]
    if birth_date:
        doc["birthDate"] = birth_date
    if gender:
        doc["gender"] = gender
    if postcode:
        doc["address"] = [{"use": "home", "postalCode": postcode}]
    if phone:
        doc["telecom"] = [{"system": "phone", "value": phone}]
    return doc


def demo(**kwargs: Any) -> Demographics:
    return extract_demographics(patient(**kwargs), TrustedSystems())


ST_MARYS = "urn:hdx:org:st-marys"
RIVERSIDE = "urn:hdx:org:riverside"


def observation(local_id: str, patient_id: str, element: str = "subject") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": local_id,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        element: {"reference": f"Patient/{patient_id}", "display": "the patient"},
        "valueQuantity": {"value": 5.4, "unit": "mmol/L"},
    }


TOPICS = Topics()
_offsets = itertools.count()


def msg(
    resource: dict[str, Any],
    source: str = ST_MARYS,
    *,
    event_id: str | None = None,
    offset: int | None = None,
    change: ChangeType = ChangeType.UPDATE,
) -> Inbound:
    offset = next(_offsets) if offset is None else offset
    ref = (
        resource.get("id")
        if resource["resourceType"] == "Patient"
        else str(
            resource.get("subject", resource.get("patient", {})).get("reference", "")
        ).removeprefix("Patient/")
        or None
    )
    env = Envelope(
        event_id=event_id or f"ev-{offset}",
        source=source,
        change=change,
        resource_type=resource["resourceType"],
        patient_ref=ref,
        extra={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    return Inbound(
        topic=TOPICS.validated,
        partition=0,
        offset=offset,
        key=f"{source}|{ref}".encode(),
        value=orjson.dumps(resource),
        envelope=env,
    )
