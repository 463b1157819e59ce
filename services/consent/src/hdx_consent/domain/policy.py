"""The exchange's own consent policy: what holds when no patient consent says otherwise.

Defaults (each a setting of the consent service):

- Direct care (TREAT, ETREAT) is permitted when no consent applies — implied consent for
  direct care. Every other purpose (HPAYMT, HOPERAT, HRESCH, PUBHLTH, …) is denied unless a
  consent opts the patient in.
- A person on the national opt-out register (by enterprise id or by a trusted identifier)
  is denied for every purpose but direct care, whatever their consents say.
- Resources labelled sensitive in meta.security (R, V, HIV, PSY, SDV, ETH, STD, …) are
  denied unless the permitting provision (or one of its ancestors) names the label.
- Break-glass: an ETREAT request with a stated reason is permitted even where consent or
  sensitivity would deny, if the policy allows it; the decision is flagged and audited.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from hdx_consent.domain.consent import identifier_key, person_key

DIRECT_CARE = frozenset({"TREAT", "ETREAT"})
# Confidentiality R (restricted) and V (very restricted), and the v3 ActCode sensitivity
# codes HDX treats as sensitive by default.
SENSITIVE_LABELS = frozenset(
    {
        "R",
        "V",
        "HIV",
        "PSY",
        "SDV",
        "ETH",
        "STD",
        "SEX",
        "SUD",
        "GDIS",
        "MH",
        "SICKLE",
        "TBOO",
    }
)
# provision.action codes (consentaction) that an exchange of data counts as.
EXCHANGE_ACTIONS = frozenset({"access", "disclose", "use"})
_COMMENT = re.compile(r"(?:^|\s)#")


@dataclass(frozen=True, slots=True)
class Policy:
    default_permit_purposes: frozenset[str] = DIRECT_CARE
    direct_care_purposes: frozenset[str] = DIRECT_CARE
    sensitive_labels: frozenset[str] = SENSITIVE_LABELS
    opt_out: frozenset[str] = frozenset()  # index keys, see `opt_out_register`
    break_glass_allowed: bool = True
    break_glass_purposes: frozenset[str] = frozenset({"ETREAT"})
    exchange_actions: frozenset[str] = EXCHANGE_ACTIONS

    def opted_out(self, person: str | None, identifiers: Iterable[str]) -> bool:
        if not self.opt_out:
            return False
        if person is not None and person_key(person) in self.opt_out:
            return True
        return any(identifier_key(i) in self.opt_out for i in identifiers)


def opt_out_register(lines: Iterable[str]) -> frozenset[str]:
    """Parse an opt-out register: one entry a line; '#' at the start of a line or after
    whitespace starts a comment.

    An entry is an enterprise person id (``123`` or ``Patient/123``) or a trusted identifier
    ``system|value`` (e.g. ``https://fhir.nhs.uk/Id/nhs-number|9000000009``).
    """
    keys: set[str] = set()
    for raw in lines:
        entry = _COMMENT.split(raw, maxsplit=1)[0].strip()
        if not entry:
            continue
        keys.add(identifier_key(entry) if "|" in entry else person_key(entry))
    return frozenset(keys)
