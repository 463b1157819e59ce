"""The gate when the patient index says a record's identity is uncertain: every candidate
person's consents apply and deny wins; re-evaluated events get audits of their own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from hdx_consent.audit import audit_event_id
from hdx_consent.domain import Consent, Policy, opt_out_register, parse_consent
from hdx_consent.examples import consent, provision
from hdx_consent.gate import ConsentGate, parse_candidate_persons
from hdx_shared.envelope import Envelope, Header
from hdx_shared.fhir import validate_resource
from hdx_shared.messaging import Inbound, Outgoing
from hdx_shared.topics import Topics

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TOPICS = Topics("hdx.")
NHS = "https://fhir.nhs.uk/Id/nhs-number"
TWIN_NHS, OTHER_NHS = f"{NHS}|9434765919", f"{NHS}|9434765870"
GP = "Organization/gp"


@dataclass
class FakeSource:
    consents: list[Consent] = field(default_factory=list)
    policy: Policy = field(default_factory=Policy)
    asked: list[tuple[str | None, tuple[str, ...]]] = field(default_factory=list)

    async def ensure_ready(self) -> None:
        return None

    def consents_for(self, person: str | None, identifiers: Sequence[str]) -> list[Consent]:
        self.asked.append((person, tuple(identifiers)))
        return [
            c
            for c in self.consents
            if c.patient == person
            or (c.patient_identifier is not None and c.patient_identifier in identifiers)
        ]


def deny_gp(patient: str | None = None, identifier: str | None = None, cid: str = "c1") -> Consent:
    ident: tuple[str, str] | None = None
    if identifier:
        system, _, value = identifier.partition("|")
        ident = (system, value)
    return parse_consent(
        consent(
            provision("deny", actor=[GP]),
            patient=f"Patient/{patient}" if patient else None,
            identifier=ident,
        ),
        consent_id=cid,
    )


def cand(sub: str = "s1", recipient: str = GP, purpose: str = "TREAT") -> dict[str, str]:
    return {
        "subscription": sub,
        "subscriber": f"subscriber-{sub}",
        "recipient": recipient,
        "purpose": purpose,
    }


OBSERVATION = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "subject": {"reference": "Patient/t1"},
}


def inbound(
    persons: Any,
    *,
    person: str = "twin",
    identifiers: tuple[str, ...] = (),
    candidates: list[dict[str, str]] | None = None,
    uncertain: bool = True,
    extra: dict[str, str] | None = None,
) -> Inbound:
    headers = {Header.CANDIDATES.value: orjson.dumps(candidates or [cand()]).decode()}
    if uncertain:
        headers["hdx_identity"] = "uncertain"
    if persons is not None:
        headers["hdx_candidate_persons"] = (
            persons if isinstance(persons, str) else orjson.dumps(persons).decode()
        )
    headers.update(extra or {})
    env = Envelope(
        event_id="evt-1",
        source="urn:hospital:a",
        resource_type="Observation",
        person=person,
        person_identifiers=identifiers,
        extra=headers,
    )
    return Inbound(TOPICS.routed, 0, 1, person.encode(), orjson.dumps(OBSERVATION), env)


def twin_and(*others: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"person": "twin", "identifiers": []}, *others]


ADA = {"person": "ada", "identifiers": [TWIN_NHS]}


async def decide(source: FakeSource, message: Inbound) -> tuple[list[Outgoing], list[Outgoing]]:
    out = await ConsentGate(source, TOPICS, clock=lambda: NOW).handle([message])
    return [o for o in out if o.topic == TOPICS.audit], [
        o for o in out if o.topic == TOPICS.decided
    ]


def details(event: dict[str, Any], kind: str) -> list[str]:
    return [d["valueString"] for d in event["entity"][-1].get("detail", []) if d["type"] == kind]


def subtypes(event: dict[str, Any]) -> list[str]:
    return [c["code"] for c in event["subtype"]]


@pytest.mark.parametrize(
    ("consents", "persons", "permitted", "why"),
    [
        # No one denies: the twin's data goes, and the audit says identity was uncertain.
        ([], twin_and(ADA), True, "all 1 other candidate person(s) permit"),
        # The possible match denies the GP (by NHS number): deny wins.
        ([deny_gp(identifier=TWIN_NHS)], twin_and(ADA), False, "Patient/ada"),
        # ... or by enterprise id.
        ([deny_gp(patient="ada")], twin_and(ADA), False, "Patient/ada"),
        # The record's own person denies: denied as without uncertainty, and it says so.
        ([deny_gp(patient="twin")], twin_and(ADA), False, "Consent/c1"),
        # Both deny.
        (
            [deny_gp(patient="twin"), deny_gp(patient="ada", cid="c2")],
            twin_and(ADA),
            False,
            "Patient/ada are denied as well",
        ),
        # The record's own person alone in the list: no other consents to apply.
        ([deny_gp(patient="ada")], twin_and(), True, "all 0 other candidate"),
        # Unreadable candidates: fail closed.
        ([], "not json", False, "could not be read"),
        ([], [{"person": 7}], False, "could not be read"),
        ([], None, False, "could not be read"),
        ([], [], False, "could not be read"),
    ],
)
async def test_every_candidate_persons_consents_apply_and_deny_wins(
    consents: list[Consent], persons: Any, permitted: bool, why: str
) -> None:
    audits, decided = await decide(FakeSource(consents), inbound(persons))
    [a] = audits
    event = orjson.loads(a.value)
    validate_resource(event)
    assert (event["outcome"] == "0") is permitted
    assert bool(decided) is permitted
    assert "identity-uncertain" in subtypes(event)
    assert details(event, "identity") == ["identity-uncertain"]
    reasons = " ".join(details(event, "reason"))
    assert "identity-uncertain" in reasons and why in reasons, reasons
    # Headers never carry the candidates' identifiers (nor any patient identifier).
    assert "hdx_candidate_persons" not in a.headers
    assert "9434765919" not in str(a.headers)
    for d in decided:
        assert "hdx_candidate_persons" not in d.headers
        assert d.headers["hdx_identity"] == "uncertain"


async def test_a_deny_only_the_candidate_caused_names_the_candidate_and_its_consent() -> None:
    source = FakeSource([deny_gp(patient="ada", cid="ada-consent")])
    audits, decided = await decide(source, inbound(twin_and(ADA)))
    assert decided == []
    event = orjson.loads(audits[0].value)
    assert event["entity"][0]["what"] == {"reference": "Patient/twin"}
    assert event["entity"][-1]["what"] == {"reference": "Consent/ada-consent"}
    assert details(event, "candidatePerson") == ["Patient/ada"]
    assert details(event, "reason")[0].startswith("identity-uncertain:")
    # Each candidate's consents were looked up with its own identifiers.
    assert ("ada", (TWIN_NHS,)) in source.asked and ("twin", ()) in source.asked


async def test_per_subscription_one_recipient_denied_by_the_candidate_the_other_not() -> None:
    source = FakeSource([deny_gp(patient="ada")])
    audits, decided = await decide(
        source,
        inbound(twin_and(ADA), candidates=[cand("s1"), cand("s2", "Organization/care-home")]),
    )
    assert [orjson.loads(a.value)["outcome"] for a in audits] == ["4", "0"]
    [d] = decided
    assert [c["subscription"] for c in orjson.loads(d.headers[Header.PERMITTED])] == ["s2"]


async def test_a_candidate_on_the_opt_out_register_blocks_secondary_use() -> None:
    policy = Policy(opt_out=opt_out_register([TWIN_NHS]))
    source = FakeSource(policy=policy)
    audits, decided = await decide(
        source, inbound(twin_and(ADA), candidates=[cand("s1", GP, "HRESCH"), cand("s2", GP)])
    )
    # Research is not direct care: Ada's opt-out applies to the twin's record too. TREAT
    # is not blocked by the register.
    assert [orjson.loads(a.value)["outcome"] for a in audits] == ["4", "0"]
    assert len(decided) == 1


async def test_after_a_merge_both_persons_identifiers_are_decided_separately() -> None:
    # The survivor carries both NHS numbers; the candidates are each person before it.
    persons = [
        {"person": "ada", "identifiers": [OTHER_NHS, TWIN_NHS]},
        {"person": "ada", "identifiers": [TWIN_NHS]},
        {"person": "grace", "identifiers": [OTHER_NHS]},
    ]
    source = FakeSource([deny_gp(identifier=OTHER_NHS)])
    message = inbound(persons, person="ada", identifiers=(OTHER_NHS, TWIN_NHS))
    audits, decided = await decide(source, message)
    assert decided == [] and orjson.loads(audits[0].value)["outcome"] == "4"


async def test_without_the_uncertain_flag_candidate_persons_are_ignored() -> None:
    source = FakeSource([deny_gp(patient="ada")])
    audits, decided = await decide(source, inbound(twin_and(ADA), uncertain=False))
    event = orjson.loads(audits[0].value)
    assert event["outcome"] == "0" and "identity-uncertain" not in subtypes(event)
    assert len(decided) == 1


async def test_a_reevaluation_is_audited_beside_the_first_decision() -> None:
    reeval = {"hdx_reevaluation": "1", "hdx_resolution": "op-1"}
    first, _ = await decide(FakeSource([deny_gp(patient="ada")]), inbound(twin_and(ADA)))
    again, decided = await decide(FakeSource(), inbound(None, uncertain=False, extra=reeval))
    before, after = orjson.loads(first[0].value), orjson.loads(again[0].value)
    assert before["id"] == audit_event_id("evt-1", "s1")
    assert after["id"] == audit_event_id("evt-1", "s1", "op-1") != before["id"]
    assert again[0].headers[Header.ID.value] == after["id"]
    assert "reevaluation" in subtypes(after) and details(after, "reevaluation") == ["op-1"]
    assert after["outcome"] == "0" and len(decided) == 1
    # The original event id travels on: the exchange numbers (subscription, event) once.
    assert decided[0].headers[Header.ID.value] == "evt-1"
    # Redelivered, the re-evaluation has the same id again.
    twice, _ = await decide(FakeSource(), inbound(None, uncertain=False, extra=reeval))
    assert orjson.loads(twice[0].value)["id"] == after["id"]


def test_candidate_persons_parsing() -> None:
    assert parse_candidate_persons(orjson.dumps(twin_and(ADA)).decode()) is not None
    assert parse_candidate_persons('[{"identifiers": ["s|v"]}]') is not None
    for bad in ("", "{}", "[]", "[1]", '[{"person": ""}]', '[{"identifiers": "x"}]', "[{}]"):
        assert parse_candidate_persons(bad) is None, bad
