"""The patient index's settings from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hdx_patient_index.domain.identifiers import NHS_NUMBER
from hdx_patient_index.settings import PatientIndexSettings


def test_defaults() -> None:
    s = PatientIndexSettings(_env_file=None)  # type: ignore[call-arg]
    assert s.service_name == "patient-index" and s.http_port == 8001
    assert s.trusted_identifier_systems == [NHS_NUMBER]
    assert s.match_lower_threshold < s.match_upper_threshold
    assert s.park_timeout_ms == 24 * 3600 * 1000


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("urn:a, urn:b", ["urn:a", "urn:b"]),
        ('["urn:a", "urn:b"]', ["urn:a", "urn:b"]),
        (NHS_NUMBER, [NHS_NUMBER]),
    ],
)
def test_trusted_systems_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]
) -> None:
    monkeypatch.setenv("HDX_TRUSTED_IDENTIFIER_SYSTEMS", raw)
    assert PatientIndexSettings(_env_file=None).trusted_identifier_systems == expected  # type: ignore[call-arg]


def test_thresholds_must_be_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HDX_MATCH_LOWER_THRESHOLD", "40")
    with pytest.raises(ValidationError, match="LOWER"):
        PatientIndexSettings(_env_file=None)  # type: ignore[call-arg]


def test_match_model_is_unset_by_default_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert PatientIndexSettings(_env_file=None).match_model is None  # type: ignore[call-arg]
    monkeypatch.setenv("HDX_MATCH_MODEL", "/etc/hdx/model.json")
    settings = PatientIndexSettings(_env_file=None)  # type: ignore[call-arg]
    assert str(settings.match_model) == "/etc/hdx/model.json"
