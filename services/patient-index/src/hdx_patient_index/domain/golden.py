"""The golden record: one FHIR Patient for a person, built from its linked source records.

Survivorship is simple and explainable: the demographics (name, gender, birth date, address,
telecom, deceased) come from the most recently updated source record; identifiers are the
union of all records' (trusted ones first, normalised), led by the person identifier; each
source record appears as a ``link`` (type seealso) identified by source and local id.

After a merge the survivor keeps its id and the same rules run over the union of both
persons' records: the most recently updated record's demographics win whichever person it
came from, every identifier of both is kept, and a ``link`` of type ``replaces`` names each
person merged into it. The merged person keeps a tombstone: ``active: false``, its own id
and one ``link`` of type ``replaced-by`` to the survivor. An unmerge rebuilds both from
their own records again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hdx_patient_index.domain.identifiers import PERSON_SYSTEM, Identifier, TrustedSystems
from hdx_patient_index.domain.stamping import person_identifier

SNAPSHOT_ELEMENTS = (
    "identifier",
    "active",
    "name",
    "telecom",
    "gender",
    "birthDate",
    "deceasedBoolean",
    "deceasedDateTime",
    "address",
)
DEMOGRAPHIC_ELEMENTS = SNAPSHOT_ELEMENTS[2:]


def snapshot(patient: Mapping[str, Any]) -> dict[str, Any]:
    """The elements of a Patient the golden record may draw on (not HDX's own identifier)."""
    snap = {k: patient[k] for k in SNAPSHOT_ELEMENTS if k in patient}
    if "identifier" in snap:
        idents = [
            i
            for i in snap["identifier"]
            if isinstance(i, dict) and i.get("system") != PERSON_SYSTEM
        ]
        if idents:
            snap["identifier"] = idents
        else:
            del snap["identifier"]
    return snap


@dataclass(frozen=True, slots=True)
class LinkedRecord:
    source: str
    local_id: str
    updated_ms: int
    snapshot: Mapping[str, Any]


def tombstone(person_id: str, replaced_by: str) -> dict[str, Any]:
    """A merged person: inactive, pointing at the person it was merged into."""
    return {
        "resourceType": "Patient",
        "id": person_id,
        "identifier": [person_identifier(person_id)],
        "active": False,
        "link": [
            {
                "other": {
                    "reference": f"Patient/{replaced_by}",
                    "identifier": person_identifier(replaced_by),
                },
                "type": "replaced-by",
            }
        ],
    }


def golden_patient(
    person_id: str,
    records: Sequence[LinkedRecord],
    trusted: TrustedSystems,
    replaces: Sequence[str] = (),
) -> dict[str, Any]:
    """The person as one FHIR Patient (without ``meta``); ``replaces``: persons merged
    into it."""
    patient: dict[str, Any] = {"resourceType": "Patient", "id": person_id}
    seen: set[Identifier] = set()
    trusted_ids: list[dict[str, Any]] = []
    other_ids: list[dict[str, Any]] = []
    for rec in records:
        for ident in rec.snapshot.get("identifier", ()):
            system, value = ident.get("system", ""), ident.get("value")
            if not isinstance(value, str):
                continue
            normalised = Identifier(system, trusted.normalise(system, value))
            if normalised in seen:
                continue
            seen.add(normalised)
            if trusted.valid(normalised):
                trusted_ids.append({**ident, "value": normalised.value})
            else:
                other_ids.append(ident)
    patient["identifier"] = [person_identifier(person_id), *trusted_ids, *other_ids]
    patient["active"] = True
    if records:
        latest = max(enumerate(records), key=lambda ir: (ir[1].updated_ms, ir[0]))[1]
        for element in DEMOGRAPHIC_ELEMENTS:
            if element in latest.snapshot:
                patient[element] = latest.snapshot[element]
        patient["link"] = [
            {
                "other": {
                    "identifier": {"system": r.source, "value": r.local_id},
                    "display": f"Patient/{r.local_id} at {r.source}",
                },
                "type": "seealso",
            }
            for r in sorted(records, key=lambda r: (r.source, r.local_id))
        ]
    if replaces:
        patient["link"] = [
            {
                "other": {"reference": f"Patient/{p}", "identifier": person_identifier(p)},
                "type": "replaces",
            }
            for p in sorted(replaces)
        ] + patient.get("link", [])
    return patient
