"""Summarise a py-spy profile (collapsed stacks, ``--format raw``) of an HDX service.

`bench/exchange_bench.py --profile exchange` records one per service into
bench/results/profiles/; this prints where the samples went:

- by area: each sample's innermost frame, grouped by what owns its file (fhir.resources and
  pydantic validation, the stdlib json parser, SQLAlchemy, the database drivers, aiokafka,
  faststream, asyncio, prometheus_client, HDX's own code, …);
- by function, inclusive: the share of samples with that function anywhere on the stack —
  read it as "time spent in this call and everything it calls";
- by function, self: the innermost frames.

Run: `.venv/bin/python bench/profile_summary.py bench/results/profiles/exchange-….txt`
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# (area, substrings of a frame's file path), first match wins.
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fhir.resources / pydantic (validation)", ("fhir/resources", "fhir_core", "pydantic")),
    ("stdlib json (strict parser)", ("json/",)),
    ("SQLAlchemy / SQLModel", ("sqlalchemy", "sqlmodel")),
    ("database driver (sqlite3, psycopg)", ("sqlite3", "psycopg")),
    ("aiokafka (client)", ("aiokafka",)),
    ("faststream", ("faststream",)),
    ("prometheus_client", ("prometheus_client",)),
    ("opentelemetry", ("opentelemetry",)),
    ("asyncio / threads", ("asyncio/", "threading.py", "concurrent/", "selectors.py")),
    ("uuid / hashlib", ("uuid.py", "hashlib")),
    ("logging / structlog", ("logging/", "structlog")),
    ("uvicorn / starlette / fastapi", ("uvicorn", "starlette", "fastapi", "anyio")),
    ("HDX shared (envelope, messaging, fhir)", ("hdx_shared",)),
    ("HDX patient index", ("hdx_patient_index",)),
    ("HDX consent", ("hdx_consent",)),
    ("HDX exchange", ("hdx_exchange",)),
    ("dataclasses / typing / enum", ("dataclasses.py", "typing.py", "enum.py")),
)
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True, slots=True)
class Frame:
    func: str
    file: str

    @property
    def label(self) -> str:
        return f"{self.func} ({self.file})"

    @property
    def area(self) -> str:
        for area, needles in AREAS:
            if any(n in self.file for n in needles):
                return area
        return f"other ({self.file.split('/')[0] or '?'})"


def parse_frame(text: str) -> Frame:
    m = FRAME.match(text.strip())
    if not m:
        return Frame(text.strip(), "?")
    return Frame(m["func"], m["file"])


def read_stacks(path: Path) -> list[tuple[list[Frame], int]]:
    stacks: list[tuple[list[Frame], int]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [parse_frame(f) for f in stack.split(";")]
        # `--threads` and `--idle` prefixes are not frames of code.
        frames = [f for f in frames if f.file != "?" or f.func.startswith("<")]
        stacks.append((frames, int(count)))
    return stacks


@dataclass
class Summary:
    total: int
    areas: Counter[str]
    inclusive: Counter[str]
    self_time: Counter[str]


def summarise(stacks: Iterable[tuple[list[Frame], int]]) -> Summary:
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total = 0
    for frames, count in stacks:
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        areas[leaf.area] += count
        self_time[leaf.label] += count
        for label in {f.label for f in frames}:
            inclusive[label] += count
    return Summary(total, areas, inclusive, self_time)


def render(summary: Summary, top: int = 30) -> str:
    out: list[str] = [f"{summary.total:,} samples"]

    def table(title: str, counter: Counter[str], n: int) -> None:
        out.append("")
        out.append(title)
        for label, count in counter.most_common(n):
            out.append(f"  {count / summary.total:>6.1%}  {label}")

    table("by area (innermost frame)", summary.areas, len(summary.areas))
    table("by function, inclusive", summary.inclusive, top)
    table("by function, self", summary.self_time, top)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    for path in args.profiles:
        print(f"== {path}")
        print(render(summarise(read_stacks(path)), args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
