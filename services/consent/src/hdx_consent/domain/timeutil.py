"""FHIR date/dateTime/instant values as UTC intervals (no framework imports)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def _next_month(year: int, month: int) -> datetime:
    return datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)


def fhir_interval(value: str) -> tuple[datetime, datetime]:
    """The instants a FHIR date/dateTime covers: [start, end) in UTC.

    "2024" covers the whole year, "2024-03" the month, "2024-03-05" the day (read as UTC),
    and a full dateTime one instant (end = start + 1 µs). ValueError if it is not FHIR.
    """
    m = _PARTIAL.match(value)
    if m:
        year, month, day = int(m[1]), m[2], m[3]
        if month is None:
            return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
        mon = int(month)
        if day is None:
            return datetime(year, mon, 1, tzinfo=UTC), _next_month(year, mon)
        start = datetime(year, mon, int(day), tzinfo=UTC)
        return start, start + timedelta(days=1)
    if "T" not in value:
        raise ValueError(f"'{value}' is not a FHIR date or dateTime")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"'{value}' has a time but no time zone; FHIR requires one")
    start = parsed.astimezone(UTC)
    return start, start + timedelta(microseconds=1)


def fhir_instant(at: datetime) -> str:
    """An aware datetime as a FHIR instant, UTC, millisecond precision."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
