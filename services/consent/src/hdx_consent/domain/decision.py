"""The consent decision: may this data go to this recipient for this purpose, now?

Order of evaluation (each step is tested in tests/test_decision.py):

1. No enterprise person id and no trusted identifier → deny (consents cannot be found).
2. Not direct care and the person is on the opt-out register → deny.
3. Among the consents of the person that are in force (status active, root period covering
   the time), every provision that applies (its own and all its ancestors' constraints
   match, its period covers the time) is a candidate. The **most specific** one decides:
   specificity = (distinct dimensions constrained on its path — actor, action, purpose,
   class, code, securityLabel, data —, nesting depth), compared in that order; at equal
   specificity **deny wins**; a remaining tie goes to the lowest (consent id, path).
4. No candidate → the policy default for the purpose (direct care permitted).
5. A permit for a resource carrying sensitive labels stands only if the permitting provision
   (or an ancestor) names every one of them; otherwise deny.
6. A deny, when the request is a break-glass purpose (ETREAT) with a stated reason and the
   policy allows break-glass → permit, flagged `break_glass`, the overridden deny kept in
   the reasons and in consent_id/provision_path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from hdx_consent.domain.consent import Consent, Provision, ProvisionType
from hdx_consent.domain.policy import Policy


class Basis(StrEnum):
    """What the decision rests on."""

    CONSENT = "consent"  # a provision of a consent
    POLICY_DEFAULT = "policy-default"  # no consent applies
    OPT_OUT = "opt-out-register"
    SENSITIVE = "sensitive-label"
    BREAK_GLASS = "break-glass"
    NO_PERSON = "no-person"


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionRequest:
    """One question: this person's data, of this type, to this recipient, for this purpose."""

    person: str | None  # enterprise person id
    recipient: str  # 'Organization/<id>' (normalised literal reference)
    purpose: str  # HL7 v3 PurposeOfUse code
    resource_type: str
    at: datetime  # aware; when the decision is taken
    identifiers: tuple[str, ...] = ()  # the person's trusted identifiers 'system|value'
    security_labels: frozenset[str] = frozenset()  # meta.security codes
    break_glass_reason: str | None = None
    # Optional facts some provisions constrain on.
    recipient_identifiers: frozenset[str] = frozenset()  # 'system|value'
    recipient_roles: frozenset[str] = frozenset()  # role codes the recipient acts in
    codes: frozenset[str] = frozenset()  # the resource's codes: 'system|code' and 'code'
    resource_ref: str | None = None  # 'Observation/<id>'


@dataclass(frozen=True, slots=True)
class ConsentDecision:
    permit: bool
    reasons: tuple[str, ...]
    basis: Basis
    # The consent whose provision decided — or was overridden by the
    # sensitivity rule or break-glass; None when no consent applied.
    consent_id: str | None = None
    consent_version: int | None = None
    provision_path: str | None = None  # e.g. 'provision.provision[0]'
    break_glass: bool = False

    @property
    def decision(self) -> str:
        return "permit" if self.permit else "deny"


def _applies(p: Provision, r: DecisionRequest, actions: frozenset[str]) -> bool:
    """Does this provision's own scope cover the request? (Ancestors checked by the walk.)"""
    if p.purposes and r.purpose not in p.purposes:
        return False
    if p.classes and r.resource_type not in p.classes:
        return False
    if p.actors and not any(
        a.matches(r.recipient, r.recipient_identifiers, r.recipient_roles) for a in p.actors
    ):
        return False
    if p.period is not None and not p.period.covers(r.at):
        return False
    if p.actions and p.actions.isdisjoint(actions):
        return False
    if p.security_labels and p.security_labels.isdisjoint(r.security_labels):
        return False
    if p.codes and p.codes.isdisjoint(r.codes):
        return False
    return not p.data or (r.resource_ref is not None and r.resource_ref in p.data)


def applicable_provisions(
    consent: Consent, request: DecisionRequest, actions: frozenset[str]
) -> list[Provision]:
    """The provisions of one consent that apply: a child is looked at only if its parent
    applies, so a nested provision is an exception inside its parent's scope."""
    out: list[Provision] = []
    stack = [consent.provision]
    while stack:
        p = stack.pop()
        if _applies(p, request, actions):
            out.append(p)
            stack.extend(p.provisions)
    return out


def decide(
    consents: Iterable[Consent], policy: Policy, request: DecisionRequest
) -> ConsentDecision:
    """Decide one request against the person's consents and the exchange policy."""
    purpose = request.purpose
    if request.person is None and not request.identifiers:
        outcome = ConsentDecision(
            False,
            ("no enterprise person id or trusted identifier: consents cannot be checked",),
            Basis.NO_PERSON,
        )
    elif purpose not in policy.direct_care_purposes and policy.opted_out(
        request.person, request.identifiers
    ):
        outcome = ConsentDecision(
            False,
            (
                f"the person is on the national opt-out register: only direct care "
                f"({', '.join(sorted(policy.direct_care_purposes))}) is permitted, not {purpose}",
            ),
            Basis.OPT_OUT,
        )
    else:
        outcome = _by_consents(consents, policy, request)
    if (
        outcome.permit
        or not request.break_glass_reason
        or (purpose not in policy.break_glass_purposes)
    ):
        return outcome
    if not policy.break_glass_allowed:
        return ConsentDecision(
            False,
            (*outcome.reasons, "break-glass was asked for, but policy does not allow it"),
            outcome.basis,
            outcome.consent_id,
            outcome.consent_version,
            outcome.provision_path,
        )
    return ConsentDecision(
        True,
        (
            *outcome.reasons,
            f"break-glass for {purpose} overrides the deny; stated reason: "
            f"{request.break_glass_reason!r}; flagged for review",
        ),
        Basis.BREAK_GLASS,
        outcome.consent_id,
        outcome.consent_version,
        outcome.provision_path,
        break_glass=True,
    )


def _by_consents(
    consents: Iterable[Consent], policy: Policy, r: DecisionRequest
) -> ConsentDecision:
    best_rank: tuple[int, int, bool] | None = None
    best_consent: Consent | None = None
    best: Provision | None = None
    actions = policy.exchange_actions
    for c in consents:
        if not c.in_force(r.at):
            continue
        for p in applicable_provisions(c, r, actions):
            rank = (*p.specificity, p.type is ProvisionType.DENY)
            if (
                best_rank is None
                or rank > best_rank
                or (
                    rank == best_rank
                    and best_consent is not None
                    and best is not None
                    and (c.id, p.path) < (best_consent.id, best.path)
                )
            ):
                best_rank, best_consent, best = rank, c, p

    if best_consent is None or best is None:
        if r.purpose in policy.default_permit_purposes:
            return _sensitive_check(
                policy,
                r,
                ConsentDecision(
                    True,
                    (
                        f"no consent applies; policy permits {r.purpose} by default"
                        + (
                            " (implied consent for direct care)"
                            if r.purpose in policy.direct_care_purposes
                            else ""
                        ),
                    ),
                    Basis.POLICY_DEFAULT,
                ),
                frozenset(),
            )
        return ConsentDecision(
            False,
            (f"no consent applies; {r.purpose} needs the patient's opt-in",),
            Basis.POLICY_DEFAULT,
        )

    ref = f"Consent/{best_consent.id}"
    permit = best.type is ProvisionType.PERMIT
    decision = ConsentDecision(
        permit,
        (f"{ref} {best.path} ({best.describe()}) is the most specific provision that applies",),
        Basis.CONSENT,
        best_consent.id,
        best_consent.version,
        best.path,
    )
    return _sensitive_check(policy, r, decision, best.named_labels)


def _sensitive_check(
    policy: Policy, r: DecisionRequest, decision: ConsentDecision, named: frozenset[str]
) -> ConsentDecision:
    if not decision.permit or not r.security_labels:
        return decision
    unnamed = (r.security_labels & policy.sensitive_labels) - named
    if not unnamed:
        return decision
    labels = ", ".join(sorted(unnamed))
    return ConsentDecision(
        False,
        (
            *decision.reasons,
            f"the resource is labelled sensitive ({labels}) and no permitting provision names "
            f"{'that label' if len(unnamed) == 1 else 'those labels'}",
        ),
        Basis.SENSITIVE,
        decision.consent_id,
        decision.consent_version,
        decision.provision_path,
    )
