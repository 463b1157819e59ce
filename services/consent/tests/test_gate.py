"""The gate handler with fakes (no broker): what it emits for each input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from hdx_consent.audit import audit_event_id
from hdx_consent.domain import Consent, Policy, parse_consent
from hdx_consent.examples import consent, provision
from hdx_consent.gate import ConsentGate
from hdx_shared.envelope import Envelope, Header
from hdx_shared.fhir import validate_resource
from hdx_shared.messaging import Inbound, Outgoing, Unavailable
from hdx_shared.topics import Topics

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TOPICS = Topics("hdx.")
NHS = "https://fhir.nhs.uk/Id/nhs-number"


@dataclass
class FakeSource:
    consents: list[Consent] = field(default_factory=list)
    policy: Policy = field(default_factory=Policy)
    ready: str | None = None
    asked: list[tuple[str | None, tuple[str, ...]]] = field(default_factory=list)

    async def ensure_ready(self) -> None:
        if self.ready:
            raise Unavailable(self.ready)

    def consents_for(self, person: str | None, identifiers: Sequence[str]) -> list[Consent]:
        self.asked.append((person, tuple(identifiers)))
        return [
            c
            for c in self.consents
            if c.patient == person
            or (c.patient_identifier is not None and c.patient_identifier in identifiers)
        ]


def cand(sub: str, recipient: str, purpose: str = "TREAT", **extra: str) -> dict[str, str]:
    return {
        "subscription": sub,
        "subscriber": f"subscriber-{sub}",
        "recipient": recipient,
        "purpose": purpose,
        **extra,
    }


OBSERVATION = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "meta": {
        "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]
    },
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "subject": {"reference": "Patient/p1"},
}


def inbound(
    candidates: Any,
    *,
    value: bytes | None = None,
    person: str | None = "p1",
    offset: int = 0,
    identifiers: tuple[str, ...] = (f"{NHS}|9000000009",),
) -> Inbound:
    extra = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    if candidates is not None:
        extra[Header.CANDIDATES] = (
            candidates if isinstance(candidates, str) else orjson.dumps(candidates).decode()
        )
    env = Envelope(
        event_id=f"evt-{offset}",
        source="urn:hospital:a",
        resource_type="Observation",
        person=person,
        person_identifiers=identifiers,
        extra=extra,
    )
    return Inbound(
        TOPICS.routed,
        0,
        offset,
        (person or "").encode(),
        value if value is not None else orjson.dumps(OBSERVATION),
        env,
    )


def gate(source: FakeSource) -> ConsentGate:
    return ConsentGate(source, TOPICS, clock=lambda: NOW)


def by_topic(out: Sequence[Outgoing], topic: str) -> list[Outgoing]:
    return [o for o in out if o.topic == topic]


def audit(o: Outgoing) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(o.value)
    return doc


def detail(event: dict[str, Any], kind: str) -> list[str]:
    return [d["valueString"] for d in event["entity"][-1].get("detail", []) if d["type"] == kind]


async def test_permitted_and_denied_candidates() -> None:
    source = FakeSource(
        [
            parse_consent(
                consent(
                    provision(
                        "deny",
                        provisions=[provision("permit", actor=["Organization/gp"], label=["HIV"])],
                    )
                ),
                consent_id="c1",
                version=2,
            )
        ]
    )
    cands = [
        cand("s1", "Organization/gp"),
        cand("s2", "Organization/other"),
        cand("s3", "https://x.example/fhir/Organization/gp", "HRESCH"),
    ]
    message = inbound(cands)
    out = await gate(source).handle([message])

    audits = by_topic(out, TOPICS.audit)
    decided = by_topic(out, TOPICS.decided)
    assert len(audits) == 3 and len(decided) == 1
    assert source.asked == [("p1", (f"{NHS}|9000000009",))]

    d = decided[0]
    assert d.value == message.value  # the bytes as received, never re-serialised
    assert d.key == b"p1"
    # As received (the absolute recipient URL too), in candidate order.
    assert orjson.loads(d.headers[Header.PERMITTED]) == [cands[0], cands[2]]
    assert d.headers[Header.CANDIDATES] == message.envelope.extra[Header.CANDIDATES]
    assert d.headers[Header.ID] == "evt-0" and d.headers[Header.PERSON] == "p1"
    assert d.headers["traceparent"] == message.envelope.extra["traceparent"]

    permit, deny, research = (audit(a) for a in audits)
    for a, event in zip(audits, (permit, deny, research), strict=True):
        validate_resource(event)  # every AuditEvent is valid FHIR R4
        assert a.key == b"p1"
        assert a.headers[Header.ID] == event["id"]
        assert a.headers[Header.RESOURCE_TYPE] == "AuditEvent"
        assert a.headers["hdx_subject_event"] == "evt-0"
        assert Header.CANDIDATES not in a.headers
        assert a.headers["traceparent"] == message.envelope.extra["traceparent"]
    assert permit["id"] == audit_event_id("evt-0", "s1")
    assert (permit["outcome"], permit["subtype"][0]["code"]) == ("0", "permit")
    assert (deny["outcome"], deny["subtype"][0]["code"]) == ("4", "deny")
    assert permit["entity"][0]["what"] == {"reference": "Patient/p1"}
    assert permit["entity"][1]["what"]["identifier"]["value"] == "evt-0"
    assert permit["entity"][1]["type"]["code"] == "Observation"
    assert permit["entity"][-1]["what"] == {"reference": "Consent/c1/_history/2"}
    assert detail(permit, "provision") == ["provision.provision[0]"]
    assert detail(deny, "provision") == ["provision"]
    assert permit["agent"][1]["who"] == {"reference": "Organization/gp"}
    assert research["purposeOfEvent"][0]["coding"][0]["code"] == "HRESCH"
    # The GP's permit names no purpose: it covers research too (absolute URL normalised).
    assert research["outcome"] == "0"
    assert research["agent"][1]["who"] == {"reference": "Organization/gp"}
    assert permit["recorded"] == "2025-06-01T12:00:00.000Z"
    # The AuditEvent names the patient and the data by id only; no content is copied.
    assert "2345-7" not in orjson.dumps(permit).decode()


async def test_nothing_permitted_nothing_decided() -> None:
    source = FakeSource([parse_consent(consent(provision("deny")), consent_id="c1")])
    out = await gate(source).handle([inbound([cand("s1", "Organization/gp")])])
    assert [o.topic for o in out] == [TOPICS.audit]


async def test_redelivery_gives_the_same_audit_ids() -> None:
    g = gate(FakeSource())
    first = await g.handle([inbound([cand("s1", "Organization/gp")])])
    again = await g.handle([inbound([cand("s1", "Organization/gp")])])
    assert [audit(o)["id"] for o in by_topic(first, TOPICS.audit)] == [
        audit(o)["id"] for o in by_topic(again, TOPICS.audit)
    ]


async def test_sensitive_label_read_from_meta_security() -> None:
    # No consent: TREAT is permitted by default, but the Observation is labelled HIV.
    out = await gate(FakeSource()).handle([inbound([cand("s1", "Organization/gp")])])
    assert by_topic(out, TOPICS.decided) == []
    event = audit(out[0])
    assert detail(event, "basis") == ["sensitive-label"]
    assert event["entity"][1]["securityLabel"] == [{"code": "HIV"}]
    assert event["entity"][-1]["what"] == {"display": "HDX exchange consent policy"}


async def test_break_glass_is_flagged() -> None:
    source = FakeSource([parse_consent(consent(provision("deny")), consent_id="c1")])
    c = cand("s1", "Organization/ed", "ETREAT", breakGlassReason="unconscious, no ID")
    out = await gate(source).handle([inbound([c])])
    assert orjson.loads(by_topic(out, TOPICS.decided)[0].headers[Header.PERMITTED]) == [c]
    event = audit(by_topic(out, TOPICS.audit)[0])
    assert [s["code"] for s in event["subtype"]] == ["permit", "break-glass"]
    assert detail(event, "breakGlassReason") == ["unconscious, no ID"]


async def test_identifier_consents_apply() -> None:
    source = FakeSource(
        [
            parse_consent(
                consent(provision("deny"), patient=None, identifier=(NHS, "9000000009")),
                consent_id="c1",
            )
        ]
    )
    out = await gate(source).handle(
        [inbound([cand("s1", "Organization/gp")], value=b'{"resourceType":"Condition","id":"x"}')]
    )
    assert by_topic(out, TOPICS.decided) == []


async def test_without_a_person_id_identifiers_suffice() -> None:
    out = await gate(FakeSource()).handle(
        [
            inbound(
                [cand("s1", "Organization/gp")],
                person=None,
                value=b'{"resourceType":"Condition","id":"x"}',
            )
        ]
    )
    assert len(by_topic(out, TOPICS.decided)) == 1


async def test_without_any_patient_key_it_is_denied() -> None:
    out = await gate(FakeSource()).handle(
        [
            inbound(
                [cand("s1", "Organization/gp")],
                person=None,
                identifiers=(),
                value=b'{"resourceType":"Condition","id":"x"}',
            )
        ]
    )
    assert [o.topic for o in out] == [TOPICS.audit]
    event = audit(out[0])
    validate_resource(event)
    assert detail(event, "basis") == ["no-person"]


async def test_unavailable_fails_closed() -> None:
    with pytest.raises(Unavailable, match="not loaded"):
        await gate(FakeSource(ready="consent index not loaded yet")).handle(
            [inbound([cand("s1", "Organization/gp")])]
        )


@pytest.mark.parametrize(
    ("candidates", "value", "reason"),
    [
        (None, None, "no-candidates"),
        ("{not json", None, "invalid-candidates"),
        ({"subscription": "s1"}, None, "invalid-candidates"),
        ([{"subscription": "s1", "recipient": "Organization/gp"}], None, "invalid-candidates"),
        ([cand("s1", "Organization/gp")], b"\x00garbage", "invalid-json"),
    ],
)
async def test_unreadable_input_is_dead_lettered(
    candidates: Any, value: bytes | None, reason: str
) -> None:
    good = inbound([cand("s1", "Organization/gp")], value=b'{"resourceType":"Condition"}', offset=1)
    out = await gate(FakeSource()).handle([inbound(candidates, value=value), good])
    dead = by_topic(out, TOPICS.deadletter)
    assert [d.headers[Header.REASON] for d in dead] == [reason]
    assert dead[0].headers[Header.ORIGIN] == f"{TOPICS.routed}/0/0"
    assert len(by_topic(out, TOPICS.decided)) == 1  # the rest of the batch goes on


async def test_empty_candidate_list_is_nothing_to_do() -> None:
    assert await gate(FakeSource()).handle([inbound([])]) == []
