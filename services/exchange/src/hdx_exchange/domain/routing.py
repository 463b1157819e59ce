"""Which subscriptions a resource concerns: FHIR Subscription criteria, matched in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl

from hdx_shared.fhir import FhirError, Issue


class ChannelType(StrEnum):
    KAFKA = "kafka"
    REST_HOOK = "rest-hook"


class PayloadContent(StrEnum):
    FULL = "full-resource"
    ID_ONLY = "id-only"
    EMPTY = "empty"


# Search parameters a criteria string may use, and where each looks in the resource.
TOKEN_PARAMS: dict[str, str] = {
    "category": "category",
    "code": "code",
    "status": "status",
    "class": "class",
    "type": "type",
}


@dataclass(frozen=True, slots=True)
class Criteria:
    """`Observation?category=laboratory&code=http://loinc.org|2345-7` — a type and filters."""

    resource_type: str
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()
    patient: str | None = None  # an enterprise person id, from patient=Patient/<id>

    @classmethod
    def parse(cls, text: str) -> Criteria:
        rtype, _, query = text.strip().partition("?")
        if not rtype or not rtype[0].isupper() or "/" in rtype:
            raise FhirError(
                "invalid-criteria",
                [
                    Issue(
                        f"criteria '{text}' must start with a resource type, e.g. Observation?...",
                        expression="criteria",
                    )
                ],
            )
        filters: list[tuple[str, tuple[str, ...]]] = []
        patient = None
        for name, value in parse_qsl(query, keep_blank_values=False):
            if name in ("patient", "subject"):
                patient = value.removeprefix("Patient/")
            elif name in TOKEN_PARAMS:
                filters.append((name, tuple(value.split(","))))
            else:
                raise FhirError(
                    "invalid-criteria",
                    [
                        Issue(
                            f"search parameter '{name}' is not supported in criteria; HDX supports "
                            f"patient, {', '.join(TOKEN_PARAMS)}",
                            code="not-supported",
                            expression="criteria",
                        )
                    ],
                )
        return cls(rtype, tuple(filters), patient)

    def matches(
        self, resource_type: str, person: str | None, resource: Callable[[], Mapping[str, Any]]
    ) -> bool:
        if resource_type != self.resource_type:
            return False
        if self.patient is not None and self.patient != person:
            return False
        if not self.filters:
            return True
        doc = resource()
        return all(
            _token_matches(doc.get(TOKEN_PARAMS[name]), wanted) for name, wanted in self.filters
        )


def _codes(value: Any) -> Iterable[tuple[str | None, str]]:
    """(system, code) pairs of a code, Coding, CodeableConcept, or a list of them."""
    if isinstance(value, str):
        yield None, value
    elif isinstance(value, list):
        for v in value:
            yield from _codes(v)
    elif isinstance(value, dict):
        if "coding" in value:
            yield from _codes(value["coding"])
        elif "code" in value:
            yield value.get("system"), str(value["code"])


def _token_matches(value: Any, wanted: tuple[str, ...]) -> bool:
    have = list(_codes(value))
    for token in wanted:
        system, bar, code = token.rpartition("|")
        for s, c in have:
            if c == code and (not bar or s == system):
                return True
    return False


@dataclass(frozen=True, slots=True)
class Subscription:
    """A care provider's standing request for data, with the purpose it declares."""

    id: str
    subscriber: str  # a short id; the Kafka feed is hdx.feed.<subscriber>
    recipient: str  # the recipient consent is decided for, e.g. Organization/care-home-1
    purpose: str  # HL7 v3 PurposeOfUse, e.g. TREAT
    criteria: Criteria
    channel: ChannelType
    endpoint: str | None = None
    headers: tuple[str, ...] = ()
    payload: PayloadContent = PayloadContent.FULL
    active: bool = True

    def candidate(self) -> dict[str, str]:
        """What consent is asked to decide for this subscription."""
        return {
            "subscription": self.id,
            "subscriber": self.subscriber,
            "recipient": self.recipient,
            "purpose": self.purpose,
        }


def match_subscriptions(
    subscriptions: Iterable[Subscription],
    resource_type: str,
    person: str | None,
    resource: Callable[[], Mapping[str, Any]],
) -> list[Subscription]:
    """The active subscriptions whose criteria this resource meets."""
    return [
        s for s in subscriptions if s.active and s.criteria.matches(resource_type, person, resource)
    ]
