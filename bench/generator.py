"""Synthetic, seeded traffic for a region's health data exchange.

A *region* is 10 publishers — 4 hospitals and 6 GP practices — and the people they care
for, plus 5 care providers that subscribe to the exchange with different criteria, and the
consents some patients have filed. The same person is usually known at several sources,
and each source typed them in its own way: name typos, nicknames ("Bill" for William),
day and month swapped in the birth date, an old postcode, no phone, and now and then (in
A&E, before the number was traced) no NHS number. NHS numbers carry valid modulus-11
check digits and are unique per person.

*Traffic* is a deterministic stream of publish events over that region: ≈30 % Patient
messages (registrations at a source, then demographic updates), ≈70 % Encounters and
Observations that reference the source's own Patient as ``Patient/<local id>``. A source
never publishes a clinical resource before the Patient it references, so nothing waits in
the patient index. Each event knows its ground truth: which care providers' criteria it
matches and which of those the patient's consent denies (≈10 % of deliveries).

Everything is a pure function of the seed — the same seed gives byte-identical messages on
any machine — with no wall-clock time in the payloads and no third-party data generator.

Use it

- in the benchmark (``bench/exchange_bench.py``): ``Region.build(seed, persons)``,
  ``Traffic(region, seed).take(n)``, the seeding resources, and each event's ground truth;
- as a live feed (an ``hdx demo``-style ticker): ``live_feed(rate=20)`` yields
  ``(source, resource)`` pairs at that rate, forever (``alive_feed`` for asyncio); a
  demo registers the region first with ``seed_region(region, exchange_url, consent_url)``.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import orjson

DEFAULT_SEED = 20260105
NHS = "https://fhir.nhs.uk/Id/nhs-number"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
EXT_BASE = "https://hdx.example.org/fhir/StructureDefinition/"
# Clinical times in payloads count from here, one step per event: no wall clock in the data.
EPOCH = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)

SourceKind = Literal["hospital", "gp"]


# --------------------------------------------------------------------------------------
# Who is in the region
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """A publisher: a hospital or GP practice registered with the exchange."""

    id: str  # the ce_source, e.g. urn:hdx:org:st-marys
    name: str
    kind: SourceKind
    prefix: str  # how its local patient ids look, e.g. SMH0001234

    @property
    def slug(self) -> str:
        return self.id.rsplit(":", 1)[-1]

    @property
    def patient_identifier_system(self) -> str:
        return f"https://{self.slug}.example.org/patient-id"

    def registration(self) -> dict[str, Any]:
        """The body of POST /admin/publishers."""
        return {
            "source": self.id,
            "name": self.name,
            "patient_identifier_system": self.patient_identifier_system,
        }


SOURCES: tuple[Source, ...] = (
    Source("urn:hdx:org:st-marys", "St Mary's Hospital", "hospital", "SMH"),
    Source("urn:hdx:org:riverside", "Riverside General Hospital", "hospital", "RGH"),
    Source("urn:hdx:org:royal-county", "Royal County Hospital", "hospital", "RCH"),
    Source("urn:hdx:org:harbour-view", "Harbour View Community Hospital", "hospital", "HVH"),
    Source("urn:hdx:org:gp-high-street", "High Street Surgery", "gp", "HS"),
    Source("urn:hdx:org:gp-park-lane", "Park Lane Medical Centre", "gp", "PL"),
    Source("urn:hdx:org:gp-meadows", "The Meadows Practice", "gp", "MP"),
    Source("urn:hdx:org:gp-old-mill", "Old Mill Health Centre", "gp", "OM"),
    Source("urn:hdx:org:gp-station-road", "Station Road Surgery", "gp", "SR"),
    Source("urn:hdx:org:gp-quayside", "Quayside Family Practice", "gp", "QF"),
)
HOSPITALS = tuple(s for s in SOURCES if s.kind == "hospital")
PRACTICES = tuple(s for s in SOURCES if s.kind == "gp")


@dataclass(frozen=True, slots=True)
class CareProvider:
    """A subscriber: a care provider with a FHIR Subscription on its own Kafka feed."""

    recipient: str  # Organization/<id>: who consent is decided for
    name: str
    criteria: str  # FHIR Subscription criteria, e.g. Observation?category=laboratory

    @property
    def subscriber(self) -> str:
        """The exchange's Kafka-safe id for the recipient (hdx_exchange's subscriber_id)."""
        return re.sub(r"[^A-Za-z0-9._-]", "-", self.recipient.rsplit("/", 1)[-1])[:100]

    def feed(self, prefix: str = "hdx.") -> str:
        return f"{prefix}feed.{self.subscriber}"

    def wants(self, resource: dict[str, Any]) -> bool:
        """Does the resource meet the criteria? (The subset of search the region uses.)"""
        rtype, _, query = self.criteria.partition("?")
        if resource.get("resourceType") != rtype:
            return False
        if not query:
            return True
        name, _, value = query.partition("=")
        return value in _codes(resource.get(name))

    def subscription(self) -> dict[str, Any]:
        """The body of POST /fhir/Subscription: a Kafka feed ("message" channel)."""
        return {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": f"{self.name}: direct care",
            "criteria": self.criteria,
            "extension": [
                {"url": EXT_BASE + "recipient", "valueReference": {"reference": self.recipient}},
                {
                    "url": EXT_BASE + "purpose-of-use",
                    "valueCoding": {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "code": "TREAT",
                    },
                },
            ],
            "channel": {"type": "message", "payload": "application/fhir+json"},
        }


def _codes(value: Any) -> set[str]:
    if isinstance(value, list):
        return set().union(*(_codes(v) for v in value)) if value else set()
    if isinstance(value, dict):
        if "coding" in value:
            return _codes(value["coding"])
        return {str(value["code"])} if "code" in value else set()
    return {value} if isinstance(value, str) else set()


PROVIDERS: tuple[CareProvider, ...] = (
    CareProvider("Organization/oakwood-care-home", "Oakwood Care Home", "Observation"),
    CareProvider(
        "Organization/high-street-pharmacy",
        "High Street Pharmacy",
        "Observation?category=laboratory",
    ),
    CareProvider("Organization/community-nursing", "Community Nursing Team", "Encounter"),
    CareProvider(
        "Organization/hilltop-hospice", "Hilltop Hospice", "Observation?category=vital-signs"
    ),
    CareProvider("Organization/urgent-care-centre", "Urgent Care Centre", "Encounter?class=EMER"),
)


def _names(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """'William:Bill,Will George' → (('William', ('Bill', 'Will')), ('George', ()))."""
    out = []
    for item in text.split():
        name, _, nicks = item.partition(":")
        out.append((name, tuple(n for n in nicks.split(",") if n)))
    return tuple(out)


# Given names (with the nicknames sources write for them) and family names, roughly in order
# of frequency; draws favour the front of each list.
FEMALE = _names(
    "Olivia:Liv Amelia:Millie Margaret:Maggie,Peggy Elizabeth:Liz,Beth,Betty Sarah Emily:Em "
    "Catherine:Kate,Cathy Susan:Sue Jennifer:Jenny,Jen Rebecca:Becky Isla Grace "
    "Patricia:Pat,Trish Victoria:Vicky,Tori Deborah:Debbie Sophie Charlotte:Lottie Helen "
    "Alexandra:Alex,Sandra Jessica:Jess Priya Aisha Niamh Christine:Chris Joan Eileen "
    "Samantha:Sam Abigail:Abby Fatima Ruby Hannah Freya Doris Zara Siobhan Agnieszka"
)
MALE = _names(
    "Oliver:Ollie George William:Bill,Will,Billy James:Jim,Jamie Thomas:Tom,Tommy "
    "David:Dave Robert:Bob,Rob,Bobby Michael:Mike,Mick Christopher:Chris Richard:Rick,Dick "
    "Harry Jack Anthony:Tony Edward:Ted,Eddie Daniel:Dan,Danny Matthew:Matt Joseph:Joe "
    "Stephen:Steve Andrew:Andy,Drew Peter:Pete Benjamin:Ben Nicholas:Nick Mohammed Arjun "
    "Leo Arthur:Art Noah Kwame Sean Patrick:Paddy,Pat Keith Colin Jonathan:Jon,Jonny "
    "Alexander:Alex,Sandy Piotr"
)
FAMILY: tuple[str, ...] = (
    "Smith", "Jones", "Williams", "Taylor", "Brown", "Davies", "Evans", "Wilson", "Thomas",
    "Johnson", "Roberts", "Robinson", "Thompson", "Wright", "Walker", "White", "Edwards",
    "Hughes", "Green", "Hall", "Lewis", "Harris", "Clarke", "Patel", "Jackson", "Wood",
    "Turner", "Martin", "Cooper", "Hill", "Ward", "Morris", "Moore", "Clark", "Lee", "King",
    "Baker", "Harrison", "Morgan", "Allen", "James", "Scott", "Phillips", "Watson", "Davis",
    "Parker", "Price", "Bennett", "Young", "Griffiths", "Mitchell", "Kelly", "Cook", "Carter",
    "Richardson", "Bailey", "Collins", "Bell", "Shaw", "Murphy", "Miller", "Cox", "Richards",
    "Khan", "Marshall", "Anderson", "Simpson", "Ellis", "Adams", "Singh", "Begum", "Wilkinson",
    "Foster", "Chapman", "Powell", "Webb", "Rogers", "Gray", "Mason", "Ali", "Hunt", "Hussain",
    "Campbell", "Matthews", "Owen", "Palmer", "Holmes", "Mills", "Barnes", "Knight", "Lloyd",
    "Butler", "Russell", "Barker", "Fisher", "Stevens", "Jenkins", "Murray", "Dixon", "Harvey",
    "Okafor", "Nowak", "O'Brien", "McDonald", "Fitzgerald", "Ahmed", "Chowdhury", "Nguyen",
    "Kowalczyk", "Mensah", "Da Silva", "Ó Súilleabháin", "Van der Berg",
)  # fmt: skip
STREETS: tuple[str, ...] = (
    "High Street", "Church Road", "Station Road", "Victoria Road", "Green Lane", "Manor Road",
    "Park Avenue", "Mill Lane", "Queens Road", "New Road", "Kings Road", "The Crescent",
    "London Road", "Orchard Close", "School Lane", "Harbour Way", "Meadow View", "Chapel Street",
)  # fmt: skip
# Postcode districts of the region, by post town.
DISTRICTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Southampton", ("SO14", "SO15", "SO16", "SO17", "SO18", "SO19")),
    ("Bournemouth", ("BH1", "BH6", "BH7", "BH8", "BH9", "BH10")),
    ("Salisbury", ("SP1", "SP2", "SP4", "SP5")),
    ("Winchester", ("SO22", "SO23")),
    ("Basingstoke", ("RG21", "RG22", "RG24")),
)
_UNIT_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"


def _zipf_choice(rng: random.Random, items: Sequence[Any], skew: float = 0.8) -> Any:
    """A draw that favours the front of the list (rank r has weight 1/r^skew)."""
    weights = _ZIPF_CACHE.get((len(items), skew))
    if weights is None:
        weights = [1.0 / (r**skew) for r in range(1, len(items) + 1)]
        _ZIPF_CACHE[(len(items), skew)] = weights
    return rng.choices(items, weights)[0]


_ZIPF_CACHE: dict[tuple[int, float], list[float]] = {}


def nhs_number(rng: random.Random) -> str:
    """A 10-digit NHS number with a valid modulus-11 check digit (tests/support's rule)."""
    while True:
        digits = [rng.randint(0, 9) for _ in range(9)]
        check = 11 - sum(d * (10 - i) for i, d in enumerate(digits)) % 11
        check = 0 if check == 11 else check
        if check != 10:
            return "".join(map(str, digits)) + str(check)


def nhs_number_valid(value: str) -> bool:
    if len(value) != 10 or not value.isdigit():
        return False
    check = 11 - sum(int(d) * (10 - i) for i, d in enumerate(value[:9])) % 11
    check = 0 if check == 11 else check
    return check != 10 and check == int(value[9])


def typo(rng: random.Random, word: str) -> str:
    """One keying error: two letters swapped, one dropped, one doubled or one mistyped.

    The first letter is kept (a clerk rarely gets it wrong), so the result still blocks
    under the same sound; the result always differs from the word.
    """
    if len(word) < 3:
        return word + word[-1]
    for _ in range(8):
        i = rng.randrange(1, len(word) - 1)
        op = rng.randrange(4)
        if op == 0:
            out = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        elif op == 1:
            out = word[:i] + word[i + 1 :]
        elif op == 2:
            out = word[:i] + word[i] + word[i:]
        else:
            out = word[:i] + rng.choice("aeiourstnl") + word[i + 1 :]
        if out != word:
            return out
    return word + word[-1]


def postcode(rng: random.Random) -> tuple[str, str]:
    """(post town, postcode) somewhere in the region."""
    town, districts = _zipf_choice(rng, DISTRICTS, 0.5)
    district = rng.choice(districts)
    unit = f"{rng.randint(1, 9)}{rng.choice(_UNIT_LETTERS)}{rng.choice(_UNIT_LETTERS)}"
    return town, f"{district} {unit}"


def phone(rng: random.Random) -> str:
    return f"07{rng.randint(100, 999)} {rng.randint(100000, 999999)}"


@dataclass(slots=True)
class Demographics:
    """What one source holds about a person (the truth, or a source's version of it)."""

    given: str
    middle: str | None
    family: str
    gender: str
    birth_date: date
    line: str
    town: str
    postcode: str
    phone: str | None
    nhs: str | None

    def copy(self) -> Demographics:
        return Demographics(
            self.given,
            self.middle,
            self.family,
            self.gender,
            self.birth_date,
            self.line,
            self.town,
            self.postcode,
            self.phone,
            self.nhs,
        )


@dataclass(slots=True)
class Person:
    """One real person: the truth, and what each source that knows them holds."""

    index: int
    truth: Demographics
    nicknames: tuple[str, ...]
    denies: frozenset[str] = frozenset()  # recipients the person's consent denies
    records: list[SourceRecord] = field(default_factory=list)


@dataclass(slots=True)
class SourceRecord:
    """A person's record at one source: its local id and its own version of the details."""

    source: Source
    local_id: str
    person: Person
    held: Demographics
    variations: tuple[str, ...] = ()  # how `held` differs from the truth, for the summary

    @property
    def key(self) -> str:
        """The Kafka key a publisher uses: ``<ce_source>|<local patient id>``."""
        return f"{self.source.id}|{self.local_id}"


def _variant(
    rng: random.Random, truth: Demographics, nicknames: Sequence[str], *, keep_nhs: bool
) -> tuple[Demographics, tuple[str, ...]]:
    """A source's version of the truth, with the errors sources make."""
    d = truth.copy()
    what: list[str] = []
    if nicknames and rng.random() < 0.10:
        d.given = rng.choice(nicknames)
        what.append("nickname")
    elif rng.random() < 0.06:
        d.given = typo(rng, d.given)
        what.append("given-typo")
    if rng.random() < 0.06:
        d.family = typo(rng, d.family)
        what.append("family-typo")
    b = d.birth_date
    if b.day <= 12 and b.day != b.month and rng.random() < 0.03:
        d.birth_date = b.replace(day=b.month, month=b.day)
        what.append("day-month-swapped")
    if rng.random() < 0.5:
        d.middle = None
    if rng.random() < 0.08:
        d.town, d.postcode = postcode(rng)
        d.line = f"{rng.randint(1, 180)} {rng.choice(STREETS)}"
        what.append("old-address")
    if rng.random() < 0.30:
        d.phone = None
    if not keep_nhs:
        d.nhs = None
        what.append("no-nhs-number")
    return d, tuple(what)


@dataclass
class Region:
    """The sources, the care providers, the people and their consents — all from a seed."""

    seed: int
    sources: tuple[Source, ...]
    providers: tuple[CareProvider, ...]
    persons: list[Person]

    @classmethod
    def build(
        cls,
        seed: int = DEFAULT_SEED,
        persons: int = 2_000,
        *,
        consent_share: float = 0.20,
        deny_each: float = 0.5,
        no_nhs_share: float = 0.06,
    ) -> Region:
        """`persons` people; `consent_share` of them have a consent that denies each care
        provider with probability `deny_each` (at least one) — about consent_share ×
        deny_each of all deliveries are denied. A hospital record of a person without a
        consent lacks the NHS number with probability `no_nhs_share`; records of people
        with a consent always carry it, so who is denied never depends on probabilistic
        matching."""
        rng = random.Random(seed)
        people: list[Person] = []
        seen_nhs: set[str] = set()
        counters: Counter[str] = Counter()
        for i in range(persons):
            female = rng.random() < 0.51
            given, nicks = _zipf_choice(rng, FEMALE if female else MALE)
            middle, _ = _zipf_choice(rng, FEMALE if female else MALE)
            if middle == given:
                middle = None
            nhs = nhs_number(rng)
            while nhs in seen_nhs:
                nhs = nhs_number(rng)
            seen_nhs.add(nhs)
            town, code = postcode(rng)
            born = date(1930, 1, 1) + timedelta(days=rng.randrange(0, 95 * 365))
            truth = Demographics(
                given=given,
                middle=middle,
                family=_zipf_choice(rng, FAMILY, 0.6),
                gender="female" if female else "male",
                birth_date=born,
                line=f"{rng.randint(1, 180)} {rng.choice(STREETS)}",
                town=town,
                postcode=code,
                phone=phone(rng),
                nhs=nhs,
            )
            denies: frozenset[str] = frozenset()
            if rng.random() < consent_share:
                chosen = [p.recipient for p in PROVIDERS if rng.random() < deny_each]
                denies = frozenset(chosen or [rng.choice(PROVIDERS).recipient])
            person = Person(i, truth, tuple(nicks), denies)
            # Everyone is registered with one GP practice; many are known to a hospital or two.
            hospitals = rng.choices((0, 1, 2), (0.35, 0.45, 0.20))[0]
            at = [rng.choice(PRACTICES), *rng.sample(HOSPITALS, hospitals)]
            for source in at:
                counters[source.id] += 1
                local_id = f"{source.prefix}{counters[source.id] * 7919 % 10_000_000:07d}"
                keep_nhs = bool(denies) or source.kind == "gp" or rng.random() >= no_nhs_share
                held, what = _variant(rng, truth, nicks, keep_nhs=keep_nhs)
                person.records.append(SourceRecord(source, local_id, person, held, what))
            people.append(person)
        return cls(seed, SOURCES, PROVIDERS, people)

    @property
    def records(self) -> list[SourceRecord]:
        return [r for p in self.persons for r in p.records]

    def publishers(self) -> list[dict[str, Any]]:
        """Bodies for POST /admin/publishers."""
        return [s.registration() for s in self.sources]

    def subscriptions(self) -> list[dict[str, Any]]:
        """Bodies for POST /fhir/Subscription."""
        return [p.subscription() for p in self.providers]

    def consents(self) -> list[dict[str, Any]]:
        """Bodies for POST /fhir/Consent: one per person with denies, filed by NHS number."""
        return [
            consent_denying(p.truth.nhs or "", sorted(p.denies)) for p in self.persons if p.denies
        ]

    def summary(self) -> dict[str, Any]:
        records = self.records
        variations = Counter(v for r in records for v in r.variations)
        return {
            "persons": len(self.persons),
            "source_records": len(records),
            "records_per_person": round(len(records) / max(1, len(self.persons)), 2),
            "persons_with_consent": sum(1 for p in self.persons if p.denies),
            "record_variations": dict(sorted(variations.items())),
        }


def consent_denying(nhs: str, recipients: Sequence[str]) -> dict[str, Any]:
    """A patient-privacy Consent, filed by NHS number, denying these recipients."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"identifier": {"system": NHS, "value": nhs}},
        "dateTime": "2025-11-01",
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTOUT"}]},
        "provision": {
            "type": "deny",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                            }
                        ]
                    },
                    "reference": {"reference": r},
                }
                for r in recipients
            ],
        },
    }


# --------------------------------------------------------------------------------------
# What the sources publish
# --------------------------------------------------------------------------------------


def patient_resource(record: SourceRecord, held: Demographics | None = None) -> dict[str, Any]:
    """The FHIR R4 Patient a source publishes (its details now: `held`, else as first
    registered); its local id is Patient.id."""
    d = held or record.held
    identifiers = []
    if d.nhs:
        identifiers.append({"system": NHS, "value": d.nhs})
    identifiers.append(
        {"system": record.source.patient_identifier_system, "value": record.local_id}
    )
    name: dict[str, Any] = {"use": "official", "family": d.family, "given": [d.given]}
    if d.middle:
        name["given"].append(d.middle)
    doc: dict[str, Any] = {
        "resourceType": "Patient",
        "id": record.local_id,
        "identifier": identifiers,
        "active": True,
        "name": [name],
        "gender": d.gender,
        "birthDate": d.birth_date.isoformat(),
        "address": [{"use": "home", "line": [d.line], "city": d.town, "postalCode": d.postcode}],
    }
    if d.phone:
        doc["telecom"] = [{"system": "phone", "value": d.phone, "use": "mobile"}]
    return doc


ENCOUNTER_CLASS = {
    "AMB": "ambulatory",
    "EMER": "emergency",
    "IMP": "inpatient encounter",
    "VR": "virtual",
}
ENCOUNTER_TYPE = {
    "AMB": ("185389009", "Follow-up visit"),
    "EMER": ("50849002", "Emergency room admission"),
    "IMP": ("32485007", "Hospital admission"),
    "VR": ("185317003", "Telephone encounter"),
}
# LOINC code, display, unit, typical value, spread.
LABS: tuple[tuple[str, str, str, float, float], ...] = (
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mmol/L", 5.4, 1.5),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/L", 135.0, 15.0),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "umol/L", 80.0, 20.0),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 139.0, 3.0),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 4.2, 0.4),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 6.0, 1.0),
    ("1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", "mg/L", 8.0, 10.0),
)
VITALS: tuple[tuple[str, str, str, float, float], ...] = (
    ("8867-4", "Heart rate", "/min", 76.0, 12.0),
    ("9279-1", "Respiratory rate", "/min", 16.0, 3.0),
    ("8310-5", "Body temperature", "Cel", 36.9, 0.5),
    ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", 96.0, 2.0),
    ("29463-7", "Body weight", "kg", 75.0, 15.0),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 128.0, 15.0),
)


def _instant(seq: int, offset_s: int = 0) -> str:
    return (EPOCH + timedelta(seconds=seq * 23 + offset_s)).strftime("%Y-%m-%dT%H:%M:%SZ")


def encounter_resource(
    rng: random.Random, record: SourceRecord, seq: int, rid: str
) -> dict[str, Any]:
    if record.source.kind == "hospital":
        cls = rng.choices(("AMB", "EMER", "IMP"), (0.5, 0.3, 0.2))[0]
    else:
        cls = rng.choices(("AMB", "VR"), (0.85, 0.15))[0]
    code, display = ENCOUNTER_TYPE[cls]
    return {
        "resourceType": "Encounter",
        "id": rid,
        "status": "finished",
        "class": {"system": ACT_CODE, "code": cls, "display": ENCOUNTER_CLASS[cls]},
        "type": [{"coding": [{"system": SNOMED, "code": code, "display": display}]}],
        "subject": {"reference": f"Patient/{record.local_id}"},
        "period": {"start": _instant(seq, -rng.randint(600, 14_400)), "end": _instant(seq)},
        "serviceProvider": {
            "reference": f"Organization/{record.source.slug}",
            "display": record.source.name,
        },
    }


def observation_resource(
    rng: random.Random, record: SourceRecord, seq: int, rid: str
) -> dict[str, Any]:
    lab_share = 0.6 if record.source.kind == "hospital" else 0.3
    lab = rng.random() < lab_share
    code, display, unit, mean, spread = rng.choice(LABS if lab else VITALS)
    category = "laboratory" if lab else "vital-signs"
    value = round(max(0.1, rng.gauss(mean, spread)), 1)
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": OBS_CATEGORY,
                        "code": category,
                        "display": "Laboratory" if lab else "Vital Signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{record.local_id}"},
        "effectiveDateTime": _instant(seq, -rng.randint(60, 3600)),
        "issued": _instant(seq),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


@dataclass(frozen=True, slots=True)
class Event:
    """One message a source publishes, with its ground truth."""

    seq: int
    source: str  # ce_source
    local_patient_id: str
    ce_id: str  # unique per source
    change: str  # CloudEvents type: create | update
    resource: dict[str, Any]
    deliveries: tuple[str, ...]  # care providers (recipients) that should receive it
    denied: tuple[str, ...]  # care providers whose criteria match but consent denies

    @property
    def key(self) -> str:
        return f"{self.source}|{self.local_patient_id}"

    @property
    def resource_type(self) -> str:
        return str(self.resource["resourceType"])

    def value(self) -> bytes:
        return orjson.dumps(self.resource)

    def headers(self) -> list[tuple[str, bytes]]:
        """CloudEvents binary-mode headers, as tests/support.Publisher sends them."""
        return [
            ("ce_id", self.ce_id.encode()),
            ("ce_source", self.source.encode()),
            ("ce_type", self.change.encode()),
            ("ce_specversion", b"1.0"),
            ("content-type", b"application/fhir+json"),
        ]


@dataclass(frozen=True)
class Mix:
    """The share of each kind of message (Patients, then Encounters, the rest Observations)."""

    patient: float = 0.30
    encounter: float = 0.25
    # Of the Patient messages while some source records are still unregistered: the share
    # that registers a new one (the rest update a registered record's details).
    registration: float = 0.6


class Traffic:
    """The region's publish events, in an order every source could have produced.

    Deterministic: the same region and seed give the same events, byte for byte.
    """

    def __init__(self, region: Region, seed: int | None = None, mix: Mix = Mix()) -> None:
        self.region = region
        self.mix = mix
        self.rng = random.Random(region.seed + 1 if seed is None else seed)
        self.pending = region.records
        self.rng.shuffle(self.pending)
        self.registered: list[SourceRecord] = []
        # Each record's details as the source holds them now (updates change them here,
        # never in the region, so several Traffic streams over one region do not interfere).
        self.held: dict[str, Demographics] = {}
        self.seq = 0
        self.counts: Counter[str] = Counter()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return self.next_event()

    def take(self, n: int) -> list[Event]:
        return [self.next_event() for _ in range(n)]

    def _ce_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def next_event(self) -> Event:
        rng, mix = self.rng, self.mix
        seq = self.seq
        self.seq += 1
        roll = rng.random()
        if not self.registered or roll < mix.patient:
            if self.pending and (not self.registered or rng.random() < mix.registration):
                record = self.pending.pop()
                self.registered.append(record)
                held = self.held[record.key] = record.held.copy()
                self.counts["patient-registration"] += 1
                return self._event(seq, record, patient_resource(record, held), "create")
            record = rng.choice(self.registered)
            held = self._update(record)
            self.counts["patient-update"] += 1
            return self._event(seq, record, patient_resource(record, held), "update")
        record = rng.choice(self.registered)
        if roll < mix.patient + mix.encounter:
            resource = encounter_resource(rng, record, seq, f"enc-{seq}")
        else:
            resource = observation_resource(rng, record, seq, f"obs-{seq}")
        self.counts[resource["resourceType"]] += 1
        return self._event(seq, record, resource, "create")

    def _update(self, record: SourceRecord) -> Demographics:
        """A demographic update: a new phone, a move, or a corrected name."""
        rng, d = self.rng, self.held[record.key]
        roll = rng.random()
        if roll < 0.5:
            d.phone = phone(rng)
        elif roll < 0.8:
            d.town, d.postcode = postcode(rng)
            d.line = f"{rng.randint(1, 180)} {rng.choice(STREETS)}"
        else:
            d.given, d.family = record.person.truth.given, record.person.truth.family
        return d

    def _event(
        self, seq: int, record: SourceRecord, resource: dict[str, Any], change: str
    ) -> Event:
        matched = [p.recipient for p in self.region.providers if p.wants(resource)]
        denies = record.person.denies
        return Event(
            seq=seq,
            source=record.source.id,
            local_patient_id=record.local_id,
            ce_id=self._ce_id(),
            change=change,
            resource=resource,
            deliveries=tuple(r for r in matched if r not in denies),
            denied=tuple(r for r in matched if r in denies),
        )


def traffic_summary(events: Sequence[Event]) -> dict[str, Any]:
    """Counts by type and the deliveries the events should produce, per care provider."""
    by_type = Counter(e.resource_type for e in events)
    per_provider = Counter(r for e in events for r in e.deliveries)
    denied = Counter(r for e in events for r in e.denied)
    deliveries, refused = sum(per_provider.values()), sum(denied.values())
    return {
        "messages": len(events),
        "by_type": dict(sorted(by_type.items())),
        "patient_share": round(by_type["Patient"] / max(1, len(events)), 3),
        "deliveries": deliveries,
        "denied": refused,
        "denied_share": round(refused / max(1, deliveries + refused), 3),
        "deliveries_by_provider": dict(sorted(per_provider.items())),
        "denied_by_provider": dict(sorted(denied.items())),
        "bytes_mean": round(sum(len(e.value()) for e in events) / max(1, len(events))),
    }


# --------------------------------------------------------------------------------------
# A live feed, and registering the region with a running exchange
# --------------------------------------------------------------------------------------


def live_feed(
    rate: float = 20.0,
    *,
    seed: int = DEFAULT_SEED,
    persons: int = 2_000,
    region: Region | None = None,
    limit: int | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(source, resource)`` at `rate` per second (paced by the monotonic clock),
    forever or `limit` times: what an ``hdx demo``-style ticker publishes.

    Publish each resource to ``hdx.inbound`` with ``ce_source = source`` and key
    ``source|<local patient id>`` (the Patient's id, or the ``subject`` reference's).
    """
    traffic = Traffic(region or Region.build(seed, persons))
    interval = 1.0 / rate if rate > 0 else 0.0
    due = time.monotonic()
    sent = 0
    while limit is None or sent < limit:
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        event = traffic.next_event()
        yield event.source, event.resource
        sent += 1
        due += interval


async def alive_feed(
    rate: float = 20.0,
    *,
    seed: int = DEFAULT_SEED,
    persons: int = 2_000,
    region: Region | None = None,
    limit: int | None = None,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """`live_feed` for asyncio: sleeps with asyncio.sleep between events."""
    traffic = Traffic(region or Region.build(seed, persons))
    interval = 1.0 / rate if rate > 0 else 0.0
    loop = asyncio.get_running_loop()
    due = loop.time()
    sent = 0
    while limit is None or sent < limit:
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        event = traffic.next_event()
        yield event.source, event.resource
        sent += 1
        due += interval


def key_of(source: str, resource: dict[str, Any]) -> str:
    """The Kafka key for a resource from `live_feed`: ``source|<local patient id>``."""
    if resource.get("resourceType") == "Patient":
        return f"{source}|{resource['id']}"
    ref = str((resource.get("subject") or {}).get("reference", ""))
    return f"{source}|{ref.removeprefix('Patient/')}"


@dataclass(frozen=True)
class Seeded:
    publishers: int
    subscriptions: dict[str, str]  # recipient → Subscription id
    consents: int
    seconds: float


async def seed_region(
    region: Region,
    exchange_url: str,
    consent_url: str,
    *,
    auth: Any = None,
    concurrency: int = 8,
) -> Seeded:
    """Register the region with running services over their HTTP APIs: the publishers and
    the care providers' Subscriptions (exchange), and the patients' consents (consent).
    `auth`: an httpx auth with the admin scope (e.g. LocalStack.admin_auth())."""
    import httpx

    started = time.perf_counter()
    fhir = {"content-type": "application/fhir+json"}
    async with httpx.AsyncClient(timeout=30, auth=auth) as client:
        for body in region.publishers():
            r = await client.post(f"{exchange_url}/admin/publishers", json=body)
            r.raise_for_status()
        subs: dict[str, str] = {}
        for provider in region.providers:
            r = await client.post(
                f"{exchange_url}/fhir/Subscription",
                content=orjson.dumps(provider.subscription()),
                headers=fhir,
            )
            r.raise_for_status()
            subs[provider.recipient] = str(r.json()["id"])
        consents = region.consents()
        gate = asyncio.Semaphore(concurrency)

        async def post(doc: dict[str, Any]) -> None:
            async with gate:
                resp = await client.post(
                    f"{consent_url}/fhir/Consent", content=orjson.dumps(doc), headers=fhir
                )
                if resp.status_code != 201:
                    raise RuntimeError(f"consent not stored ({resp.status_code}): {resp.text}")

        await asyncio.gather(*(post(doc) for doc in consents))
    return Seeded(len(region.sources), subs, len(consents), time.perf_counter() - started)


if __name__ == "__main__":  # a quick look: python bench/generator.py
    import json

    demo_region = Region.build(DEFAULT_SEED, 2_000)
    sample = Traffic(demo_region).take(20_000)
    print(
        json.dumps({"region": demo_region.summary(), "traffic": traffic_summary(sample)}, indent=2)
    )
    print(json.dumps(sample[-1].resource, indent=2))
