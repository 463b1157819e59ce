"""Stamping the enterprise person id on FHIR resources (parsed JSON dicts, changed in place)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hdx_patient_index.domain.identifiers import PERSON_SYSTEM

# Elements that hold a Reference to the patient a resource is about (FHIR R4).
PATIENT_ELEMENTS = ("subject", "patient", "beneficiary")


def person_identifier(person_id: str) -> dict[str, str]:
    return {"system": PERSON_SYSTEM, "value": person_id}


def stamp_patient(patient: dict[str, Any], person_id: str) -> None:
    """Append the person identifier to a Patient (replacing one it already carries)."""
    kept = [
        i
        for i in patient.get("identifier", ())
        if not (isinstance(i, dict) and i.get("system") == PERSON_SYSTEM)
    ]
    patient["identifier"] = [*kept, person_identifier(person_id)]


def local_patient_id(reference: object) -> str | None:
    """'Patient/123', 'https://host/fhir/Patient/123' or '…/Patient/123/_history/2' → '123'."""
    if not isinstance(reference, str):
        return None
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


def _references(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for element in PATIENT_ELEMENTS:
        ref = resource.get(element)
        if isinstance(ref, dict):
            yield ref
    # Appointment.participant.actor
    participants = resource.get("participant")
    for participant in participants if isinstance(participants, list) else ():
        if isinstance(participant, dict) and isinstance(participant.get("actor"), dict):
            yield participant["actor"]


def find_patient_reference(
    resource: dict[str, Any], local_id: str | None = None
) -> dict[str, Any] | None:
    """The Reference object pointing at the patient (at ``local_id`` when given)."""
    for ref in _references(resource):
        rid = local_patient_id(ref.get("reference"))
        if rid is not None and (local_id is None or rid == local_id):
            return ref
    return None


def stamp_reference(reference: dict[str, Any], person_id: str) -> None:
    """Add the person identifier to a patient Reference; its literal reference stays."""
    reference["identifier"] = person_identifier(person_id)


def stamp(resource: dict[str, Any], local_id: str, person_id: str) -> bool:
    """Stamp the person on a Patient (its identifier) or on a resource's reference to the
    Patient ``local_id``; False if the resource has no such reference."""
    if resource.get("resourceType") == "Patient":
        stamp_patient(resource, person_id)
        return True
    ref = find_patient_reference(resource, local_id)
    if ref is None:
        return False
    stamp_reference(ref, person_id)
    return True
