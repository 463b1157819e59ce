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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from prometheus_client import Counter

from hdx_consent.audit import audit_event, audit_event_id
from hdx_consent.domain import Consent, DecisionRequest, Policy, decide, normalize_reference
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
        # Audit records name the enterprise person, never the patient's identifiers.
        audit_env = env.without_extra(Header.CANDIDATES, Header.PERMITTED).evolve(
            resource_type="AuditEvent", person_identifiers=(), patient_ref=None
        )
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
            DECISIONS.labels(decision.decision, decision.basis.value, cand.purpose).inc()
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
            )
            headers = (
                audit_env.evolve(
                    event_id=audit_event_id(env.event_id, cand.subscription),
                )
                .with_extra(**{SUBJECT_EVENT: env.event_id, SUBSCRIPTION: cand.subscription})
                .to_headers()
            )
            out.append(Outgoing(self.topics.audit, orjson.dumps(event), key, headers))
        if permitted:
            headers = env.with_extra(
                **{Header.PERMITTED: orjson.dumps(permitted).decode()}
            ).to_headers()
            out.append(Outgoing(self.topics.decided, m.value, key, headers))
        return out
