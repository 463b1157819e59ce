"""The consent gate: the pipeline stage hdx.routed → hdx.decided (+ hdx.audit).

Input record (from the exchange router):
- value: the FHIR resource JSON (validated, enterprise id stamped) — passed on untouched;
- envelope headers: ce_id, ce_source, hdx_resource_type, hdx_person,
  hdx_person_identifiers, and hdx_candidates = JSON list of
  {"subscription", "subscriber", "recipient": "Organization/<id>", "purpose": "TREAT"}
  (optionally "breakGlassReason").

Output, per input record:
- one AuditEvent per candidate on hdx.audit, key = person id; headers = the envelope with
  ce_id = the AuditEvent id (uuid5(event id, subscription)), hdx_resource_type AuditEvent,
  hdx_subscription, hdx_subject_event = the decided event's id, without hdx_candidates;
- if any candidate is permitted: the same value bytes on hdx.decided, key = person id,
  headers = the envelope plus hdx_permitted = JSON list of the permitted candidates (as
  received). Nothing permitted → nothing on hdx.decided.
A record whose candidates or JSON cannot be read is dead-lettered; a consent store that is
not loaded or a database that does not answer raises Unavailable before anything in the
batch is decided (the batch waits: fail closed). The database is pinged before every batch
(HDX_GATE_DB_PROBE_SECONDS), not only by the service's periodic check.

Uncertain identity (headers from the patient index): with ``hdx_identity: uncertain`` and
``hdx_candidate_persons`` = JSON list of {"person", "identifiers": ["system|value", …]},
every candidate person's consents are applied too, each decided on its own: the subscription
is permitted only if the record's person *and every candidate* is permitted — deny wins. A
deny that only a candidate caused says so (reasons start with "identity-uncertain"; the
AuditEvent has subtype and detail ``identity-uncertain`` and names the candidate persons by
enterprise id). Candidates that cannot be read deny every subscription. The candidate list
(it holds other persons' identifiers) is never forwarded: not on hdx.decided, not in audit
headers.

Re-evaluation (``hdx_reevaluation: 1`` and ``hdx_resolution: <operation>``, an event the
patient index re-emits once a person resolved its identity): decided like any event; its
AuditEvents get ids derived from (event, subscription, resolution), so they are recorded
beside the first decision instead of being taken for its duplicates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from prometheus_client import Counter

from hdx_consent.audit import audit_event, audit_event_id
from hdx_consent.domain import (
    Consent,
    ConsentDecision,
    DecisionRequest,
    Policy,
    decide,
    normalize_reference,
)
from hdx_shared.envelope import Header
from hdx_shared.fhir import Issue, operation_outcome
from hdx_shared.messaging import Inbound, Outgoing, dead_letter
from hdx_shared.topics import Topics

DECISIONS = Counter(
    "hdx_consent_decisions",
    "Consent decisions, by outcome, basis and purpose",
    ["decision", "basis", "purpose"],
)

SUBJECT_EVENT = "hdx_subject_event"
SUBSCRIPTION = "hdx_subscription"
_CANDIDATE_KEYS = ("subscription", "subscriber", "recipient", "purpose")
# From the patient index (hdx_patient_index.domain.identity; services share no code).
IDENTITY = "hdx_identity"
CANDIDATE_PERSONS = "hdx_candidate_persons"
REEVALUATION = "hdx_reevaluation"
RESOLUTION = "hdx_resolution"
UNCERTAIN = "uncertain"
IDENTITY_UNCERTAIN = "identity-uncertain"


class ConsentSource(Protocol):
    """What the gate needs from the consent service (a fake in tests)."""

    policy: Policy

    async def ensure_ready(self) -> None:
        """Raise Unavailable unless consents can be decided now (index loaded, store up)."""
        ...

    def consents_for(self, person: str | None, identifiers: Sequence[str]) -> list[Consent]: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    subscription: str
    subscriber: str
    recipient: str
    purpose: str
    break_glass_reason: str | None
    raw: dict[str, Any]


class BadInput(ValueError):
    def __init__(self, reason: str, message: str, expression: str | None = None) -> None:
        self.reason, self.expression = reason, expression
        super().__init__(message)


def parse_candidates(raw: str | None) -> list[Candidate]:
    if raw is None:
        raise BadInput("no-candidates", f"header {Header.CANDIDATES} is missing")
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadInput("invalid-candidates", f"{Header.CANDIDATES} is not JSON: {exc}") from exc
    if not isinstance(items, list):
        raise BadInput("invalid-candidates", f"{Header.CANDIDATES} must be a JSON list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) and item[k] for k in _CANDIDATE_KEYS
        ):
            raise BadInput(
                "invalid-candidates",
                f"{Header.CANDIDATES}[{i}] needs non-empty strings {', '.join(_CANDIDATE_KEYS)}",
            )
        bg = item.get("breakGlassReason")
        out.append(
            Candidate(
                item["subscription"],
                item["subscriber"],
                normalize_reference(item["recipient"]),
                item["purpose"],
                bg if isinstance(bg, str) and bg.strip() else None,
                item,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class CandidatePerson:
    person: str | None
    identifiers: tuple[str, ...]


def parse_candidate_persons(raw: str | None) -> tuple[CandidatePerson, ...] | None:
    """The candidate persons of an uncertain identity; None when they cannot be read."""
    if not raw:
        return None
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(items, list) or not items:
        return None
    out: list[CandidatePerson] = []
    for item in items:
        if not isinstance(item, dict):
            return None
        person, idents = item.get("person"), item.get("identifiers", [])
        if person is not None and not (isinstance(person, str) and person):
            return None
        if not isinstance(idents, list) or not all(isinstance(i, str) for i in idents):
            return None
        if person is None and not idents:
            return None
        out.append(CandidatePerson(person, tuple(idents)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Uncertainty:
    """The other persons an uncertain record may be, with their consents."""

    persons: tuple[tuple[CandidatePerson, list[Consent]], ...]
    readable: bool = True

    @property
    def person_ids(self) -> tuple[str, ...]:
        return tuple(p.person for p, _ in self.persons if p.person)

    def apply(
        self, own: ConsentDecision, request: DecisionRequest, policy: Policy
    ) -> ConsentDecision:
        """Deny wins: the record's own decision stands only if every candidate is permitted."""
        if not self.readable:
            return ConsentDecision(
                False,
                (
                    f"{IDENTITY_UNCERTAIN}: the identity of this record is uncertain and the "
                    "candidate persons could not be read; denied (fail closed)",
                    *own.reasons,
                ),
                own.basis,
                own.consent_id,
                own.consent_version,
                own.provision_path,
            )
        denied: list[tuple[CandidatePerson, ConsentDecision]] = []
        for cand, consents in self.persons:
            theirs = decide(
                consents, policy, replace(request, person=cand.person, identifiers=cand.identifiers)
            )
            if not theirs.permit:
                denied.append((cand, theirs))
        n = len(self.persons)
        if not denied:
            return replace(
                own,
                reasons=(
                    *own.reasons,
                    f"{IDENTITY_UNCERTAIN}: the identity of this record is uncertain; "
                    f"the consents of all {n} other candidate person(s) permit too",
                ),
            )
        names = ", ".join(f"Patient/{c.person or '(identifiers only)'}" for c, _ in denied)
        if not own.permit:
            return replace(
                own,
                reasons=(
                    *own.reasons,
                    f"{IDENTITY_UNCERTAIN}: the identity of this record is uncertain; "
                    f"candidate person(s) {names} are denied as well",
                ),
            )
        cand, theirs = denied[0]
        return ConsentDecision(
            False,
            (
                f"{IDENTITY_UNCERTAIN}: the identity of this record is uncertain (a possible "
                f"match or a merge awaits review) and candidate person(s) {names} are denied; "
                f"deny wins. Patient/{cand.person or '(identifiers only)'}: "
                + "; ".join(theirs.reasons),
                *own.reasons,
            ),
            theirs.basis,
            theirs.consent_id,
            theirs.consent_version,
            theirs.provision_path,
            break_glass=theirs.break_glass,
        )


def resource_facts(doc: dict[str, Any]) -> tuple[frozenset[str], frozenset[str], str | None]:
    """Security label codes (meta.security), codes (code.coding as 'system|code' and 'code')
    and the resource's own id, from the parsed JSON."""
    labels: set[str] = set()
    meta = doc.get("meta")
    if isinstance(meta, dict):
        for c in meta.get("security") or ():
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                labels.add(c["code"])
    codes: set[str] = set()
    concept = doc.get("code")
    if isinstance(concept, dict):
        for c in concept.get("coding") or ():
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                codes.add(c["code"])
                if isinstance(c.get("system"), str):
                    codes.add(f"{c['system']}|{c['code']}")
    rid = doc.get("id")
    return frozenset(labels), frozenset(codes), rid if isinstance(rid, str) else None


class ConsentGate:
    def __init__(
        self,
        source: ConsentSource,
        topics: Topics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        service_name: str = "consent",
    ) -> None:
        self.source = source
        self.topics = topics
        self.clock = clock
        self.service_name = service_name

    async def handle(self, batch: Sequence[Inbound]) -> list[Outgoing]:
        """The stage handler: decide every candidate of every record in the batch."""
        await self.source.ensure_ready()
        now = self.clock()
        out: list[Outgoing] = []
        for message in batch:
            try:
                out.extend(self.decide_message(message, now))
            except BadInput as exc:
                out.append(
                    dead_letter(
                        self.topics,
                        message,
                        exc.reason,
                        operation_outcome([Issue(str(exc), expression=exc.expression)]),
                    )
                )
        return out

    def _uncertainty(
        self, extra: Mapping[str, str], person: str | None, identifiers: tuple[str, ...]
    ) -> Uncertainty | None:
        if extra.get(IDENTITY) != UNCERTAIN:
            return None
        parsed = parse_candidate_persons(extra.get(CANDIDATE_PERSONS))
        if parsed is None:
            return Uncertainty((), readable=False)
        others = [c for c in parsed if (c.person, c.identifiers) != (person, identifiers)]
        return Uncertainty(
            tuple(
                (c, self.source.consents_for(c.person, c.identifiers))
                for c in dict.fromkeys(others)
            )
        )

    def decide_message(self, m: Inbound, now: datetime) -> list[Outgoing]:
        env = m.envelope
        candidates = parse_candidates(env.extra.get(Header.CANDIDATES))
        if not candidates:
            return []
        try:
            doc = orjson.loads(m.value)
        except orjson.JSONDecodeError as exc:
            raise BadInput("invalid-json", f"the value is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise BadInput("invalid-json", "the value is not a JSON object")
        labels, codes, rid = resource_facts(doc)
        rtype = env.resource_type or str(doc.get("resourceType") or "")
        consents = self.source.consents_for(env.person, env.person_identifiers)
        policy = self.source.policy
        key = env.key_by_person()
        uncertainty = self._uncertainty(env.extra, env.person, env.person_identifiers)
        reevaluation = env.extra.get(RESOLUTION) if env.extra.get(REEVALUATION) else None
        # Audit records name the enterprise person, never the patient's identifiers.
        audit_env = env.without_extra(
            Header.CANDIDATES, Header.PERMITTED, CANDIDATE_PERSONS
        ).evolve(resource_type="AuditEvent", person_identifiers=(), patient_ref=None)
        out: list[Outgoing] = []
        permitted: list[dict[str, Any]] = []
        for cand in candidates:
            request = DecisionRequest(
                person=env.person,
                identifiers=env.person_identifiers,
                recipient=cand.recipient,
                purpose=cand.purpose,
                resource_type=rtype,
                at=now,
                security_labels=labels,
                break_glass_reason=cand.break_glass_reason,
                codes=codes,
                resource_ref=f"{rtype}/{rid}" if rid and rtype else None,
            )
            decision = decide(consents, policy, request)
            own_permit = decision.permit
            if uncertainty is not None:
                decision = uncertainty.apply(decision, request, policy)
            basis = (
                IDENTITY_UNCERTAIN if own_permit and not decision.permit else decision.basis.value
            )
            DECISIONS.labels(decision.decision, basis, cand.purpose).inc()
            if decision.permit:
                permitted.append(cand.raw)
            event = audit_event(
                decision=decision,
                request=request,
                event_id=env.event_id,
                subscription=cand.subscription,
                subscriber=cand.subscriber,
                source=env.source,
                recorded=now,
                service=self.service_name,
                identity_uncertain=uncertainty is not None,
                candidate_persons=uncertainty.person_ids if uncertainty else (),
                reevaluation=reevaluation,
            )
            headers = (
                audit_env.evolve(
                    event_id=audit_event_id(env.event_id, cand.subscription, reevaluation),
                )
                .with_extra(**{SUBJECT_EVENT: env.event_id, SUBSCRIPTION: cand.subscription})
                .to_headers()
            )
            out.append(Outgoing(self.topics.audit, orjson.dumps(event), key, headers))
        if permitted:
            # Other persons' identifiers stay here: the candidate list is not forwarded.
            headers = (
                env.without_extra(CANDIDATE_PERSONS)
                .with_extra(**{Header.PERMITTED: orjson.dumps(permitted).decode()})
                .to_headers()
            )
            out.append(Outgoing(self.topics.decided, m.value, key, headers))
        return out
