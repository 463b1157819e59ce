"""SMART scopes: the grammar, what a scope allows, and how a request is narrowed."""

from __future__ import annotations

import pytest

from hdx_shared.scopes import ResourceScope, ScopeError, ScopeSet, parse_scope


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("system/Patient.rs", ResourceScope("system", "Patient", "rs")),
        ("system/Consent.cruds", ResourceScope("system", "Consent", "cruds")),
        ("system/*.cud", ResourceScope("system", "*", "cud")),
        ("system/Observation.s", ResourceScope("system", "Observation", "s")),
        ("patient/Observation.r", ResourceScope("patient", "Observation", "r")),
        # SMART v1 spellings mean the same as their v2 letters.
        ("system/Patient.read", ResourceScope("system", "Patient", "rs")),
        ("system/Patient.write", ResourceScope("system", "Patient", "cud")),
        ("system/*.*", ResourceScope("system", "*", "cruds")),
        ("system/hdx-admin", "system/hdx-admin"),
    ],
)
def test_parse(text: str, expected: object) -> None:
    assert parse_scope(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "system/Patient.sr",  # v2: letters in the order c r u d s
        "system/Patient.rr",
        "system/Patient.x",
        "system/Patient.",
        "system/patient.rs",  # not a resource type, and not an HDX scope either (has a dot)
        "system/Observation.rs?category=laboratory",  # query parameters are not supported
        "openid",
        "Patient.rs",
        "admin/Patient.rs",
        "",
    ],
)
def test_refused(text: str) -> None:
    with pytest.raises(ScopeError):
        parse_scope(text)


def test_what_a_set_allows() -> None:
    scopes = ScopeSet.parse("system/Patient.rs system/*.c system/hdx-admin patient/Consent.r")
    assert scopes.allows("Patient", "r") and scopes.allows("Patient", "s")
    assert not scopes.allows("Patient", "u")
    assert scopes.allows("Observation", "c") and not scopes.allows("Observation", "r")
    assert not scopes.allows("Consent", "r"), "only system scopes count for a backend client"
    assert scopes.has("system/Patient.rs") and scopes.has("system/Encounter.c")
    assert not scopes.has("system/Patient.rud")
    assert scopes.has("system/hdx-admin") and not scopes.has("system/hdx-identity")
    assert scopes.has("system/*.c") and not scopes.has("system/*.r")


@pytest.mark.parametrize(
    ("registered", "requested", "granted"),
    [
        ("system/*.cruds", "system/Patient.rs", "system/Patient.rs"),
        ("system/Patient.rs", "system/Patient.cruds", "system/Patient.rs"),
        (
            "system/Patient.rs system/Observation.r",
            "system/*.rs",
            "system/Patient.rs system/Observation.r",
        ),
        ("system/Patient.rs", "system/Consent.r", ""),
        ("system/Patient.read", "system/Patient.s", "system/Patient.s"),
        ("system/hdx-admin system/*.r", "system/hdx-admin", "system/hdx-admin"),
        ("system/*.r", "system/hdx-admin", ""),
        ("patient/*.r", "patient/Patient.r", ""),  # HDX grants system scopes only
    ],
)
def test_narrowing_grants_only_what_is_registered(
    registered: str, requested: str, granted: str
) -> None:
    assert str(ScopeSet.parse(registered).narrow(ScopeSet.parse(requested))) == granted


def test_a_set_prints_as_the_scope_parameter() -> None:
    text = "system/Patient.rs system/hdx-admin"
    assert str(ScopeSet.parse(text)) == text
    assert str(ScopeSet.parse("system/Patient.read")) == "system/Patient.rs"
