"""Policy settings from the environment and the opt-out register file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hdx_consent.domain.consent import identifier_key, person_key
from hdx_consent.settings import ConsentSettings


def test_defaults() -> None:
    s = ConsentSettings()
    assert (s.service_name, s.http_port) == ("consent", 8002)
    policy = s.policy()
    assert policy.default_permit_purposes == {"TREAT", "ETREAT"}
    assert {"R", "V", "HIV", "PSY", "SDV", "ETH", "STD"} <= policy.sensitive_labels
    assert policy.break_glass_allowed and policy.opt_out == frozenset()


def test_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    register = tmp_path / "opt-out.txt"
    register.write_text(
        "# national data opt-out\nPatient/p1\n"
        "https://fhir.nhs.uk/Id/nhs-number|9000000009  # since 2024\n\n"
    )
    monkeypatch.setenv("HDX_SENSITIVE_LABELS", "HIV, PSY")
    monkeypatch.setenv("HDX_DEFAULT_PERMIT_PURPOSES", '["TREAT"]')
    monkeypatch.setenv("HDX_BREAK_GLASS_ALLOWED", "false")
    monkeypatch.setenv("HDX_OPT_OUT_REGISTER", str(register))
    policy = ConsentSettings().policy()
    assert policy.sensitive_labels == {"HIV", "PSY"}
    assert policy.default_permit_purposes == {"TREAT"}
    assert not policy.break_glass_allowed
    assert policy.opt_out == {
        person_key("p1"),
        identifier_key("https://fhir.nhs.uk/Id/nhs-number|9000000009"),
    }


def test_a_missing_register_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ConsentSettings(opt_out_register=tmp_path / "missing.txt").policy()
