"""The consent model HDX decides with, parsed from FHIR R4 Consent JSON.

Parsing checks what HDX relies on beyond FHIR's own structure rules (patient-privacy scope,
a patient, a provision type on every provision, only constraints HDX can evaluate), and
compiles each provision into frozensets so a decision is a handful of set look-ups.

How a consent's provisions are read (FHIR R4 §Consent "provision"):
- the root provision is the consent's base rule; its period is the consent's validity;
- a nested provision is an exception that applies only inside its parent's scope, so its
  constraints add to its ancestors' (its *path*);
- a constraint element that is absent does not constrain (applies to every value);
- ``policyRule`` is kept but not interpreted: only provisions decide. (Reading OPTIN as
  "permit whatever no provision covers" would widen a consent that permits one purpose to
  every purpose; where no provision applies, the exchange policy's default holds instead.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from hdx_consent.domain.timeutil import fhir_interval

SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
RESOURCE_TYPES_SYSTEM = "http://hl7.org/fhir/resource-types"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
# The provision elements that narrow where a provision applies; its specificity counts them.
DIMENSIONS = ("actor", "action", "purpose", "class", "code", "securityLabel", "data")


class ProvisionType(StrEnum):
    PERMIT = "permit"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong with a Consent, and where (a FHIRPath-like expression)."""

    message: str
    expression: str | None = None
    code: str = "invalid"  # http://hl7.org/fhir/issue-type


class ConsentInvalid(ValueError):
    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(p.message for p in self.problems))


def normalize_reference(ref: str) -> str:
    """'https://x/fhir/Organization/1', 'Organization/1/_history/2' → 'Organization/1'."""
    parts = [p for p in ref.split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return "/".join(parts[-2:]) if len(parts) >= 2 else ref


def person_key(person: str) -> str:
    """The index key of an enterprise person id ('123' or 'Patient/123')."""
    return "p:" + person.removeprefix("Patient/")


def identifier_key(identifier: str) -> str:
    """The index key of a trusted identifier 'system|value'."""
    return "i:" + identifier


@dataclass(frozen=True, slots=True)
class Period:
    """[start, end) in UTC; None means open."""

    start: datetime | None = None
    end: datetime | None = None

    def covers(self, at: datetime) -> bool:
        return (self.start is None or self.start <= at) and (self.end is None or at < self.end)


@dataclass(frozen=True, slots=True)
class Actor:
    """provision.actor: who the provision is about, by reference, identifier or role.

    An actor whose reference names nobody (only a type or display) stands for whoever acts
    in its role: it matches a recipient that asserts that role (and has that type).
    """

    role: frozenset[str]
    reference: str | None = None  # normalised 'Organization/1'
    identifier: str | None = None  # 'system|value'
    type: str | None = None

    def matches(
        self, recipient: str, recipient_identifiers: frozenset[str], recipient_roles: frozenset[str]
    ) -> bool:
        if self.reference is not None:
            return self.reference == recipient
        if self.identifier is not None:
            return self.identifier in recipient_identifiers
        if self.type is not None and not recipient.startswith(self.type + "/"):
            return False
        return not self.role.isdisjoint(recipient_roles)

    def describe(self) -> str:
        return self.reference or self.identifier or ("role " + ",".join(sorted(self.role)))


@dataclass(frozen=True, slots=True)
class Provision:
    """One provision, compiled. Empty sets mean "not constrained"."""

    type: ProvisionType
    path: str  # 'provision', 'provision.provision[1]', ...
    depth: int
    period: Period | None = None
    actors: tuple[Actor, ...] = ()
    actions: frozenset[str] = frozenset()
    purposes: frozenset[str] = frozenset()
    classes: frozenset[str] = frozenset()  # resource types
    codes: frozenset[str] = frozenset()  # 'system|code', or 'code' when no system
    security_labels: frozenset[str] = frozenset()
    data: frozenset[str] = frozenset()  # 'Type/id'
    provisions: tuple[Provision, ...] = ()
    # Derived from the path root → here.
    specificity: tuple[int, int] = (0, 0)  # (distinct dimensions constrained, depth)
    named_labels: frozenset[str] = frozenset()  # securityLabels named on the path

    @property
    def constrained(self) -> tuple[str, ...]:
        present = (
            bool(self.actors),
            bool(self.actions),
            bool(self.purposes),
            bool(self.classes),
            bool(self.codes),
            bool(self.security_labels),
            bool(self.data),
        )
        return tuple(d for d, p in zip(DIMENSIONS, present, strict=True) if p)

    def walk(self) -> Iterator[Provision]:
        yield self
        for child in self.provisions:
            yield from child.walk()

    def describe(self) -> str:
        parts: list[str] = []
        if self.actors:
            parts.append("actor " + ", ".join(a.describe() for a in self.actors))
        for label, values in (
            ("action", self.actions),
            ("purpose", self.purposes),
            ("class", self.classes),
            ("code", self.codes),
            ("securityLabel", self.security_labels),
            ("data", self.data),
        ):
            if values:
                parts.append(f"{label} {', '.join(sorted(values))}")
        scope = "; ".join(parts) if parts else "everything"
        return f"{self.type.value} {scope}"


@dataclass(frozen=True, slots=True)
class Consent:
    """A FHIR Consent as HDX decides with it."""

    id: str
    version: int
    status: str
    patient: str | None  # enterprise person id, from patient.reference 'Patient/<id>'
    patient_identifier: str | None  # 'system|value', from patient.identifier
    provision: Provision
    date_time: str | None = None
    policy_rule: str | None = None  # informational (see the module doc)
    provisions: tuple[Provision, ...] = field(default=(), repr=False)  # walk order

    @property
    def index_keys(self) -> tuple[str, ...]:
        keys = []
        if self.patient:
            keys.append(person_key(self.patient))
        if self.patient_identifier:
            keys.append(identifier_key(self.patient_identifier))
        return tuple(keys)

    @property
    def patient_key(self) -> str:
        """How the store files it: 'Patient/<id>' or 'system|value'."""
        if self.patient:
            return f"Patient/{self.patient}"
        return self.patient_identifier or ""

    def in_force(self, at: datetime) -> bool:
        """Active, and inside the root provision's period: only then does it apply."""
        return self.status == "active" and (
            self.provision.period is None or self.provision.period.covers(at)
        )


# ---- parsing -----------------------------------------------------------------------------


class _Parser:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def fail(self, message: str, expression: str, code: str = "invalid") -> None:
        self.problems.append(Problem(message, expression, code))

    def codings(self, value: Any, where: str) -> list[Mapping[str, Any]]:
        if not isinstance(value, list):
            return []
        return [c for c in value if isinstance(c, Mapping)]

    def concept_codes(self, concepts: Any, where: str, with_system: bool = False) -> set[str]:
        out: set[str] = set()
        for i, concept in enumerate(concepts if isinstance(concepts, list) else []):
            codings = self.codings(
                concept.get("coding") if isinstance(concept, Mapping) else None, f"{where}[{i}]"
            )
            if not codings:
                self.fail(
                    "needs a coding with a code (text alone cannot be evaluated)",
                    f"{where}[{i}]",
                    "required",
                )
            for c in codings:
                out.add(self.coding_key(c, f"{where}[{i}].coding", with_system))
        return out

    def coding_key(self, c: Mapping[str, Any], where: str, with_system: bool) -> str:
        code = c.get("code")
        if not isinstance(code, str) or not code:
            self.fail("a coding HDX evaluates needs a code", where, "required")
            return ""
        system = c.get("system")
        return f"{system}|{code}" if with_system and isinstance(system, str) else code

    def period(self, value: Any, where: str) -> Period | None:
        if not isinstance(value, Mapping):
            return None
        try:
            start = fhir_interval(value["start"])[0] if "start" in value else None
            end = fhir_interval(value["end"])[1] if "end" in value else None
        except (ValueError, TypeError) as exc:
            self.fail(f"period: {exc}", where)
            return None
        if start and end and end <= start:
            self.fail("period ends before it starts", where)
        return Period(start, end)

    def actor(self, value: Any, where: str) -> Actor | None:
        if not isinstance(value, Mapping):
            return None
        role = value.get("role")
        roles = self.concept_codes([role] if role is not None else [], f"{where}.role")
        ref = value.get("reference")
        if not isinstance(ref, Mapping):
            self.fail("actor.reference is required", f"{where}.reference", "required")
            return None
        literal = ref.get("reference")
        ident = ref.get("identifier")
        rtype = ref.get("type") if isinstance(ref.get("type"), str) else None
        if isinstance(literal, str):
            norm = normalize_reference(literal)
            if "/" not in norm or literal.startswith("#"):
                self.fail(
                    f"actor reference '{literal}' must be a literal reference like "
                    "Organization/<id>",
                    f"{where}.reference.reference",
                )
                return None
            return Actor(frozenset(roles), reference=norm)
        if isinstance(ident, Mapping):
            system, val = ident.get("system"), ident.get("value")
            if not isinstance(system, str) or not isinstance(val, str):
                self.fail(
                    "actor identifier needs a system and a value",
                    f"{where}.reference.identifier",
                    "required",
                )
                return None
            return Actor(frozenset(roles), identifier=f"{system}|{val}", type=rtype)
        if not roles:
            self.fail(
                "an actor without a reference or identifier must have a role code",
                f"{where}.role",
                "required",
            )
            return None
        return Actor(frozenset(roles), type=rtype)

    def classes(self, value: Any, where: str) -> set[str]:
        out: set[str] = set()
        for i, c in enumerate(self.codings(value, where)):
            system = c.get("system")
            code = c.get("code")
            if system not in (None, RESOURCE_TYPES_SYSTEM):
                self.fail(
                    f"class system '{system}' is not supported; HDX evaluates resource "
                    f"types ({RESOURCE_TYPES_SYSTEM})",
                    f"{where}[{i}].system",
                    "not-supported",
                )
            elif not isinstance(code, str) or not code[:1].isupper():
                self.fail("class code must be a FHIR resource type", f"{where}[{i}].code")
            else:
                out.add(code)
        return out

    def data(self, value: Any, where: str) -> set[str]:
        out: set[str] = set()
        for i, d in enumerate(value if isinstance(value, list) else []):
            if not isinstance(d, Mapping):
                continue
            if d.get("meaning") != "instance":
                self.fail(
                    f"data.meaning '{d.get('meaning')}' is not supported; HDX evaluates 'instance'",
                    f"{where}[{i}].meaning",
                    "not-supported",
                )
            ref = d.get("reference")
            literal = ref.get("reference") if isinstance(ref, Mapping) else None
            if not isinstance(literal, str) or "/" not in literal:
                self.fail(
                    "data.reference must be a literal reference like Observation/<id>",
                    f"{where}[{i}].reference",
                    "required",
                )
            else:
                out.add(normalize_reference(literal))
        return out

    def provision(
        self,
        value: Any,
        where: str,
        depth: int,
        parent_dims: frozenset[str],
        parent_labels: frozenset[str],
    ) -> Provision:
        ptype = value.get("type")
        if ptype not in ("permit", "deny"):
            self.fail(
                f"provision.type must be 'permit' or 'deny' (got {ptype!r})",
                f"{where}.type",
                "required" if ptype is None else "code-invalid",
            )
            ptype = "deny"
        if "dataPeriod" in value:
            self.fail(
                "provision.dataPeriod is not supported by HDX",
                f"{where}.dataPeriod",
                "not-supported",
            )
        actors = tuple(
            a
            for i, v in enumerate(value.get("actor") or [])
            if (a := self.actor(v, f"{where}.actor[{i}]")) is not None
        )
        labels = frozenset(
            self.coding_key(c, f"{where}.securityLabel[{i}]", False)
            for i, c in enumerate(self.codings(value.get("securityLabel"), where))
        )
        purposes = frozenset(
            self.coding_key(c, f"{where}.purpose[{i}]", False)
            for i, c in enumerate(self.codings(value.get("purpose"), where))
        )
        built = Provision(
            type=ProvisionType(ptype),
            path=where,
            depth=depth,
            period=self.period(value.get("period"), f"{where}.period"),
            actors=actors,
            actions=frozenset(self.concept_codes(value.get("action"), f"{where}.action")),
            purposes=purposes,
            classes=frozenset(self.classes(value.get("class"), f"{where}.class")),
            codes=frozenset(self.concept_codes(value.get("code"), f"{where}.code", True)),
            security_labels=labels,
            data=frozenset(self.data(value.get("data"), f"{where}.data")),
        )
        dims = parent_dims | frozenset(built.constrained)
        named = parent_labels | labels
        children = tuple(
            self.provision(child, f"{where}.provision[{i}]", depth + 1, dims, named)
            for i, child in enumerate(value.get("provision") or [])
            if isinstance(child, Mapping)
        )
        return Provision(
            type=built.type,
            path=built.path,
            depth=depth,
            period=built.period,
            actors=built.actors,
            actions=built.actions,
            purposes=built.purposes,
            classes=built.classes,
            codes=built.codes,
            security_labels=built.security_labels,
            data=built.data,
            provisions=children,
            specificity=(len(dims), depth),
            named_labels=named,
        )


def _version(doc: Mapping[str, Any]) -> int:
    meta = doc.get("meta")
    vid = meta.get("versionId") if isinstance(meta, Mapping) else None
    return int(vid) if isinstance(vid, str) and vid.isascii() and vid.isdigit() else 0


def parse_consent(
    doc: Mapping[str, Any], *, consent_id: str | None = None, version: int | None = None
) -> Consent:
    """A FHIR R4 Consent (already structurally valid) as HDX's model; ConsentInvalid if HDX
    cannot evaluate it. `consent_id`/`version` override the document's id and meta.versionId.
    """
    p = _Parser()
    if doc.get("resourceType") != "Consent":
        raise ConsentInvalid([Problem("resourceType must be Consent", "resourceType")])
    status = doc.get("status")
    if not isinstance(status, str):
        p.fail("status is required", "status", "required")
        status = ""
    scope = doc.get("scope")
    scopes = {
        c.get("code")
        for c in p.codings(scope.get("coding") if isinstance(scope, Mapping) else None, "scope")
    }
    if "patient-privacy" not in scopes:
        p.fail(
            f"scope must be patient-privacy ({SCOPE_SYSTEM}); HDX decides privacy consents only",
            "scope",
            "required" if not scopes else "not-supported",
        )

    person = identifier = None
    patient = doc.get("patient")
    if not isinstance(patient, Mapping):
        p.fail(
            "patient is required: a reference Patient/<enterprise id> or an identifier "
            "(system and value)",
            "patient",
            "required",
        )
    else:
        literal = patient.get("reference")
        ident = patient.get("identifier")
        if isinstance(literal, str):
            norm = normalize_reference(literal)
            if not norm.startswith("Patient/") or norm == "Patient/":
                p.fail(
                    f"patient.reference '{literal}' must be Patient/<enterprise id>",
                    "patient.reference",
                )
            else:
                person = norm.removeprefix("Patient/")
        if isinstance(ident, Mapping):
            system, val = ident.get("system"), ident.get("value")
            if isinstance(system, str) and isinstance(val, str):
                identifier = f"{system}|{val}"
            else:
                p.fail(
                    "patient.identifier needs a system and a value",
                    "patient.identifier",
                    "required",
                )
        if person is None and identifier is None and not p.problems:
            p.fail("patient needs a reference Patient/<id> or an identifier", "patient", "required")

    policy_rule = None
    rule = doc.get("policyRule")
    if isinstance(rule, Mapping):
        codes = [c.get("code") for c in p.codings(rule.get("coding"), "policyRule")]
        policy_rule = next((c for c in codes if isinstance(c, str)), None)

    root_doc = doc.get("provision")
    if not isinstance(root_doc, Mapping):
        p.fail("provision is required, with type permit or deny", "provision", "required")
        root_doc = {"type": "deny"}
    root = p.provision(root_doc, "provision", 0, frozenset(), frozenset())
    if p.problems:
        raise ConsentInvalid(p.problems)
    cid = consent_id if consent_id is not None else doc.get("id")
    date_time = doc.get("dateTime")
    return Consent(
        id=cid if isinstance(cid, str) else "",
        version=version if version is not None else _version(doc),
        status=status,
        patient=person,
        patient_identifier=identifier,
        provision=root,
        date_time=date_time if isinstance(date_time, str) else None,
        policy_rule=policy_rule,
        provisions=tuple(root.walk()),
    )
