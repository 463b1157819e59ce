"""What the matcher knows of a patient: demographics extracted from a FHIR R4 Patient and
normalised once, so comparisons are cheap and never see raw FHIR."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from hdx_patient_index.domain.identifiers import PERSON_SYSTEM, Identifier, TrustedSystems
from hdx_patient_index.domain.normalise import (
    name_tokens,
    normalise_address_line,
    normalise_name,
    normalise_phone,
    normalise_postcode,
)

# HumanName.use values that describe who the patient is now, best first.
_CURRENT_NAME_USES = ("official", "usual", None, "temp")
_GENDERS = frozenset({"male", "female", "other"})  # "unknown" tells nothing


@dataclass(frozen=True, slots=True)
class Demographics:
    """Normalised demographics of one source record (or of a $match query)."""

    family: str | None = None
    given: tuple[str, ...] = ()  # first given name first, then middle names
    other_families: tuple[str, ...] = ()  # maiden, previous and other names' families
    birth_date: date | None = None
    birth_year: int | None = None  # set whenever birth_date is, or alone for a partial date
    gender: str | None = None
    postcodes: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()  # first lines of current addresses ('12 station rd')
    # Each current address of two lines or more as its words in no order (`address_words`:
    # '23|allunga st woollum'): the same address with its lines in another order.
    address_words: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    # The phones a source marked as mobile (ContactPoint.use 'mobile', "a telecommunication
    # device that moves and stays with its owner"): a person's own, where a home phone is a
    # household's. Each is in ``phones`` as well.
    mobiles: tuple[str, ...] = ()
    trusted: tuple[Identifier, ...] = ()  # valid identifiers of trusted systems
    identifiers: tuple[Identifier, ...] = ()  # every other identifier

    @property
    def first_given(self) -> str | None:
        return self.given[0] if self.given else None

    def trusted_by_system(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for i in self.trusted:
            out.setdefault(i.system, set()).add(i.value)
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the snapshot the store keeps and reloads the index from)."""
        doc: dict[str, Any] = {}
        if self.family:
            doc["family"] = self.family
        if self.given:
            doc["given"] = list(self.given)
        if self.other_families:
            doc["other_families"] = list(self.other_families)
        if self.birth_date:
            doc["birth_date"] = self.birth_date.isoformat()
        elif self.birth_year:
            doc["birth_year"] = self.birth_year
        if self.gender:
            doc["gender"] = self.gender
        if self.postcodes:
            doc["postcodes"] = list(self.postcodes)
        if self.addresses:
            doc["addresses"] = list(self.addresses)
        if self.address_words:
            doc["address_words"] = list(self.address_words)
        if self.phones:
            doc["phones"] = list(self.phones)
        if self.mobiles:
            doc["mobiles"] = list(self.mobiles)
        if self.trusted:
            doc["trusted"] = [i.token for i in self.trusted]
        if self.identifiers:
            doc["identifiers"] = [i.token for i in self.identifiers]
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Demographics:
        birth = date.fromisoformat(doc["birth_date"]) if doc.get("birth_date") else None
        return cls(
            family=doc.get("family"),
            given=tuple(doc.get("given", ())),
            other_families=tuple(doc.get("other_families", ())),
            birth_date=birth,
            birth_year=birth.year if birth else doc.get("birth_year"),
            gender=doc.get("gender"),
            postcodes=tuple(doc.get("postcodes", ())),
            addresses=tuple(doc.get("addresses", ())),
            address_words=tuple(doc.get("address_words", ())),
            phones=tuple(doc.get("phones", ())),
            mobiles=tuple(doc.get("mobiles", ())),
            trusted=tuple(Identifier.parse_token(t) for t in doc.get("trusted", ())),
            identifiers=tuple(Identifier.parse_token(t) for t in doc.get("identifiers", ())),
        )


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _strs(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _primary_name(names: list[dict[str, Any]]) -> dict[str, Any] | None:
    for use in _CURRENT_NAME_USES:
        for n in names:
            if n.get("use") == use and not _ended(n):
                return n
    return names[0] if names else None


def _ended(element: Mapping[str, Any]) -> bool:
    period = element.get("period")
    return isinstance(period, dict) and "end" in period


def _name_parts(name: Mapping[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    family = normalise_name(name["family"]) if isinstance(name.get("family"), str) else None
    given = tuple(t for g in _strs(name.get("given")) for t in name_tokens(g))
    text = name.get("text")
    if (family is None or not given) and isinstance(text, str):
        # Only the text form: "Ada Lovelace" → given ada, family lovelace.
        tokens = name_tokens(text)
        if family is None and len(tokens) >= 2:
            family = tokens[-1]
            tokens = tokens[:-1]
        if not given:
            given = tokens if family is not None else ()
    return family, given


def parse_birth_date(value: Any) -> tuple[date | None, int | None]:
    """FHIR date (YYYY, YYYY-MM or YYYY-MM-DD) → (full date or None, year or None)."""
    if (
        not isinstance(value, str)
        or len(value) < 4
        or not (value[:4].isascii() and value[:4].isdigit())
    ):
        return None, None
    year = int(value[:4])
    if len(value) >= 10:
        try:
            return date.fromisoformat(value[:10]), year
        except ValueError:
            return None, year
    return None, year


def extract_identifiers(
    patient: Mapping[str, Any], trusted: TrustedSystems
) -> tuple[tuple[Identifier, ...], tuple[Identifier, ...]]:
    """(valid trusted identifiers, every other identifier), normalised and de-duplicated.

    HDX's own person identifier (urn:hdx:person) is never evidence: it is left out.
    """
    good: dict[Identifier, None] = {}
    other: dict[Identifier, None] = {}
    for ident in _dicts(patient.get("identifier")):
        system, value = ident.get("system"), ident.get("value")
        if not isinstance(value, str) or not value.strip() or system == PERSON_SYSTEM:
            continue
        system = system if isinstance(system, str) else ""
        i = Identifier(system, trusted.normalise(system, value))
        if trusted.valid(i):
            good[i] = None
        else:
            other[i] = None
    return tuple(good), tuple(other)


def _first_line(raw: list[str]) -> str | None:
    """The address's first line, normalised. A first line that is only a house number
    ('53', then 'kyeema' — a source that keeps the number in a field of its own) is
    joined with the next: '53 kyeema', as the same address reads in one line elsewhere."""
    first = normalise_address_line(raw[0]) if raw else None
    if first and " " not in first and any(c.isdigit() for c in first) and len(raw) > 1:
        street = normalise_address_line(raw[1])
        if street:
            return f"{first} {street}"
    return first


def address_words(raw: list[str]) -> str | None:
    """An address of two lines or more as its words in no order: the house numbers (any
    word with a digit) in the order they come, then the other words sorted —
    '23 woollum street' + 'allunga' and '23 allunga' + 'woollum street' are both
    '23|allunga st woollum'. Sources differ in which line a building, an estate or a street
    goes on, and a house number kept in a field of its own lands on whichever line comes
    first. Every word of every line counts, so two homes that share only a line (a
    locality, a building) differ; the numbers keep their order, so 'flat 2' + '10 high st'
    is not 'flat 10' + '2 high st'. None for an address of fewer than two lines (its first
    line is compared already)."""
    lines = [n for n in (normalise_address_line(x) for x in raw) if n]
    if len(lines) < 2:
        return None
    words = " ".join(lines).split()
    numbers = [w for w in words if any(c.isdigit() for c in w)]
    others = sorted(w for w in words if not any(c.isdigit() for c in w))
    if not others:
        return None
    return f"{' '.join(numbers)}|{' '.join(others)}"


def extract_demographics(patient: Mapping[str, Any], trusted: TrustedSystems) -> Demographics:
    """The demographics of a FHIR R4 Patient (a parsed JSON dict), normalised."""
    names = _dicts(patient.get("name"))
    primary = _primary_name(names)
    family, given = _name_parts(primary) if primary is not None else (None, ())
    others: dict[str, None] = {}
    for n in names:
        if n is primary:
            continue
        f, _ = _name_parts(n)
        if f and f != family:
            others[f] = None
    birth, year = parse_birth_date(patient.get("birthDate"))
    gender = patient.get("gender")
    postcodes: dict[str, None] = {}
    lines: dict[str, None] = {}
    words: dict[str, None] = {}
    for a in _dicts(patient.get("address")):
        if a.get("use") == "old" or _ended(a):
            continue
        raw_pc = a.get("postalCode")
        pc = normalise_postcode(raw_pc) if isinstance(raw_pc, str) else None
        if pc:
            postcodes[pc] = None
        raw_lines = _strs(a.get("line"))
        line = _first_line(raw_lines)
        if line:
            lines[line] = None
        if len(raw_lines) > 1 and (key := address_words(raw_lines)):
            words[key] = None
    phones: dict[str, None] = {}
    mobiles: dict[str, None] = {}
    for t in _dicts(patient.get("telecom")):
        raw_phone = t.get("value")
        if t.get("system") in ("phone", "sms") and isinstance(raw_phone, str):
            phone = normalise_phone(raw_phone)
            if phone:
                phones[phone] = None
                if t.get("use") == "mobile":
                    mobiles[phone] = None
    good, other = extract_identifiers(patient, trusted)
    return Demographics(
        family=family,
        given=given,
        other_families=tuple(others),
        birth_date=birth,
        birth_year=year,
        gender=gender if gender in _GENDERS else None,
        postcodes=tuple(postcodes),
        addresses=tuple(lines),
        address_words=tuple(words),
        phones=tuple(phones),
        mobiles=tuple(mobiles),
        trusted=good,
        identifiers=other,
    )
