"""Identity uncertainty and identity changes, as the patient index tells the rest of HDX.

**Uncertain identity.** A person is *uncertain* while a review task about it is open (a
possible match, an ambiguous match, a trusted-identifier conflict, an update that now
matches another person, a merge not yet reviewed) — whichever side of the task it is on.
Every event the patient index emits for an uncertain person carries two headers:

- ``hdx_identity: uncertain``
- ``hdx_candidate_persons``: JSON list of ``{"person": <enterprise id>, "identifiers":
  ["system|value", …]}`` — the person itself first, then every person it may also be
  (after a merge: the survivor and the merged person, each with its identifiers from before
  the merge).

The consent gate applies the consents of every candidate person and denies if any denies.

**Identity changes** (link, unlink, merge, unmerge, a review resolved either way) reach
subscribers as a FHIR ``Patient`` for each person concerned (routed like any Patient):
its identifiers, a ``link`` per source record it now consists of (``seealso``) and per
merge in force (``replaces`` / ``replaced-by``), and the extension
``IDENTITY_CHANGE_EXTENSION`` saying what changed: the action, who decided (manual), the
match grade and weight of the evidence, which fields agreed and which did not, the source
records and the other persons concerned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from hdx_patient_index.domain.identifiers import PERSON_SYSTEM
from hdx_patient_index.domain.stamping import person_identifier

# Headers (plain strings: the consent service reads the same names; services share no code).
IDENTITY_HEADER = "hdx_identity"  # "uncertain" (absent when the identity is certain)
CANDIDATE_PERSONS_HEADER = "hdx_candidate_persons"  # JSON, see the module doc
REEVALUATION_HEADER = "hdx_reevaluation"  # "1" on an event re-emitted after a resolution
RESOLUTION_HEADER = "hdx_resolution"  # the operation whose resolution re-emitted it
IDENTITY_CHANGE_HEADER = "hdx_identity_change"  # on identity events: the action
IDENTITY_HEADERS = (
    IDENTITY_HEADER,
    CANDIDATE_PERSONS_HEADER,
    REEVALUATION_HEADER,
    RESOLUTION_HEADER,
    IDENTITY_CHANGE_HEADER,
)
UNCERTAIN = "uncertain"

# Review-task reasons the operations add to the matcher's (domain/matching.ReviewReason).
MERGE_REVIEW = "merge-review"  # a merge waits for a second look; both persons' consents apply
JOINED_DURING_MERGE = "joined-during-merge"  # after an unmerge: a record that arrived meanwhile

PATIENT_INDEX_SOURCE = "urn:hdx:patient-index"  # ce_source of what the index itself emits
MERGE_SOURCE = "urn:hdx:merge"  # the ``source`` of a merge-review task (local id: merge id)
USER_SYSTEM = "urn:hdx:user"
IDENTITY_CHANGE_EXTENSION = "https://hdx.example.org/fhir/StructureDefinition/identity-change"

NOT_EVIDENCE = frozenset({"disagree", "missing"})


@dataclass(frozen=True, slots=True)
class CandidatePerson:
    person: str
    identifiers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"person": self.person, "identifiers": list(self.identifiers)}


@dataclass(frozen=True, slots=True)
class IdentityState:
    """What the index knows about a person's identity right now."""

    person: str
    reasons: tuple[str, ...] = ()  # the open review tasks' reasons; empty when certain
    candidates: tuple[CandidatePerson, ...] = ()  # the person itself first
    merges: tuple[str, ...] = ()  # merges in force that this person survives

    @property
    def uncertain(self) -> bool:
        return bool(self.reasons)

    def headers(self) -> dict[str, str]:
        if not self.uncertain:
            return {}
        return {
            IDENTITY_HEADER: UNCERTAIN,
            CANDIDATE_PERSONS_HEADER: candidates_json(self.candidates),
        }


def candidates_json(candidates: Iterable[CandidatePerson]) -> str:
    return orjson.dumps([c.to_json() for c in candidates]).decode()


def unique_candidates(candidates: Iterable[CandidatePerson]) -> tuple[CandidatePerson, ...]:
    """In order, each (person, identifiers) once."""
    return tuple(dict.fromkeys(candidates))


class Action(StrEnum):
    LINK = "link"  # a source record joined a person by hand (or a review said "same")
    UNLINK = "unlink"  # a source record left its person for a new one of its own
    MERGE = "merge"
    UNMERGE = "unmerge"
    SEPARATE = "separate"  # a review said "different person": a sticky no-link
    CONFIRM = "confirm"  # a review confirmed a merge


@dataclass(frozen=True, slots=True)
class Evidence:
    """Why the matcher thought two records might be one person."""

    grade: str | None = None  # certain | probable | possible | certainly-not
    weight: float | None = None
    levels: Mapping[str, str] = field(default_factory=dict)  # field → agreement level

    @property
    def agreed(self) -> tuple[str, ...]:
        return tuple(f for f, lv in sorted(self.levels.items()) if lv not in NOT_EVIDENCE)

    @property
    def disagreed(self) -> tuple[str, ...]:
        return tuple(f for f, lv in sorted(self.levels.items()) if lv == "disagree")


@dataclass(frozen=True, slots=True)
class IdentityChange:
    """One operation a person made on the index."""

    operation: str  # its id
    action: Action
    reviewer: str
    records: tuple[tuple[str, str], ...] = ()  # (source, local id) of the records concerned
    persons: tuple[str, ...] = ()  # every person concerned
    evidence: Evidence = field(default_factory=Evidence)
    task: str | None = None  # the review task it resolved, if any
    merge: str | None = None  # the merge it made or undid, if any


def _person_ref(person: str) -> dict[str, Any]:
    return {"identifier": person_identifier(person), "display": f"Patient/{person}"}


def change_extension(change: IdentityChange, person: str) -> dict[str, Any]:
    """The identity-change extension for one person's identity event."""
    ext: list[dict[str, Any]] = [
        {"url": "action", "valueCode": change.action.value},
        {"url": "by", "valueCode": "manual"},
        {"url": "operation", "valueString": change.operation},
    ]
    ev = change.evidence
    if ev.grade:
        ext.append({"url": "grade", "valueCode": ev.grade})
    if ev.weight is not None:
        ext.append({"url": "weight", "valueDecimal": round(ev.weight, 3)})
    ext += [{"url": "agreed", "valueString": f} for f in ev.agreed]
    ext += [{"url": "disagreed", "valueString": f} for f in ev.disagreed]
    ext += [
        {"url": "record", "valueIdentifier": {"system": source, "value": local_id}}
        for source, local_id in change.records
    ]
    ext += [
        {"url": "other", "valueReference": _person_ref(p)} for p in change.persons if p != person
    ]
    return {"url": IDENTITY_CHANGE_EXTENSION, "extension": ext}


def identity_patient(
    person: str,
    identifiers: Sequence[str],
    records: Sequence[tuple[str, str]],
    change: IdentityChange,
    *,
    active: bool = True,
    replaces: Sequence[str] = (),
    replaced_by: str | None = None,
) -> dict[str, Any]:
    """The FHIR Patient that tells subscribers what happened to one person's identity.

    It carries identifiers only (the enterprise id and the person's trusted identifiers),
    never names or birth dates: the subscriber has those from the source Patients.
    """
    idents: list[dict[str, str]] = [person_identifier(person)]
    for token in identifiers:
        system, _, value = token.partition("|")
        if system != PERSON_SYSTEM and value:
            idents.append({"system": system, "value": value})
    links: list[dict[str, Any]] = [
        {"other": _person_ref(p), "type": "replaces"} for p in sorted(replaces)
    ]
    if replaced_by:
        links.append({"other": _person_ref(replaced_by), "type": "replaced-by"})
    links += [
        {
            "other": {
                "identifier": {"system": source, "value": local_id},
                "display": f"Patient/{local_id} at {source}",
            },
            "type": "seealso",
        }
        for source, local_id in sorted(records)
    ]
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": person,
        "meta": {"tag": [{"system": "urn:hdx:identity", "code": change.action.value}]},
        "extension": [change_extension(change, person)],
        "identifier": idents,
        "active": active,
    }
    if links:
        patient["link"] = links
    return patient
