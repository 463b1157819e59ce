"""Blocking: the cheap keys that decide which pairs are compared at all.

A record is compared only with persons that share at least one key with it. The keys are
chosen so that each kind of error one field can carry leaves another key intact:

- ``d:<birth date>``              — names typed differently, same birth date
- ``s:<soundex(family)>:<year>``  — birth date typed wrong, family name sounds the same
- ``n:<metaphone(given)>:<metaphone(family)>`` — birth date missing or wrong entirely; a
  nickname is filed under the formal names it stands for as well ('tony' under 'anthony'),
  so 'Tony Smith' and 'Anthony Smith' meet without a birth date (as the comparator knows)
- ``p:<postcode>:<given initial>`` — family name changed and birth date typed wrong
- ``t:<phone>``                   — same phone line
- ``a:<address line>``            — same house, postcode typed wrong or missing
- ``i:<system>|<value>``          — the same untrusted identifier (a hospital number)

and, kept apart from those (`keyed_keys`, filed by `PersonIndex` on their own):

- ``k:<system>|<value less one character>`` — untrusted identifiers one keying error
  apart (a digit typed wrong, two adjacent digits swapped: what the comparator's
  one-digit level is): the value's deletion neighbourhood, one key per position, so two
  values one substitution or one adjacent swap apart share a key; only values at least
  ``MIN_KEYED_LENGTH`` long, as the comparator counts only those. Values that share a
  variant without being one keying error apart ('1234567' and '2345678') are not
  candidates: the index checks the values before the pair is weighed.

Queries add variants that an index key cannot hold: the birth date with day and month
swapped, and the family names a person was known by before (maiden names).
"""

from __future__ import annotations

from datetime import date
from functools import lru_cache

from hdx_patient_index.domain.comparators import MIN_KEYED_LENGTH, metaphone, soundex
from hdx_patient_index.domain.demographics import Demographics
from hdx_patient_index.domain.normalise import compact, given_name_forms


def _swapped(d: date) -> date | None:
    if d.day > 12 or d.day == d.month:
        return None
    try:
        return d.replace(month=d.day, day=d.month)
    except ValueError:
        return None


def deletion_neighbourhood(value: str) -> set[str]:
    """The value with one character left out, at each position: two values of one length
    one substitution apart share the variant without that position, and two one adjacent
    swap apart share the variant without either swapped character."""
    return {value[:i] + value[i + 1 :] for i in range(len(value))}


@lru_cache(maxsize=65_536)
def _keyed_variants(system: str, value: str) -> tuple[str, ...]:
    """The ``k:`` keys of one identifier (each record's are built twice: to file it and to
    look its candidates up)."""
    if len(value) < MIN_KEYED_LENGTH:
        return ()
    return tuple(f"k:{system}|{variant}" for variant in deletion_neighbourhood(value))


def index_keys(d: Demographics) -> frozenset[str]:
    """The blocking keys a record is filed under."""
    keys: set[str] = set()
    if d.birth_date:
        keys.add(f"d:{d.birth_date.isoformat()}")
    if d.family and d.birth_year:
        keys.add(f"s:{soundex(compact(d.family))}:{d.birth_year}")
    if d.family and d.first_given:
        family = metaphone(compact(d.family))
        keys.update(f"n:{metaphone(g)}:{family}" for g in given_name_forms(d.first_given))
    if d.first_given:
        # Not the bare postcode: ~15 households share one, so its block would be most of
        # the comparisons while finding almost nothing the other keys miss.
        keys.update(f"p:{p}:{d.first_given[0]}" for p in d.postcodes)
    keys.update(f"t:{p}" for p in d.phones)
    keys.update(f"a:{compact(line)}" for line in d.addresses if " " in line)
    keys.update(f"i:{i.system}|{i.value}" for i in d.identifiers if i.system)
    return frozenset(keys)


def keyed_keys(d: Demographics) -> frozenset[str]:
    """The ``k:`` keys of a record's untrusted identifiers (their deletion neighbourhoods):
    filed and looked up alike, since the neighbourhood is symmetric."""
    keys: set[str] = set()
    for i in d.identifiers:
        if i.system:
            keys.update(_keyed_variants(i.system, i.value))
    return frozenset(keys)


def query_keys(d: Demographics) -> frozenset[str]:
    """The keys to look a record's candidates up by: its own keys plus likely variants."""
    keys = set(index_keys(d))
    if d.birth_date and (swapped := _swapped(d.birth_date)):
        keys.add(f"d:{swapped.isoformat()}")
    if d.birth_year:
        keys.update(f"s:{soundex(compact(f))}:{d.birth_year}" for f in d.other_families)
    if d.family and d.first_given:
        # Family and given name swapped.
        keys.add(f"n:{metaphone(compact(d.family))}:{metaphone(d.first_given)}")
    return frozenset(keys)
