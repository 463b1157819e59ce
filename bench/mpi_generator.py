"""A hard, seeded, multi-source FHIR patient set with known truth, for bench/mpi_bench.py.

People live in households (a UK-style address, postcode and landline); each person is known
at one to five *sources* (two hospitals, two GP practices, a community pharmacy), and each
source holds its own version of them as a FHIR R4 Patient. What goes wrong between sources,
per record, with the rates below (`Errors`):

- typing errors in names (one insertion, deletion, substitution or swap), nicknames
  (from this module's own table, which is *not* the matcher's), a middle name used as the
  first, diacritics dropped (Zoë → Zoe), family and given name swapped;
- surnames: double-barrelled ones written whole, with a space, or as either half; married
  women known by their maiden name at sources that registered them before the marriage
  (some of those keep the maiden name as a second HumanName);
- birth dates: day and month swapped, one digit wrong, missing;
- addresses: people who moved (sources that have not caught up keep the old address),
  typos in the street line and postcode, missing addresses and phones;
- NHS numbers: missing at many sources (A&E, pharmacy), and keyed with one digit wrong or two
  digits swapped (the modulus-11 check then fails, so the number is not trusted);
- duplicate registrations within one source (a second local id for the same person).

Hard negatives — pairs of *different* people that look alike — are built in and listed:

- twins: same surname, birth date, address and phone, different given names;
- parent and child with the same given and family name at one address ("junior");
- namesakes: very common names (Zipf-distributed: "smith" ~2 % of people), and pairs given
  the same common name *and* birth date in different households.

Everything is a pure function of the seed. Truth (which person each record is) is kept
beside the resources, never in them.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
DEFAULT_SEED = 20_260_105
REFERENCE_DATE = date(2026, 1, 1)

# ---------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------

FAMILY: tuple[str, ...] = (
    "smith",
    "jones",
    "williams",
    "taylor",
    "brown",
    "davies",
    "evans",
    "wilson",
    "thomas",
    "johnson",
    "roberts",
    "robinson",
    "thompson",
    "wright",
    "walker",
    "white",
    "edwards",
    "hughes",
    "green",
    "hall",
    "lewis",
    "harris",
    "clarke",
    "patel",
    "jackson",
    "wood",
    "turner",
    "martin",
    "cooper",
    "hill",
    "ward",
    "morris",
    "moore",
    "clark",
    "lee",
    "king",
    "baker",
    "harrison",
    "morgan",
    "allen",
    "james",
    "scott",
    "phillips",
    "watson",
    "davis",
    "parker",
    "price",
    "bennett",
    "young",
    "griffiths",
    "mitchell",
    "kelly",
    "cook",
    "carter",
    "richardson",
    "bailey",
    "collins",
    "bell",
    "shaw",
    "murphy",
    "miller",
    "cox",
    "richards",
    "khan",
    "marshall",
    "anderson",
    "simpson",
    "ellis",
    "adams",
    "singh",
    "begum",
    "wilkinson",
    "foster",
    "chapman",
    "powell",
    "webb",
    "rogers",
    "gray",
    "mason",
    "ali",
    "hunt",
    "hussain",
    "campbell",
    "matthews",
    "owen",
    "palmer",
    "holmes",
    "mills",
    "barnes",
    "knight",
    "lloyd",
    "butler",
    "russell",
    "barker",
    "fisher",
    "stevens",
    "jenkins",
    "murray",
    "dixon",
    "harvey",
    "graham",
    "pearson",
    "ahmed",
    "fletcher",
    "walsh",
    "kaur",
    "gibson",
    "howard",
    "andrews",
    "stewart",
    "elliott",
    "reynolds",
    "saunders",
    "payne",
    "fox",
    "ford",
    "pearce",
    "day",
    "brooks",
    "west",
    "lawrence",
    "cole",
    "atkinson",
    "bradley",
    "spencer",
    "gill",
    "dawson",
    "ball",
    "burton",
    "o'brien",
    "watts",
    "rose",
    "booth",
    "perry",
    "ryan",
    "grant",
    "wells",
    "armstrong",
    "francis",
    "rees",
    "hayes",
    "hart",
    "hudson",
    "newman",
    "barrett",
    "webster",
    "hunter",
    "gregory",
    "carr",
    "lowe",
    "page",
    "marsh",
    "riley",
    "dunn",
    "woods",
    "parsons",
    "berry",
    "stone",
    "reid",
    "holland",
    "hawkins",
    "harding",
    "porter",
    "robertson",
    "newton",
    "oliver",
    "reed",
    "kennedy",
    "williamson",
    "bird",
    "gardner",
    "shah",
    "dean",
    "lane",
    "cooke",
    "bates",
    "henderson",
    "parry",
    "burgess",
    "bishop",
    "walton",
    "burns",
    "nicholson",
    "shepherd",
    "ross",
    "cross",
    "long",
    "freeman",
    "warren",
    "nicholls",
    "hamilton",
    "byrne",
    "sutton",
    "mcdonald",
    "yates",
    "hodgson",
    "robson",
    "curtis",
    "hopkins",
    "o'connor",
    "harper",
    "coleman",
    "watkins",
    "moss",
    "mccarthy",
    "chambers",
    "o'neill",
    "griffin",
    "sharp",
    "hardy",
    "wheeler",
    "potter",
    "osborne",
    "johnston",
    "gordon",
    "doyle",
    "wallace",
    "george",
    "jordan",
    "hutchinson",
    "rowe",
    "burke",
    "may",
    "pritchard",
    "gilbert",
    "willis",
    "higgins",
    "read",
    "miles",
    "stevenson",
    "stephenson",
    "hammond",
    "arnold",
    "buckley",
    "walters",
    "hewitt",
    "barber",
    "nelson",
    "slater",
    "austin",
    "sullivan",
    "whitehead",
    "mann",
    "frost",
    "lambert",
    "stephens",
    "blake",
    "akhtar",
    "lynch",
    "goodwin",
    "barton",
    "woodward",
    "thomson",
    "cunningham",
    "quinn",
    "barnett",
    "baxter",
    "bibi",
    "clayton",
    "nash",
    "greenwood",
    "jennings",
    "holt",
    "kemp",
    "poole",
    "gallagher",
    "bond",
    "stokes",
    "tucker",
    "davidson",
    "fowler",
    "heath",
    "norman",
    "middleton",
    "lawson",
    "banks",
    "french",
    "stanley",
    "jarvis",
    "gibbs",
    "ferguson",
    "hayward",
    "carroll",
    "douglas",
    "dickinson",
    "todd",
    "barlow",
    "peters",
    "lucas",
    "knowles",
    "hartley",
    "miah",
    "simmons",
    "morton",
    "alexander",
    "field",
)
# Names with diacritics or other scripts' letters, used for a share of people.
FAMILY_ACCENTED: tuple[str, ...] = (
    "müller",
    "núñez",
    "garcía",
    "fernández",
    "gonzález",
    "lópez",
    "pérez",
    "sánchez",
    "martínez",
    "rodríguez",
    "kowalski",
    "wiśniewski",
    "wójcik",
    "nowak",
    "søndergaard",
    "ångström",
    "björk",
    "østergaard",
    "françois",
    "lefèvre",
    "dubois",
    "mercier",
    "côté",
    "ó'súilleabháin",
    "nic",
    "giolla",
    "yılmaz",
    "öztürk",
    "çelik",
    "şahin",
    "dvořák",
    "novák",
    "černý",
    "horváth",
)
GIVEN_F: tuple[str, ...] = (
    "olivia",
    "amelia",
    "isla",
    "ava",
    "mia",
    "ivy",
    "lily",
    "isabella",
    "rosie",
    "sophia",
    "grace",
    "freya",
    "willow",
    "florence",
    "emily",
    "ella",
    "poppy",
    "evie",
    "elsie",
    "charlotte",
    "evelyn",
    "sienna",
    "sofia",
    "daisy",
    "phoebe",
    "sophie",
    "alice",
    "harper",
    "matilda",
    "ruby",
    "emilia",
    "maya",
    "ada",
    "hannah",
    "jessica",
    "sarah",
    "emma",
    "laura",
    "rebecca",
    "elizabeth",
    "margaret",
    "catherine",
    "katherine",
    "mary",
    "susan",
    "patricia",
    "jennifer",
    "linda",
    "barbara",
    "deborah",
    "amanda",
    "victoria",
    "natasha",
    "samantha",
    "rachel",
    "helen",
    "claire",
    "nicola",
    "louise",
    "joanne",
    "julie",
    "karen",
    "lisa",
    "michelle",
    "kelly",
    "donna",
    "angela",
    "dawn",
    "tracey",
    "jacqueline",
    "alison",
    "gillian",
    "abigail",
    "eleanor",
    "harriet",
    "frances",
    "stephanie",
    "christine",
    "janet",
    "valerie",
    "pamela",
)
GIVEN_M: tuple[str, ...] = (
    "muhammad",
    "noah",
    "oliver",
    "george",
    "leo",
    "arthur",
    "oscar",
    "harry",
    "freddie",
    "theodore",
    "jack",
    "charlie",
    "henry",
    "archie",
    "alfie",
    "thomas",
    "william",
    "jacob",
    "james",
    "joshua",
    "samuel",
    "daniel",
    "benjamin",
    "joseph",
    "edward",
    "alexander",
    "michael",
    "david",
    "richard",
    "robert",
    "john",
    "christopher",
    "matthew",
    "andrew",
    "peter",
    "stephen",
    "paul",
    "mark",
    "anthony",
    "kevin",
    "gary",
    "ian",
    "simon",
    "neil",
    "jonathan",
    "timothy",
    "nicholas",
    "philip",
    "patrick",
    "gregory",
    "lawrence",
    "raymond",
    "kenneth",
    "ronald",
    "donald",
    "douglas",
    "stuart",
    "gerald",
    "frederick",
    "dominic",
    "sebastian",
    "zachary",
    "nathaniel",
    "lewis",
    "adam",
    "ryan",
    "luke",
    "callum",
    "connor",
    "kieran",
)
GIVEN_ACCENTED_F: tuple[str, ...] = (
    "zoë",
    "chloé",
    "renée",
    "anaïs",
    "siobhán",
    "aoife",
    "niamh",
    "léa",
    "maría",
    "josé",
    "maría",
)
GIVEN_ACCENTED_M: tuple[str, ...] = (
    "josé",
    "andré",
    "rené",
    "søren",
    "björn",
    "françois",
    "jürgen",
    "łukasz",
    "ángel",
    "seán",
)

# This generator's own nicknames (formal → what a source may have typed). Deliberately not
# the matcher's table: some of these it knows, some it does not.
NICKNAMES = {
    "william": ["bill", "will", "billy", "liam"],
    "robert": ["bob", "rob", "bobby", "robbie"],
    "richard": ["rich", "dick", "rick", "richie"],
    "james": ["jim", "jimmy", "jamie"],
    "john": ["jack", "johnny"],
    "margaret": ["maggie", "peggy", "meg", "madge"],
    "elizabeth": ["liz", "beth", "lizzie", "betty", "libby", "eliza"],
    "catherine": ["kate", "cathy", "katie", "cath"],
    "katherine": ["kate", "kathy", "katie", "kat"],
    "alexander": ["alex", "sandy", "xander"],
    "christopher": ["chris", "kit"],
    "michael": ["mike", "mick", "mikey"],
    "thomas": ["tom", "tommy"],
    "edward": ["ed", "ted", "eddie", "ned"],
    "anthony": ["tony", "ant"],
    "daniel": ["dan", "danny"],
    "samuel": ["sam", "sammy"],
    "benjamin": ["ben", "benny", "benji"],
    "joseph": ["joe", "joey"],
    "matthew": ["matt", "matty"],
    "andrew": ["andy", "drew"],
    "nicholas": ["nick", "nicky"],
    "jonathan": ["jon", "jonny"],
    "timothy": ["tim", "timmy"],
    "patricia": ["pat", "trish", "patsy"],
    "jennifer": ["jen", "jenny"],
    "rebecca": ["becky", "becca"],
    "victoria": ["vicky", "tori"],
    "samantha": ["sam", "sammy"],
    "deborah": ["debbie", "deb"],
    "susan": ["sue", "susie"],
    "amanda": ["mandy"],
    "jessica": ["jess", "jessie"],
    "abigail": ["abby", "abbie"],
    "eleanor": ["ellie", "nell"],
    "charlotte": ["lottie", "charlie"],
    "frederick": ["fred", "freddie"],
    "theodore": ["theo", "ted"],
    "gregory": ["greg"],
    "lawrence": ["larry", "laurie"],
    "kenneth": ["ken", "kenny"],
    "ronald": ["ron", "ronnie"],
    "donald": ["don", "donny"],
    "douglas": ["doug", "dougie"],
    "stephen": ["steve", "stevie"],
    "philip": ["phil", "pip"],
    "patrick": ["pat", "paddy"],
    "isabella": ["bella", "izzy", "issy"],
    "sophia": ["sophie"],
    "natasha": ["tash", "tasha"],
    "gillian": ["gill", "jill"],
    "harriet": ["hattie", "harry"],
    "jacqueline": ["jackie", "jacqui"],
    "christine": ["chris", "chrissie"],
    "pamela": ["pam"],
    "valerie": ["val"],
    "frances": ["fran", "frankie"],
    "zachary": ["zach", "zac"],
    "sebastian": ["seb"],
    "dominic": ["dom"],
    "nathaniel": ["nat", "nate"],
    "muhammad": ["mohammed", "mohammad", "mo"],
}

STREETS: tuple[str, ...] = (
    "high street",
    "station road",
    "church lane",
    "main street",
    "park road",
    "victoria road",
    "green lane",
    "manor road",
    "church street",
    "park avenue",
    "the avenue",
    "queens road",
    "new road",
    "grange road",
    "kings road",
    "north street",
    "springfield road",
    "mill lane",
    "school lane",
    "alexandra road",
    "york road",
    "west street",
    "richmond road",
    "the crescent",
    "windsor road",
    "george street",
    "albert road",
    "london road",
    "chestnut close",
    "orchard way",
    "meadow view",
    "beech grove",
    "cedar drive",
    "elm terrace",
    "willow court",
    "hawthorn crescent",
    "oak place",
    "birch gardens",
    "maple square",
    "rowan close",
)
TOWNS = {
    # town: postcode area and districts
    "leeds": ("LS", 30),
    "bradford": ("BD", 24),
    "manchester": ("M", 40),
    "sheffield": ("S", 36),
    "york": ("YO", 32),
    "hull": ("HU", 20),
    "harrogate": ("HG", 5),
    "wakefield": ("WF", 17),
}
ABBREVIATE = {"street": "st", "road": "rd", "avenue": "ave", "lane": "ln", "close": "cl"}


# ---------------------------------------------------------------------------------------
# Rates
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Errors:
    """Per-record error and omission rates (documented, fixed: never fitted to a result)."""

    family_typo: float = 0.04
    given_typo: float = 0.04
    nickname: float = 0.10  # when the given name has one
    middle_as_first: float = 0.02
    names_swapped: float = 0.01
    drop_diacritics: float = 0.5  # when the name has any
    day_month_swap: float = 0.03  # when the day is ≤ 12
    date_digit: float = 0.03
    date_missing: float = 0.02
    gender_missing: float = 0.03
    address_missing: float = 0.06
    address_typo: float = 0.05
    address_abbreviated: float = 0.3
    postcode_typo: float = 0.03
    phone_missing: float = 0.35
    nhs_keying_error: float = 0.04
    duplicate_registration: float = 0.02  # a second local id at the same source


@dataclass(frozen=True)
class SourceProfile:
    id: str
    nhs_rate: float  # share of its records carrying the NHS number
    stale: float  # chance its record keeps an old address / maiden name after a change
    keeps_maiden: float  # chance a married name comes with the maiden name as well
    errors_scale: float  # multiplies the typing-error rates


SOURCES: tuple[SourceProfile, ...] = (
    SourceProfile("urn:hdx:org:st-marys", 0.55, 0.5, 0.3, 1.0),  # hospital, A&E heavy
    SourceProfile("urn:hdx:org:riverside", 0.65, 0.5, 0.3, 1.0),  # hospital
    SourceProfile("urn:hdx:org:gp-high-street", 0.90, 0.15, 0.6, 0.6),  # GP
    SourceProfile("urn:hdx:org:gp-meadows", 0.90, 0.15, 0.6, 0.6),  # GP
    SourceProfile("urn:hdx:org:pharmacy-quay", 0.30, 0.6, 0.0, 1.6),  # pharmacy
)
# How many sources know a person: 1 to 5.
SOURCES_PER_PERSON = ((1, 0.20), (2, 0.35), (3, 0.25), (4, 0.12), (5, 0.08))


# ---------------------------------------------------------------------------------------
# People
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    line: str
    town: str
    postcode: str


@dataclass(frozen=True)
class Person:
    id: str
    given: str
    middle: str | None
    family: str
    gender: str
    birth_date: date
    nhs: str
    address: Address
    old_address: Address | None = None  # before a move
    maiden: str | None = None  # family name before a marriage
    phone: str | None = None
    mobile: str | None = None


@dataclass(frozen=True)
class SourceRecord:
    source: str
    local_id: str
    person: str  # truth
    resource: dict[str, Any]


@dataclass(frozen=True)
class HardNegative:
    a: str
    b: str
    kind: str  # twin | parent-child | namesake


@dataclass
class Dataset:
    persons: list[Person]
    records: list[SourceRecord]
    hard_negatives: list[HardNegative] = field(default_factory=list)


def _zipf(rng: random.Random, items: Sequence[str], s: float = 0.9) -> str:
    # Inverse-CDF sampling over ranks 1..n with weight rank^-s (cached per list length).
    key = (len(items), s)
    cdf = _CDF_CACHE.get(key)
    if cdf is None:
        weights = [1.0 / (r**s) for r in range(1, len(items) + 1)]
        total = sum(weights)
        acc, cdf = 0.0, []
        for w in weights:
            acc += w / total
            cdf.append(acc)
        _CDF_CACHE[key] = cdf
    x = rng.random()
    lo, hi = 0, len(cdf) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cdf[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return items[lo]


_CDF_CACHE: dict[tuple[int, float], list[float]] = {}


def nhs_number(rng: random.Random) -> str:
    """A random NHS number with a valid modulus-11 check digit."""
    while True:
        digits = [rng.randrange(10) for _ in range(9)]
        check = 11 - sum(d * w for d, w in zip(digits, range(10, 1, -1), strict=True)) % 11
        if check == 11:
            check = 0
        if check != 10:
            return "".join(map(str, digits)) + str(check)


def _postcode(rng: random.Random, town: str) -> str:
    area, districts = TOWNS[town]
    return (
        f"{area}{rng.randint(1, districts)} "
        f"{rng.randint(1, 9)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"
        f"{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"
    )


def _address(rng: random.Random) -> Address:
    town = rng.choice(list(TOWNS))
    street = rng.choice(STREETS)
    return Address(f"{rng.randint(1, 240)} {street}", town, _postcode(rng, town))


def _landline(rng: random.Random) -> str:
    return f"0113 {rng.randint(200, 999)} {rng.randint(1000, 9999)}"


def _mobile(rng: random.Random) -> str:
    return f"07{rng.randint(100, 999)} {rng.randint(100000, 999999)}"


def _birth(rng: random.Random, low: int, high: int) -> date:
    """A birth date for someone aged between low and high years on REFERENCE_DATE."""
    start = REFERENCE_DATE - timedelta(days=int(365.25 * high))
    end = REFERENCE_DATE - timedelta(days=int(365.25 * low))
    return start + timedelta(days=rng.randrange(max((end - start).days, 1)))


# The long tail of surnames: most people do not have one of the few hundred commonest.
_TAIL_HEADS = [
    "ash",
    "black",
    "brad",
    "brook",
    "cald",
    "crom",
    "dal",
    "east",
    "fair",
    "green",
    "hart",
    "hol",
    "kings",
    "lang",
    "mar",
    "mid",
    "north",
    "old",
    "pen",
    "rad",
    "ross",
    "shel",
    "stan",
    "thorn",
    "wal",
    "west",
    "whit",
    "wood",
    "york",
    "bram",
]
_TAIL_ENDS = [
    "worth",
    "ley",
    "ton",
    "field",
    "ford",
    "by",
    "well",
    "wood",
    "ham",
    "more",
    "dale",
    "shaw",
    "bury",
    "stead",
    "wick",
    "cott",
    "hurst",
    "man",
    "son",
    "ridge",
]
FAMILY_TAIL: tuple[str, ...] = tuple(h + e for h in _TAIL_HEADS for e in _TAIL_ENDS)


def _given(rng: random.Random, female: bool) -> str:
    if rng.random() < 0.04:
        return rng.choice(GIVEN_ACCENTED_F if female else GIVEN_ACCENTED_M)
    return _zipf(rng, GIVEN_F if female else GIVEN_M, 0.5)


def _common_family(rng: random.Random) -> str:
    """60 % from the commonest names (Zipf, "smith" ≈ 2 % of everyone), 40 % from a long
    tail of 600 rarer ones."""
    if rng.random() < 0.6:
        return _zipf(rng, FAMILY, 0.5)
    return rng.choice(FAMILY_TAIL)


def _family(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.05:
        return rng.choice(FAMILY_ACCENTED)
    if r < 0.08:  # double-barrelled
        a, b = _common_family(rng), _common_family(rng)
        return f"{a}-{b}" if a != b else a
    return _common_family(rng)


def _typo_distance(a: str, b: str) -> int:
    """Damerau–Levenshtein distance (small strings; for keeping twins' names apart)."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


class _People:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.persons: list[Person] = []
        self.negatives: list[HardNegative] = []
        self.nhs_seen: set[str] = set()

    def _nhs(self) -> str:
        while (n := nhs_number(self.rng)) in self.nhs_seen:
            pass
        self.nhs_seen.add(n)
        return n

    def add(self, **kw: Any) -> Person:
        rng = self.rng
        female = kw.pop("female")
        given = kw.pop("given", None) or _given(rng, female)
        middle = kw.pop("middle", "?")
        if middle == "?":
            middle = _given(rng, female) if rng.random() < 0.5 else None
        if middle == given:
            middle = None
        p = Person(
            id=f"person-{len(self.persons):06d}",
            given=given,
            middle=middle,
            gender="female" if female else "male",
            nhs=self._nhs(),
            mobile=_mobile(rng) if rng.random() < 0.6 else None,
            **kw,
        )
        self.persons.append(p)
        return p

    def household(self) -> None:
        rng = self.rng
        home = _address(rng)
        moved = rng.random() < 0.25
        old = _address(rng) if moved else None
        phone = _landline(rng) if rng.random() < 0.5 else None
        common = {"address": home, "old_address": old, "phone": phone}
        kind = rng.random()
        family = _family(rng)
        if kind < 0.32:  # one adult
            female = rng.random() < 0.5
            self.add(female=female, family=family, birth_date=_birth(rng, 18, 95), **common)
            return
        # A couple; she took his name at marriage in ~60 % of couples.
        him = self.add(female=False, family=family, birth_date=_birth(rng, 22, 90), **common)
        maiden = _family(rng)
        married = rng.random() < 0.6 and maiden != family
        her_family = family if married else maiden
        self.add(
            female=True,
            family=her_family,
            maiden=maiden if married else None,
            birth_date=_birth(rng, 20, 88),
            **common,
        )
        if kind < 0.55:
            return
        # Children (some households: a son named after his father; some: twins).
        n_children = rng.choice((1, 1, 2, 2, 3))
        parent_age = (REFERENCE_DATE - him.birth_date).days // 365
        young, old_age = 0, max(min(parent_age - 18, 40), 1)
        if rng.random() < 0.05 and old_age > 1:
            junior = self.add(
                female=False,
                given=him.given,
                middle=him.middle,
                family=family,
                birth_date=_birth(rng, young, old_age),
                **common,
            )
            self.negatives.append(HardNegative(him.id, junior.id, "parent-child"))
        if rng.random() < 0.06:
            born = _birth(rng, young, old_age)
            first_female = rng.random() < 0.5
            second_female = first_female if rng.random() < 0.6 else not first_female
            a = self.add(female=first_female, family=family, birth_date=born, **common)
            while True:
                name = _given(rng, second_female)
                if _typo_distance(name, a.given) > 1:
                    break
            b = self.add(female=second_female, given=name, family=family, birth_date=born, **common)
            self.negatives.append(HardNegative(a.id, b.id, "twin"))
        for _ in range(n_children):
            self.add(
                female=rng.random() < 0.5,
                family=family,
                birth_date=_birth(rng, young, old_age),
                **common,
            )

    def namesakes(self, share: float) -> None:
        """Pairs of people with a very common name and the same birth date, elsewhere."""
        rng = self.rng
        for _ in range(int(len(self.persons) * share)):
            female = rng.random() < 0.5
            given = (GIVEN_F if female else GIVEN_M)[rng.randrange(5)]
            family = FAMILY[rng.randrange(5)]
            born = _birth(rng, 18, 90)
            pair = [
                self.add(
                    female=female,
                    given=given,
                    family=family,
                    birth_date=born,
                    address=_address(rng),
                    phone=_landline(rng) if rng.random() < 0.5 else None,
                )
                for _ in range(2)
            ]
            self.negatives.append(HardNegative(pair[0].id, pair[1].id, "namesake"))


# ---------------------------------------------------------------------------------------
# What a source holds
# ---------------------------------------------------------------------------------------


def _typo(rng: random.Random, text: str) -> str:
    letters = list(text)
    if len(letters) < 2:
        return text
    i = rng.randrange(len(letters) - 1)
    op = rng.random()
    if op < 0.3:
        letters[i] = rng.choice(string.ascii_lowercase)
    elif op < 0.55:
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
    elif op < 0.8:
        del letters[i]
    else:
        letters.insert(i, rng.choice(string.ascii_lowercase))
    return "".join(letters)


def _strip_diacritics(text: str) -> str:
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _styled(rng: random.Random, name: str) -> str:
    """How a source capitalises: Title, UPPER, or lower."""
    r = rng.random()
    if r < 0.6:
        return " ".join(w[:1].upper() + w[1:] for w in name.split(" "))
    return name.upper() if r < 0.85 else name


def _keying_error(rng: random.Random, digits: str) -> str:
    d = list(digits)
    i = rng.randrange(len(d) - 1)
    if rng.random() < 0.5:
        d[i] = str((int(d[i]) + rng.randint(1, 9)) % 10)
    elif d[i] != d[i + 1]:
        d[i], d[i + 1] = d[i + 1], d[i]
    else:
        d[i] = str((int(d[i]) + 1) % 10)
    return "".join(d)


def _date_digit(rng: random.Random, born: date) -> str:
    text = born.strftime("%Y%m%d")
    for _ in range(20):
        i = rng.choice((2, 3, 5, 6, 7))
        wrong = text[:i] + str(rng.randrange(10)) + text[i + 1 :]
        try:
            d = date(int(wrong[:4]), int(wrong[4:6]), int(wrong[6:]))
        except ValueError:
            continue
        if d != born:
            return d.isoformat()
    return born.isoformat()


def source_record(
    rng: random.Random,
    person: Person,
    source: SourceProfile,
    local_id: str,
    errors: Errors,
) -> dict[str, Any]:
    """The FHIR Patient ``source`` holds about ``person``."""
    e, k = errors, source.errors_scale
    given, middle = person.given, person.middle
    if given in NICKNAMES and rng.random() < e.nickname:
        given = rng.choice(NICKNAMES[given])
    elif middle and rng.random() < e.middle_as_first:
        given, middle = middle, None
    if rng.random() < e.given_typo * k:
        given = _typo(rng, given)
    stale = rng.random() < source.stale
    family = person.family
    other_names: list[dict[str, Any]] = []
    if person.maiden:
        if stale:
            family = person.maiden
        elif rng.random() < source.keeps_maiden:
            other_names.append({"use": "maiden", "family": _styled(rng, person.maiden)})
    if "-" in family:
        a, b = family.split("-", 1)
        family = rng.choice((family, family, f"{a} {b}", a, b))
    if rng.random() < e.family_typo * k:
        family = _typo(rng, family)
    if rng.random() < e.drop_diacritics:
        given, family = _strip_diacritics(given), _strip_diacritics(family)
    if rng.random() < e.names_swapped:
        given, family = family, given
    name: dict[str, Any] = {
        "use": "official",
        "family": _styled(rng, family),
        "given": [_styled(rng, given)] + ([_styled(rng, middle)] if middle else []),
    }
    doc: dict[str, Any] = {"resourceType": "Patient", "id": local_id}
    identifiers = [{"system": f"{source.id}:mrn", "value": local_id}]
    if rng.random() < source.nhs_rate:
        nhs = person.nhs
        if rng.random() < e.nhs_keying_error:
            nhs = _keying_error(rng, nhs)
        identifiers.insert(0, {"system": NHS_SYSTEM, "value": nhs})
    doc["identifier"] = identifiers
    doc["name"] = [name, *other_names]
    if rng.random() >= e.gender_missing:
        doc["gender"] = person.gender
    born = person.birth_date
    r = rng.random()
    if r < e.date_missing:
        pass
    elif r < e.date_missing + e.day_month_swap * k and born.day <= 12 and born.day != born.month:
        doc["birthDate"] = date(born.year, born.day, born.month).isoformat()
    elif r < e.date_missing + (e.day_month_swap + e.date_digit) * k:
        doc["birthDate"] = _date_digit(rng, born)
    else:
        doc["birthDate"] = born.isoformat()
    address = person.old_address if (person.old_address and stale) else person.address
    if rng.random() >= e.address_missing:
        line = address.line
        if rng.random() < e.address_abbreviated:
            words = line.split(" ")
            line = " ".join(ABBREVIATE.get(w, w) for w in words)
        if rng.random() < e.address_typo * k:
            line = _typo(rng, line)
        postcode = address.postcode
        if rng.random() < e.postcode_typo * k:
            postcode = _typo(rng, postcode.replace(" ", "")).upper()
        doc["address"] = [
            {
                "use": "home",
                "line": [_styled(rng, line)],
                "city": _styled(rng, address.town),
                "postalCode": postcode if rng.random() < 0.5 else postcode.lower(),
            }
        ]
    telecom = []
    phone = person.phone if rng.random() >= e.phone_missing else None
    mobile = person.mobile if rng.random() >= e.phone_missing else None
    if phone:
        telecom.append({"system": "phone", "use": "home", "value": phone})
    if mobile:
        telecom.append({"system": "phone", "use": "mobile", "value": mobile})
    if telecom:
        doc["telecom"] = telecom
    return doc


def generate(
    persons: int = 4_000,
    seed: int = DEFAULT_SEED,
    errors: Errors | None = None,
    namesake_share: float = 0.01,
) -> Dataset:
    """About ``persons`` people (households are filled whole) and their source records,
    shuffled into one arrival order."""
    errors = errors or Errors()
    rng = random.Random(seed)
    people = _People(rng)
    while len(people.persons) < persons:
        people.household()
    people.namesakes(namesake_share)
    records: list[SourceRecord] = []
    local_ids: Iterator[int] = iter(range(10_000_000, 99_999_999, 7919))
    counts = [n for n, _ in SOURCES_PER_PERSON]
    weights = [w for _, w in SOURCES_PER_PERSON]
    for person in people.persons:
        n = rng.choices(counts, weights)[0]
        for source in rng.sample(SOURCES, n):
            copies = 2 if rng.random() < errors.duplicate_registration else 1
            for _ in range(copies):
                local = f"{next(local_ids)}"
                doc = source_record(rng, person, source, local, errors)
                records.append(SourceRecord(source.id, local, person.id, doc))
    rng.shuffle(records)
    return Dataset(people.persons, records, people.negatives)


def population(persons: int, seed: int = DEFAULT_SEED) -> Dataset:
    """``persons`` people with one record each (one source's view, few errors): the
    standing population of an index, for latency measurements."""
    quiet = replace(
        Errors(),
        family_typo=0.01,
        given_typo=0.01,
        nickname=0.02,
        date_digit=0.005,
        day_month_swap=0.005,
    )
    rng = random.Random(seed)
    people = _People(rng)
    while len(people.persons) < persons:
        people.household()
    source = SOURCES[2]
    records = [
        SourceRecord(
            source.id, f"L{i:07d}", p.id, source_record(rng, p, source, f"L{i:07d}", quiet)
        )
        for i, p in enumerate(people.persons[:persons])
    ]
    return Dataset(people.persons[:persons], records, people.negatives)
