from __future__ import annotations

from typing import Any

import pytest

from hdx_exchange.domain.routing import (
    ChannelType,
    Criteria,
    Subscription,
    match_subscriptions,
)
from hdx_shared.fhir import FhirError

LAB = {
    "resourceType": "Observation",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "laboratory",
                }
            ]
        }
    ],
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "status": "final",
}


def sub(sid: str, criteria: str, active: bool = True) -> Subscription:
    return Subscription(
        sid,
        "home",
        "Organization/home",
        "TREAT",
        Criteria.parse(criteria),
        ChannelType.KAFKA,
        active=active,
    )


@pytest.mark.parametrize(
    ("criteria", "resource_type", "person", "resource", "expected"),
    [
        ("Observation", "Observation", "P1", LAB, True),
        ("Encounter", "Observation", "P1", LAB, False),
        ("Observation?category=laboratory", "Observation", "P1", LAB, True),
        ("Observation?category=vital-signs", "Observation", "P1", LAB, False),
        ("Observation?code=http://loinc.org|2345-7", "Observation", "P1", LAB, True),
        ("Observation?code=http://snomed.info/sct|2345-7", "Observation", "P1", LAB, False),
        ("Observation?code=9999-9,2345-7", "Observation", "P1", LAB, True),
        ("Observation?status=final", "Observation", "P1", LAB, True),
        ("Observation?patient=Patient/P1", "Observation", "P1", LAB, True),
        ("Observation?patient=Patient/P2", "Observation", "P1", LAB, False),
    ],
)
def test_criteria(
    criteria: str, resource_type: str, person: str, resource: dict[str, Any], expected: bool
) -> None:
    assert Criteria.parse(criteria).matches(resource_type, person, lambda: resource) is expected


def test_resource_is_parsed_only_when_a_filter_needs_it() -> None:
    def explode() -> dict[str, Any]:
        raise AssertionError("parsed without need")

    assert Criteria.parse("Observation").matches("Observation", None, explode)


@pytest.mark.parametrize("bad", ["", "observation", "Observation?_has=x", "/Patient"])
def test_unsupported_criteria_are_refused(bad: str) -> None:
    with pytest.raises(FhirError):
        Criteria.parse(bad)


def test_only_active_matching_subscriptions_are_candidates() -> None:
    subs = [sub("a", "Observation"), sub("b", "Observation", active=False), sub("c", "Encounter")]
    matched = match_subscriptions(subs, "Observation", "P1", lambda: LAB)
    assert [s.id for s in matched] == ["a"]
    assert matched[0].candidate() == {
        "subscription": "a",
        "subscriber": "home",
        "recipient": "Organization/home",
        "purpose": "TREAT",
    }
