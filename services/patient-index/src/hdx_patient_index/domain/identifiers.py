"""Identifiers, and the identifier systems the index trusts to name one person.

A *trusted* system is one whose values are issued to one person each (a national health
number): an equal, valid value on two records means the same person, and two different
values in the same system mean two people. Only values that pass the system's check are
trusted; an invalid value is kept as a plain identifier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

NHS_NUMBER = "https://fhir.nhs.uk/Id/nhs-number"
PERSON_SYSTEM = "urn:hdx:person"


@dataclass(frozen=True, slots=True, order=True)
class Identifier:
    system: str
    value: str

    @property
    def token(self) -> str:
        """The FHIR search token form, ``system|value``."""
        return f"{self.system}|{self.value}"

    @classmethod
    def parse_token(cls, token: str) -> Identifier:
        """``system|value`` → Identifier; a bare ``value`` (or ``|value``) has system ''."""
        system, sep, value = token.partition("|")
        return cls(system, value) if sep else cls("", token)

    def to_fhir(self) -> dict[str, str]:
        return {"system": self.system, "value": self.value}


def nhs_number_valid(value: str) -> bool:
    """An NHS number: ten digits whose last is the modulus-11 check digit of the first nine.

    Weights 10..2 multiply digits one to nine; the check digit is 11 − (sum mod 11), where
    11 means 0 and 10 means the number is invalid. Ten equal digits pass the arithmetic
    (1111111111) but are placeholders systems type in, never issued: they are refused.
    """
    if len(value) != 10 or not (value.isascii() and value.isdigit()) or len(set(value)) == 1:
        return False
    total = sum(int(d) * w for d, w in zip(value[:9], range(10, 1, -1), strict=True))
    check = 11 - total % 11
    if check == 11:
        check = 0
    return check != 10 and check == int(value[9])


def normalise_nhs_number(value: str) -> str:
    """NHS numbers are written '943 476 5919' or '943-476-5919': keep the digits."""
    return "".join(c for c in value if not c.isspace() and c != "-")


Validator = Callable[[str], bool]
Normaliser = Callable[[str], str]


def _non_empty(value: str) -> bool:
    return bool(value)


def _strip(value: str) -> str:
    return value.strip()


# Systems whose check the index knows; any other trusted system only needs a non-empty value.
KNOWN_SYSTEMS: dict[str, tuple[Normaliser, Validator]] = {
    NHS_NUMBER: (normalise_nhs_number, nhs_number_valid),
}


@dataclass(frozen=True)
class TrustedSystems:
    """The identifier systems that name one person, with how each value is normalised and
    checked. Configured once (settings) and handed to extraction and matching."""

    systems: tuple[str, ...] = (NHS_NUMBER,)
    checks: Mapping[str, tuple[Normaliser, Validator]] = field(
        default_factory=lambda: dict(KNOWN_SYSTEMS)
    )

    @classmethod
    def of(cls, systems: Iterable[str]) -> TrustedSystems:
        return cls(tuple(dict.fromkeys(s.strip() for s in systems if s.strip())))

    def is_trusted(self, system: str) -> bool:
        return system in self.systems

    def normalise(self, system: str, value: str) -> str:
        """The value as stored and compared: the system's normaliser, else stripped."""
        normaliser, _ = self.checks.get(system, (_strip, _non_empty))
        return normaliser(value)

    def valid(self, identifier: Identifier) -> bool:
        """A trusted system's value that passes its check (False for untrusted systems)."""
        if identifier.system not in self.systems:
            return False
        _, validator = self.checks.get(identifier.system, (_strip, _non_empty))
        return validator(identifier.value)
