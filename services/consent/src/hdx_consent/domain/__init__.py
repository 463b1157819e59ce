"""The consent domain: FHIR Consent parsed into a decision model, the exchange policy and
the decision itself. No Kafka, database or web framework here."""

from hdx_consent.domain.consent import (
    Consent,
    ConsentInvalid,
    Problem,
    Provision,
    ProvisionType,
    normalize_reference,
    parse_consent,
)
from hdx_consent.domain.decision import Basis, ConsentDecision, DecisionRequest, decide
from hdx_consent.domain.index import ConsentIndex
from hdx_consent.domain.policy import Policy, opt_out_register

__all__ = [
    "Basis",
    "Consent",
    "ConsentDecision",
    "ConsentIndex",
    "ConsentInvalid",
    "DecisionRequest",
    "Policy",
    "Problem",
    "Provision",
    "ProvisionType",
    "decide",
    "normalize_reference",
    "opt_out_register",
    "parse_consent",
]
