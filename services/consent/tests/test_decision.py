"""The decision function, table by table: defaults, precedence, validity, opt-out,
sensitivity and break-glass. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from hdx_consent.domain import (
    Basis,
    ConsentDecision,
    ConsentIndex,
    DecisionRequest,
    Policy,
    decide,
    opt_out_register,
    parse_consent,
)
from hdx_consent.examples import consent, provision

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
GP = "Organization/gp"
OTHER = "Organization/other"
NHS = "https://fhir.nhs.uk/Id/nhs-number"


def request(**changes: Any) -> DecisionRequest:
    base = DecisionRequest(
        person="p1", recipient=GP, purpose="TREAT", resource_type="Observation", at=NOW
    )
    return replace(base, **changes)


@dataclass
class Case:
    name: str
    consents: list[dict[str, Any]]
    req: dict[str, Any]
    permit: bool
    basis: Basis
    path: str | None = None  # provision path that decided, with the consent id 'c<index>'
    policy: dict[str, Any] = field(default_factory=dict)
    break_glass: bool = False


def run(case: Case) -> ConsentDecision:
    consents = [
        parse_consent(doc, consent_id=f"c{i}", version=1) for i, doc in enumerate(case.consents)
    ]
    return decide(consents, Policy(**case.policy), request(**case.req))


def check(case: Case) -> None:
    d = run(case)
    assert (d.permit, d.basis) == (case.permit, case.basis), d.reasons
    assert d.break_glass is case.break_glass
    assert d.reasons and all(isinstance(r, str) and r for r in d.reasons)
    if case.path is not None:
        assert f"{d.consent_id}:{d.provision_path}" == case.path, d.reasons


DENY_ALL = provision("deny")
PERMIT_ALL = provision("permit")

DEFAULTS = [
    Case("direct care is permitted by default", [], {}, True, Basis.POLICY_DEFAULT),
    Case(
        "emergency care is permitted by default",
        [],
        {"purpose": "ETREAT"},
        True,
        Basis.POLICY_DEFAULT,
    ),
    *[
        Case(f"{p} is denied without an opt-in", [], {"purpose": p}, False, Basis.POLICY_DEFAULT)
        for p in ("HRESCH", "HPAYMT", "HOPERAT", "PUBHLTH")
    ],
    Case(
        "configured default",
        [],
        {"purpose": "HOPERAT"},
        True,
        Basis.POLICY_DEFAULT,
        policy={"default_permit_purposes": frozenset({"TREAT", "HOPERAT"})},
    ),
    Case(
        "research opt-in",
        [provision("permit", purpose=["HRESCH"])],
        {"purpose": "HRESCH"},
        True,
        Basis.CONSENT,
        "c0:provision",
    ),
    Case(
        "research opt-in does not cover payment",
        [provision("permit", purpose=["HRESCH"])],
        {"purpose": "HPAYMT"},
        False,
        Basis.POLICY_DEFAULT,
    ),
    Case("no person, no identifiers", [], {"person": None}, False, Basis.NO_PERSON),
]

PRECEDENCE = [
    Case("deny all", [DENY_ALL], {}, False, Basis.CONSENT, "c0:provision"),
    Case(
        "deny all but the GP: GP",
        [provision("deny", provisions=[provision("permit", actor=[GP])])],
        {},
        True,
        Basis.CONSENT,
        "c0:provision.provision[0]",
    ),
    Case(
        "deny all but the GP: another organisation",
        [provision("deny", provisions=[provision("permit", actor=[GP])])],
        {"recipient": OTHER},
        False,
        Basis.CONSENT,
        "c0:provision",
    ),
    Case(
        "actor matched through an absolute reference",
        [provision("deny", actor=["https://hdx.example/fhir/Organization/gp"])],
        {},
        False,
        Basis.CONSENT,
        "c0:provision",
    ),
    Case(
        "permit all but observations: observation",
        [provision("permit", provisions=[provision("deny", cls=["Observation"])])],
        {},
        False,
        Basis.CONSENT,
        "c0:provision.provision[0]",
    ),
    Case(
        "permit all but observations: condition",
        [provision("permit", provisions=[provision("deny", cls=["Observation"])])],
        {"resource_type": "Condition"},
        True,
        Basis.CONSENT,
        "c0:provision",
    ),
    Case(
        "a nested provision applies only inside its parent's scope",
        [
            provision(
                "permit", purpose=["HRESCH"], provisions=[provision("deny", cls=["Observation"])]
            )
        ],
        {"purpose": "TREAT"},
        True,
        Basis.POLICY_DEFAULT,
    ),
    Case(
        "equal specificity across consents: deny wins",
        [provision("permit", actor=[GP]), provision("deny", actor=[GP])],
        {},
        False,
        Basis.CONSENT,
        "c1:provision",
    ),
    Case(
        "equal specificity among siblings: deny wins",
        [
            provision(
                "permit",
                provisions=[
                    provision("permit", purpose=["TREAT"]),
                    provision("deny", cls=["Observation"]),
                ],
            )
        ],
        {},
        False,
        Basis.CONSENT,
        "c0:provision.provision[1]",
    ),
    Case(
        "more dimensions win over deny",
        [provision("deny", actor=[GP]), provision("permit", actor=[GP], purpose=["TREAT"])],
        {},
        True,
        Basis.CONSENT,
        "c1:provision",
    ),
    Case(
        "more dimensions win over permit",
        [provision("permit", actor=[GP]), provision("deny", actor=[GP], cls=["Observation"])],
        {},
        False,
        Basis.CONSENT,
        "c1:provision",
    ),
    Case(
        "deeper wins at equal dimensions",
        [
            provision(
                "permit",
                cls=["Observation", "Condition"],
                provisions=[provision("deny", cls=["Observation"])],
            )
        ],
        {},
        False,
        Basis.CONSENT,
        "c0:provision.provision[0]",
    ),
    Case(
        "deeper permit beats a shallower deny on the same dimensions",
        [
            provision(
                "deny",
                cls=["Observation", "Condition"],
                provisions=[provision("permit", cls=["Observation"])],
            )
        ],
        {},
        True,
        Basis.CONSENT,
        "c0:provision.provision[0]",
    ),
    Case(
        "a nested provision inherits its parent's dimensions; depth then decides",
        [
            provision("deny", actor=[GP], provisions=[provision("permit", purpose=["TREAT"])]),
            provision("deny", actor=[GP], purpose=["TREAT"]),
        ],
        {},
        True,
        Basis.CONSENT,
        "c0:provision.provision[0]",
    ),
    Case(
        "code constraint: matching code",
        [provision("deny", code=[("http://loinc.org", "2345-7")])],
        {"codes": frozenset({"http://loinc.org|2345-7", "2345-7"})},
        False,
        Basis.CONSENT,
    ),
    Case(
        "code constraint: other code",
        [provision("deny", code=[("http://loinc.org", "2345-7")])],
        {"codes": frozenset({"http://loinc.org|1-8"})},
        True,
        Basis.POLICY_DEFAULT,
    ),
    Case(
        "data constraint: that instance",
        [provision("deny", data=["Observation/o1"])],
        {"resource_ref": "Observation/o1"},
        False,
        Basis.CONSENT,
    ),
    Case(
        "data constraint: another instance",
        [provision("deny", data=["Observation/o1"])],
        {"resource_ref": "Observation/o2"},
        True,
        Basis.POLICY_DEFAULT,
    ),
    Case(
        "action not part of an exchange",
        [provision("deny", action=["collect"])],
        {},
        True,
        Basis.POLICY_DEFAULT,
    ),
    Case(
        "action part of an exchange",
        [provision("deny", action=["disclose"])],
        {},
        False,
        Basis.CONSENT,
    ),
    # policyRule is not a base rule: it never widens (or narrows) what provisions say.
    Case(
        "policyRule OPTIN with a research permit: payment is still denied",
        [provision("permit", purpose=["HRESCH"])],
        {"purpose": "HPAYMT"},
        False,
        Basis.POLICY_DEFAULT,
    ),
    Case(
        "policyRule OPTIN with a denied organisation: that recipient",
        [provision("deny", actor=[OTHER])],
        {"recipient": OTHER},
        False,
        Basis.CONSENT,
        "c0:provision",
    ),
    Case(
        "policyRule OPTOUT denying one organisation: another recipient",
        [provision("deny", actor=[OTHER])],
        {},
        True,
        Basis.POLICY_DEFAULT,
    ),
]
# The policyRule cases need the rule on the consent itself.
_RULES = {"policyRule OPTIN": "OPTIN", "policyRule OPTOUT": "OPTOUT"}

VALIDITY = [
    Case(f"status {status} never applies", [DENY_ALL], {}, True, Basis.POLICY_DEFAULT)
    for status in ("inactive", "draft", "proposed", "rejected", "entered-in-error")
] + [
    Case(
        "expired",
        [provision("deny", period=("2020-01-01", "2024-12-31"))],
        {},
        True,
        Basis.POLICY_DEFAULT,
    ),
    Case(
        "not yet in force",
        [provision("deny", period=("2026-01-01", None))],
        {},
        True,
        Basis.POLICY_DEFAULT,
    ),
    Case("in force", [provision("deny", period=("2025", "2025"))], {}, False, Basis.CONSENT),
    Case(
        "end date covers its whole day",
        [provision("deny", period=(None, "2025-06-01"))],
        {},
        False,
        Basis.CONSENT,
    ),
    Case(
        "nested provision outside its period",
        [
            provision(
                "deny",
                provisions=[provision("permit", actor=[GP], period=("2025-01-01", "2025-03-01"))],
            )
        ],
        {},
        False,
        Basis.CONSENT,
        "c0:provision",
    ),
]
_STATUSES = ["inactive", "draft", "proposed", "rejected", "entered-in-error"]

SENSITIVE = [
    Case(
        "sensitive label without consent",
        [],
        {"security_labels": frozenset({"HIV"})},
        False,
        Basis.SENSITIVE,
    ),
    Case(
        "restricted confidentiality",
        [],
        {"security_labels": frozenset({"R"})},
        False,
        Basis.SENSITIVE,
    ),
    Case(
        "a label that is not sensitive",
        [],
        {"security_labels": frozenset({"N"})},
        True,
        Basis.POLICY_DEFAULT,
    ),
    Case(
        "sensitive label named by the permit",
        [provision("permit", actor=[GP], label=["HIV"])],
        {"security_labels": frozenset({"HIV"})},
        True,
        Basis.CONSENT,
        "c0:provision",
    ),
    Case(
        "label named by an ancestor of the permit",
        [provision("deny", label=["HIV"], provisions=[provision("permit", actor=[GP])])],
        {"security_labels": frozenset({"HIV"})},
        True,
        Basis.CONSENT,
        "c0:provision.provision[0]",
    ),
    Case(
        "one of two sensitive labels named",
        [provision("permit", actor=[GP], label=["HIV"])],
        {"security_labels": frozenset({"HIV", "PSY"})},
        False,
        Basis.SENSITIVE,
        "c0:provision",
    ),
    Case(
        "a permit that does not name the label",
        [provision("permit", actor=[GP])],
        {"security_labels": frozenset({"PSY"})},
        False,
        Basis.SENSITIVE,
    ),
    Case(
        "a deny naming a label applies to labelled data only: labelled",
        [provision("deny", label=["PSY"])],
        {"security_labels": frozenset({"PSY"})},
        False,
        Basis.CONSENT,
    ),
    Case(
        "a deny naming a label applies to labelled data only: unlabelled",
        [provision("deny", label=["PSY"])],
        {},
        True,
        Basis.POLICY_DEFAULT,
    ),
    Case(
        "configured sensitive labels",
        [],
        {"security_labels": frozenset({"HIV"})},
        True,
        Basis.POLICY_DEFAULT,
        policy={"sensitive_labels": frozenset({"PSY"})},
    ),
]

BREAK_GLASS = [
    Case(
        "break-glass overrides a deny",
        [DENY_ALL],
        {"purpose": "ETREAT", "break_glass_reason": "unconscious in A&E"},
        True,
        Basis.BREAK_GLASS,
        "c0:provision",
        break_glass=True,
    ),
    Case(
        "break-glass overrides sensitivity",
        [],
        {
            "purpose": "ETREAT",
            "break_glass_reason": "overdose",
            "security_labels": frozenset({"PSY"}),
        },
        True,
        Basis.BREAK_GLASS,
        break_glass=True,
    ),
    Case(
        "ETREAT without a reason is no break-glass",
        [DENY_ALL],
        {"purpose": "ETREAT"},
        False,
        Basis.CONSENT,
    ),
    Case(
        "a reason with TREAT is no break-glass",
        [DENY_ALL],
        {"break_glass_reason": "hurry"},
        False,
        Basis.CONSENT,
    ),
    Case(
        "break-glass not allowed by policy",
        [DENY_ALL],
        {"purpose": "ETREAT", "break_glass_reason": "x"},
        False,
        Basis.CONSENT,
        policy={"break_glass_allowed": False},
    ),
    Case(
        "break-glass not needed is not flagged",
        [],
        {"purpose": "ETREAT", "break_glass_reason": "x"},
        True,
        Basis.POLICY_DEFAULT,
    ),
]

OPT_OUT = [
    Case(
        "opted out: research despite an opt-in",
        [provision("permit", purpose=["HRESCH"])],
        {"purpose": "HRESCH"},
        False,
        Basis.OPT_OUT,
        policy={"opt_out": opt_out_register(["p1"])},
    ),
    Case(
        "opted out: direct care still permitted",
        [],
        {},
        True,
        Basis.POLICY_DEFAULT,
        policy={"opt_out": opt_out_register(["Patient/p1"])},
    ),
    Case(
        "opted out by identifier",
        [],
        {"purpose": "PUBHLTH", "identifiers": (f"{NHS}|9",)},
        False,
        Basis.OPT_OUT,
        policy={"opt_out": opt_out_register([f"{NHS}|9  # note"])},
    ),
    Case(
        "someone else opted out",
        [provision("permit", purpose=["HRESCH"])],
        {"purpose": "HRESCH"},
        True,
        Basis.CONSENT,
        policy={"opt_out": opt_out_register(["# header", "p2"])},
    ),
]


def _with_rules(case: Case) -> Case:
    for prefix, rule in _RULES.items():
        if case.name.startswith(prefix):
            docs = [consent(p, policy_rule=rule) for p in case.consents]
            return replace(case, consents=docs)
    return replace(case, consents=[consent(p) for p in case.consents])


def _with_status(case: Case) -> Case:
    if case.name.startswith("status "):
        status = case.name.split()[1]
        assert status in _STATUSES
        return replace(case, consents=[consent(p, status=status) for p in case.consents])
    return replace(case, consents=[consent(p) for p in case.consents])


@pytest.mark.parametrize(
    "case", [_with_rules(c) for c in DEFAULTS + PRECEDENCE], ids=lambda c: c.name
)
def test_defaults_and_precedence(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("case", [_with_status(c) for c in VALIDITY], ids=lambda c: c.name)
def test_validity(case: Case) -> None:
    check(case)


@pytest.mark.parametrize(
    "case", [_with_rules(c) for c in SENSITIVE + BREAK_GLASS + OPT_OUT], ids=lambda c: c.name
)
def test_sensitivity_break_glass_and_opt_out(case: Case) -> None:
    check(case)


def test_break_glass_reasons_keep_the_overridden_deny() -> None:
    d = run(
        Case(
            "",
            [consent(DENY_ALL)],
            {"purpose": "ETREAT", "break_glass_reason": "unconscious"},
            True,
            Basis.BREAK_GLASS,
        )
    )
    assert d.permit and d.break_glass and d.decision == "permit"
    assert "c0 provision" in d.reasons[0].replace("Consent/", "")
    assert "unconscious" in d.reasons[-1]


def test_consent_filed_under_an_identifier() -> None:
    c = parse_consent(consent(DENY_ALL, patient=None, identifier=(NHS, "9"), id="c9"))
    assert decide([c], Policy(), request(person=None, identifiers=(f"{NHS}|9",))).permit is False
    index = ConsentIndex()
    index.put(c)
    assert index.for_person("p1", (f"{NHS}|9",)) == [c]
    assert index.for_person("p1", (f"{NHS}|8",)) == []


def test_role_actor_matches_a_recipient_acting_in_that_role() -> None:
    doc = consent(
        provision(
            "deny",
            provisions=[
                {
                    "type": "permit",
                    "actor": [
                        {
                            "role": {"coding": [{"code": "PCP"}]},
                            "reference": {"type": "Practitioner", "display": "my GP"},
                        }
                    ],
                }
            ],
        )
    )
    c = parse_consent(doc, consent_id="c0")
    gp = request(recipient="Practitioner/dr1", recipient_roles=frozenset({"PCP"}))
    assert decide([c], Policy(), gp).permit
    assert not decide([c], Policy(), replace(gp, recipient_roles=frozenset())).permit
    assert not decide([c], Policy(), replace(gp, recipient="Organization/x")).permit
