"""Normalisation of the demographic values the matcher compares.

Everything here is a pure function of its input: case and diacritics are folded, punctuation
is dropped, common nicknames map to their formal given names, postcodes and phone numbers
are reduced to the characters that carry meaning.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# Letters NFKD does not decompose into a base letter plus combining marks.
_TRANSLITERATE = str.maketrans(
    {
        "ß": "ss",
        "æ": "ae",
        "Æ": "AE",
        "œ": "oe",
        "Œ": "OE",
        "ø": "o",
        "Ø": "O",
        "ł": "l",
        "Ł": "L",
        "đ": "d",
        "Đ": "D",
        "ð": "d",
        "Ð": "D",
        "þ": "th",
        "Þ": "TH",
        "ı": "i",
    }
)
# Dropped without a trace (O'Brien → obrien, St. John → st john); other punctuation splits.
_DROPPED = re.compile(r"['’‘`´.]")
_SEPARATORS = re.compile(r"[^0-9a-z]+")


def fold(text: str) -> str:
    """Case- and diacritic-insensitive form: 'Zoë Ångström' → 'zoe angstrom'."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_TRANSLITERATE))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


@lru_cache(maxsize=65_536)
def name_tokens(text: str) -> tuple[str, ...]:
    """The words of a name, folded: "O'Brien-Smith" → ('obrien', 'smith')."""
    return tuple(t for t in _SEPARATORS.split(_DROPPED.sub("", fold(text))) if t)


def normalise_name(text: str | None) -> str | None:
    """A name as one comparable string, words joined by single spaces; None if nothing is left."""
    if text is None:
        return None
    tokens = name_tokens(text)
    return " ".join(tokens) if tokens else None


def compact(name: str) -> str:
    """A normalised name without spaces, so 'de la cruz' and 'delacruz' agree exactly."""
    return name.replace(" ", "")


# Common English nicknames and short forms → the formal given names they stand for. A name
# may stand for several (alex → alexander, alexandra), so agreement is "the sets overlap".
NICKNAMES: dict[str, frozenset[str]] = {
    k: frozenset(v.split())
    for k, v in {
        "abby": "abigail",
        "abe": "abraham",
        "al": "albert alfred alan alexander",
        "alex": "alexander alexandra alexis",
        "alf": "alfred",
        "alfie": "alfred",
        "andy": "andrew",
        "annie": "ann anne anna",
        "archie": "archibald",
        "bart": "bartholomew",
        "becky": "rebecca",
        "ben": "benjamin",
        "benny": "benjamin",
        "bert": "albert herbert robert",
        "bess": "elizabeth",
        "beth": "elizabeth bethany",
        "betty": "elizabeth",
        "bill": "william",
        "billy": "william",
        "bob": "robert",
        "bobby": "robert",
        "cathy": "catherine cathleen",
        "charlie": "charles charlotte",
        "chris": "christopher christine christina",
        "chuck": "charles",
        "dan": "daniel",
        "danny": "daniel",
        "dave": "david",
        "davy": "david",
        "debbie": "deborah",
        "dick": "richard",
        "don": "donald",
        "doug": "douglas",
        "ed": "edward edwin edmund",
        "eddie": "edward edwin edmund",
        "ellie": "eleanor elizabeth ellen",
        "fred": "frederick alfred",
        "freddie": "frederick alfred",
        "gabe": "gabriel",
        "gerry": "gerald geraldine gerard",
        "greg": "gregory",
        "hal": "henry harold",
        "hank": "henry",
        "harry": "henry harold",
        "jack": "john",
        "jackie": "jacqueline john",
        "jake": "jacob",
        "jamie": "james",
        "jan": "janet janice",
        "jen": "jennifer",
        "jenny": "jennifer",
        "jerry": "gerald jeremy",
        "jim": "james",
        "jimmy": "james",
        "jo": "joanna joanne josephine",
        "joe": "joseph",
        "joey": "joseph",
        "johnny": "john",
        "jon": "jonathan john",
        "josh": "joshua",
        "kate": "katherine catherine kathleen",
        "kath": "katherine catherine kathleen",
        "kathy": "katherine catherine kathleen",
        "katie": "katherine catherine kathleen",
        "ken": "kenneth",
        "kim": "kimberley kimberly",
        "larry": "lawrence laurence",
        "len": "leonard",
        "lenny": "leonard",
        "leo": "leonard leonardo",
        "liz": "elizabeth",
        "lizzie": "elizabeth",
        "maggie": "margaret",
        "mandy": "amanda",
        "matt": "matthew",
        "meg": "margaret",
        "mick": "michael",
        "mike": "michael",
        "mikey": "michael",
        "molly": "mary",
        "nan": "ann anne nancy",
        "nat": "nathan nathaniel natalie",
        "ned": "edward",
        "nick": "nicholas",
        "nicky": "nicholas nicola",
        "nikki": "nicola nicole",
        "ollie": "oliver olivia",
        "pam": "pamela",
        "pat": "patrick patricia",
        "patsy": "patricia",
        "peggy": "margaret",
        "pete": "peter",
        "phil": "philip phillip",
        "polly": "mary",
        "rich": "richard",
        "rick": "richard",
        "ricky": "richard",
        "rob": "robert",
        "robbie": "robert",
        "ron": "ronald",
        "ronnie": "ronald",
        "sal": "sally sarah",
        "sally": "sarah",
        "sam": "samuel samantha",
        "sammy": "samuel samantha",
        "sandy": "alexander sandra",
        "steve": "steven stephen",
        "sue": "susan suzanne",
        "susie": "susan suzanne",
        "ted": "edward theodore",
        "teddy": "edward theodore",
        "terry": "terence teresa",
        "tom": "thomas",
        "tommy": "thomas",
        "tony": "anthony",
        "trish": "patricia",
        "val": "valerie",
        "vicky": "victoria",
        "vince": "vincent",
        "walt": "walter",
        "will": "william",
        "willy": "william",
        "zach": "zachary",
        # Added with the measured benchmark (bench/mpi_generator.py draws from a separate list).
        "abbie": "abigail",
        "ali": "alison alistair alice",
        "bella": "isabella isabel arabella",
        "cassie": "cassandra",
        "dom": "dominic",
        "fran": "frances francesca",
        "gill": "gillian",
        "hattie": "harriet",
        "izzy": "isabel isabella",
        "jess": "jessica",
        "jules": "julia julian juliet",
        "kit": "christopher katherine",
        "lexi": "alexandra",
        "libby": "elizabeth",
        "lottie": "charlotte",
        "maddie": "madeleine madison",
        "millie": "amelia mildred",
        "nell": "eleanor helen",
        "rosie": "rose rosemary",
        "sasha": "alexander alexandra",
        "seb": "sebastian",
        "sophie": "sophia",
        "stu": "stuart stewart",
        "tash": "natasha",
        "theo": "theodore",
        "tilly": "matilda",
        "tim": "timothy",
        "wes": "wesley",
    }.items()
}


@lru_cache(maxsize=65_536)
def given_name_forms(name: str) -> frozenset[str]:
    """A normalised given name and the formal names it may stand for."""
    return frozenset({name}) | NICKNAMES.get(name, frozenset())


# A UK inward code: the last three characters, digit then two letters (SW1A 1AA → 1AA).
_UK_INWARD = re.compile(r"[0-9][A-Z]{2}$")


def normalise_postcode(text: str | None) -> str | None:
    """Upper case, letters and digits only: 'sw1a 1aa' → 'SW1A1AA'."""
    if text is None:
        return None
    pc = "".join(c for c in fold(text).upper() if c.isalnum())
    return pc or None


def postcode_district(postcode: str) -> str | None:
    """The outward code of a UK postcode ('SW1A1AA' → 'SW1A'); None for other formats."""
    if len(postcode) >= 5 and _UK_INWARD.search(postcode):
        return postcode[:-3]
    return None


def normalise_phone(text: str | None) -> str | None:
    """Digits only, in national form where the country is recognisable (+44 20… → 020…).

    The last ten digits are kept: that is what identifies a line across the ways people
    write it (with or without the trunk 0 or the country code). Under seven digits is noise.
    """
    if text is None:
        return None
    digits = "".join(c for c in text if c.isascii() and c.isdigit())
    if digits.startswith("00"):
        digits = digits[2:]
    if digits.startswith("44") and len(digits) == 12:
        digits = "0" + digits[2:]
    if len(digits) < 7:
        return None
    return digits[-10:]


# Street-type words in the short form people and systems most often write them.
_STREET_WORDS = {
    "street": "st",
    "road": "rd",
    "avenue": "ave",
    "av": "ave",
    "lane": "ln",
    "drive": "dr",
    "close": "cl",
    "crescent": "cres",
    "cresent": "cres",
    "place": "pl",
    "court": "ct",
    "terrace": "tce",
    "square": "sq",
    "gardens": "gdns",
    "circuit": "cct",
    "parade": "pde",
    "highway": "hwy",
}


@lru_cache(maxsize=65_536)
def normalise_address_line(text: str | None) -> str | None:
    """An address line's words, folded, street types abbreviated: '12 Station Road.' →
    '12 station rd'; None if nothing is left."""
    if text is None:
        return None
    tokens = [_STREET_WORDS.get(t, t) for t in name_tokens(text)]
    return " ".join(tokens) if tokens else None


@lru_cache(maxsize=65_536)
def split_house_number(line: str) -> tuple[str, str]:
    """('12a', 'station rd') from '12a station rd'; ('', line) when there is no number."""
    head, _, rest = line.partition(" ")
    if rest and any(c.isdigit() for c in head):
        return head, rest
    return "", line
