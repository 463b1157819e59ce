"""Consent decision benchmark: the real index, policy and `decide` over a realistic population.

Builds 100,000 patients with a seeded, realistic consent mix, loads their consents into
`hdx_consent.domain.ConsentIndex` and the opt-out register into `Policy`, then decides a
stream of realistic requests exactly as the gate does (index look-up by person id and
trusted identifier, then `decide`). It reports

- throughput: decisions per second over the whole stream (no per-decision timer);
- latency: p50/p95/p99/max per decision, each timed with time.perf_counter_ns;

against the targets (≥ 50,000 decisions/s, p99 < 1 ms), and writes the figures with the
machine's details to bench/results/consent-<timestamp>.json and consent-latest.json.

Run: `make bench-consent` or `.venv/bin/python bench/consent_bench.py [--help]`.
Speed is measured here, never asserted by a timed test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hdx_consent.domain import (
    ConsentIndex,
    DecisionRequest,
    Policy,
    decide,
    opt_out_register,
    parse_consent,
)
from hdx_consent.examples import consent, provision

TARGET_RATE = 50_000  # decisions per second
TARGET_P99_NS = 1_000_000  # 1 ms

NHS = "https://fhir.nhs.uk/Id/nhs-number"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
RESULTS = Path(__file__).resolve().parent / "results"

# The recipients subscribing in this population: a GP practice, a care home, two hospitals,
# a community pharmacy and a research network (which asks for HRESCH).
GP = "Organization/gp-riverside"
CARE_HOME = "Organization/oakwood-care-home"
HOSPITAL = "Organization/st-marys"
HOSPITAL2 = "Organization/riverside-hospital"
PHARMACY = "Organization/high-street-pharmacy"
RESEARCH = "Organization/research-network"
CARE_RECIPIENTS = (GP, CARE_HOME, HOSPITAL, HOSPITAL2, PHARMACY)

# The share of patients in each consent profile (the rest have no consent at all).
MIX: dict[str, float] = {
    "opt-out register": 0.030,
    "opt-out register by NHS number": 0.010,
    "deny a recipient": 0.050,
    "research opt-in": 0.040,
    "deny a recipient + research opt-in": 0.010,
    "nested provisions": 0.030,
    "sensitive-label permit": 0.020,
    "expired": 0.015,
    "inactive": 0.015,
    "filed by NHS number": 0.010,
}


@dataclass(frozen=True, slots=True)
class Population:
    index: ConsentIndex
    policy: Policy
    persons: tuple[str, ...]
    nhs: tuple[str, ...]
    profile_counts: dict[str, int]
    consents: int
    build_seconds: float


def _nhs_number(n: int) -> str:
    return f"9{n:09d}"


def _consents_for(profile: str, person: str, nhs: str, rng: random.Random) -> list[dict[str, Any]]:
    """The FHIR Consent documents a patient of this profile has filed."""
    ref = f"Patient/{person}"
    if profile == "deny a recipient":
        return [consent(provision("deny", actor=[rng.choice(CARE_RECIPIENTS)]), patient=ref)]
    if profile == "research opt-in":
        return [
            consent(
                provision("permit", purpose=["HRESCH"], actor=[RESEARCH], action=["access"]),
                patient=ref,
                policy_rule="OPTIN",
            )
        ]
    if profile == "deny a recipient + research opt-in":
        return [
            *_consents_for("deny a recipient", person, nhs, rng),
            *_consents_for("research opt-in", person, nhs, rng),
        ]
    if profile == "nested provisions":
        # Deny everything, except direct care to the GP and the hospital — but never their
        # mental-health Conditions, and nothing at all for one recipient in a given year.
        return [
            consent(
                provision(
                    "deny",
                    provisions=[
                        provision(
                            "permit",
                            actor=[GP, HOSPITAL],
                            purpose=["TREAT", "ETREAT"],
                            provisions=[
                                provision("deny", cls=["Condition"], label=["PSY"]),
                                provision(
                                    "deny",
                                    actor=[HOSPITAL],
                                    period=("2025-01-01", "2025-12-31"),
                                ),
                            ],
                        ),
                        provision(
                            "permit", cls=["Observation"], code=[("http://loinc.org", "2345-7")]
                        ),
                    ],
                ),
                patient=ref,
            )
        ]
    if profile == "sensitive-label permit":
        label = rng.choice(("PSY", "HIV", "SUD", "R"))
        return [
            consent(
                provision(
                    "permit",
                    provisions=[
                        provision("permit", actor=[GP, rng.choice(CARE_RECIPIENTS)], label=[label])
                    ],
                ),
                patient=ref,
            )
        ]
    if profile == "expired":
        return [
            consent(
                provision(
                    "deny",
                    actor=[rng.choice(CARE_RECIPIENTS)],
                    period=("2020-01-01", "2024-12-31"),
                ),
                patient=ref,
            )
        ]
    if profile == "inactive":
        return [
            consent(
                provision("deny", actor=[rng.choice(CARE_RECIPIENTS)]),
                patient=ref,
                status=rng.choice(("inactive", "rejected", "draft")),
            )
        ]
    if profile == "filed by NHS number":
        # A consent recorded before the patient index knew the person: filed by identifier.
        return [
            consent(
                provision("deny", actor=[rng.choice(CARE_RECIPIENTS)], purpose=["TREAT"]),
                patient=None,
                identifier=(NHS, nhs),
            )
        ]
    return []


def build(patients: int, seed: int) -> Population:
    """Seeded patients, their consents parsed and indexed, the opt-out register parsed."""
    rng = random.Random(seed)
    started = time.perf_counter()
    profiles = list(MIX)
    weights = [*MIX.values(), 1.0 - sum(MIX.values())]
    index = ConsentIndex()
    register: list[str] = ["# national opt-out register (benchmark)"]
    counts: Counter[str] = Counter()
    persons, nhs_numbers = [], []
    consents = 0
    for n in range(patients):
        person = f"person-{n:06d}"
        nhs = _nhs_number(n)
        persons.append(person)
        nhs_numbers.append(nhs)
        profile = rng.choices([*profiles, "no consent"], weights)[0]
        counts[profile] += 1
        if profile == "opt-out register":
            register.append(person)
        elif profile == "opt-out register by NHS number":
            register.append(f"{NHS}|{nhs}  # added by the NHS spine")
        for doc in _consents_for(profile, person, nhs, rng):
            consents += 1
            index.put(parse_consent(doc, consent_id=f"c{consents}", version=1))
    policy = Policy(opt_out=opt_out_register(register))
    return Population(
        index=index,
        policy=policy,
        persons=tuple(persons),
        nhs=tuple(nhs_numbers),
        profile_counts=dict(counts),
        consents=consents,
        build_seconds=time.perf_counter() - started,
    )


def requests(pop: Population, count: int, seed: int) -> list[DecisionRequest]:
    """Requests as the router's candidates produce them: mostly direct care to the care
    recipients, some research, a little emergency care (some breaking the glass), a few
    sensitive or unlabelled resources, and a few people the patient index has not linked."""
    rng = random.Random(seed)
    types = ("Observation", "Observation", "Observation", "Encounter", "Condition")
    out: list[DecisionRequest] = []
    for i in range(count):
        n = rng.randrange(len(pop.persons))
        roll = rng.random()
        if roll < 0.78:
            purpose, recipient = "TREAT", rng.choice(CARE_RECIPIENTS)
        elif roll < 0.95:
            purpose, recipient = "HRESCH", RESEARCH
        else:
            purpose, recipient = "ETREAT", rng.choice((HOSPITAL, HOSPITAL2))
        label_roll = rng.random()
        labels: frozenset[str]
        if label_roll < 0.70:
            labels = frozenset()
        elif label_roll < 0.92:
            labels = frozenset({"N"})
        else:
            labels = frozenset({rng.choice(("PSY", "HIV", "SUD", "R", "V"))})
        rtype = rng.choice(types)
        unlinked = rng.random() < 0.01
        out.append(
            DecisionRequest(
                person=None if unlinked else pop.persons[n],
                recipient=recipient,
                purpose=purpose,
                resource_type=rtype,
                at=NOW + timedelta(milliseconds=i),
                # An unlinked person is looked up by NHS number; a few have none either.
                identifiers=() if unlinked and i % 5 == 0 else (f"{NHS}|{pop.nhs[n]}",),
                security_labels=labels,
                break_glass_reason="unconscious in A&E"
                if purpose == "ETREAT" and rng.random() < 0.3
                else None,
                codes=frozenset({"2345-7", "http://loinc.org|2345-7"})
                if rtype == "Observation"
                else frozenset(),
                resource_ref=f"{rtype}/r{i}",
            )
        )
    return out


def _decide_all(
    index: ConsentIndex, policy: Policy, reqs: Sequence[DecisionRequest]
) -> tuple[int, Counter[str]]:
    permits = 0
    basis: Counter[str] = Counter()
    for r in reqs:
        d = decide(index.for_person(r.person, r.identifiers), policy, r)
        permits += d.permit
        basis[f"{d.decision}:{d.basis.value}"] += 1
    return permits, basis


def throughput(pop: Population, reqs: Sequence[DecisionRequest]) -> tuple[float, int, Counter[str]]:
    """Decisions per second over the whole stream (index look-up + decide, as the gate)."""
    started = time.perf_counter_ns()
    permits, basis = _decide_all(pop.index, pop.policy, reqs)
    elapsed = time.perf_counter_ns() - started
    return len(reqs) / (elapsed / 1e9), permits, basis


def latencies(pop: Population, reqs: Sequence[DecisionRequest]) -> list[int]:
    """Nanoseconds per decision (index look-up + decide), each timed on its own."""
    index, policy, clock = pop.index, pop.policy, time.perf_counter_ns
    out = [0] * len(reqs)
    for i, r in enumerate(reqs):
        t0 = clock()
        decide(index.for_person(r.person, r.identifiers), policy, r)
        out[i] = clock() - t0
    return out


def percentile(sorted_ns: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of already-sorted values."""
    if not sorted_ns:
        return 0
    rank = max(1, min(len(sorted_ns), round(q / 100 * len(sorted_ns) + 0.5)))
    return sorted_ns[rank - 1]


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=200_000, help="per measured run")
    parser.add_argument("--seed", type=int, default=20250601)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON")
    parser.add_argument(
        "--fail-on-miss", action="store_true", help="exit 1 when a target is missed"
    )
    args = parser.parse_args(argv)

    print(f"building {args.patients:,} patients (seed {args.seed}) …", flush=True)
    pop = build(args.patients, args.seed)
    with_consent = sum(v for k, v in pop.profile_counts.items() if k != "no consent")
    print(
        f"  {pop.consents:,} consents indexed for {with_consent:,} patients, "
        f"{len(pop.policy.opt_out):,} on the opt-out register ({pop.build_seconds:.1f}s)"
    )
    for name, count in sorted(pop.profile_counts.items(), key=lambda kv: -kv[1]):
        print(f"    {name:<36} {count:>7,}")

    reqs = requests(pop, args.decisions, args.seed + 1)
    _decide_all(pop.index, pop.policy, reqs[: min(20_000, len(reqs))])  # warm up

    gc.collect()
    gc.disable()  # measure the decisions, not a collection the build left behind
    try:
        rate, permits, basis = throughput(pop, reqs)
        lat = sorted(latencies(pop, reqs))
    finally:
        gc.enable()

    p50, p95, p99 = (percentile(lat, q) for q in (50, 95, 99))
    figures = {
        "decisions_per_second": round(rate),
        "latency_ns": {
            "p50": p50,
            "p95": p95,
            "p99": p99,
            "max": lat[-1] if lat else 0,
            "mean": round(sum(lat) / len(lat)) if lat else 0,
        },
        "permits": permits,
        "denies": len(reqs) - permits,
        "by_outcome": dict(sorted(basis.items())),
    }
    meets = {"rate": rate >= TARGET_RATE, "p99": p99 < TARGET_P99_NS}

    print(f"\n{len(reqs):,} decisions ({permits:,} permit, {len(reqs) - permits:,} deny)")
    for k, v in sorted(basis.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<36} {v:>7,}")
    verdict = {True: "ok", False: "MISSED"}
    print(
        f"throughput  {rate:>12,.0f} decisions/s   target ≥ {TARGET_RATE:,}  "
        f"[{verdict[meets['rate']]}]"
    )
    print(
        f"latency     p50 {p50 / 1000:.1f} µs   p95 {p95 / 1000:.1f} µs   "
        f"p99 {p99 / 1000:.1f} µs   max {lat[-1] / 1000:.1f} µs   target p99 < "
        f"{TARGET_P99_NS / 1e6:.0f} ms  [{verdict[meets['p99']]}]"
    )

    stamp = datetime.now(UTC)
    result = {
        "benchmark": "consent-decision",
        "timestamp": stamp.isoformat(timespec="seconds"),
        "command": "make bench-consent",
        "machine": machine(),
        "config": {
            "patients": args.patients,
            "decisions": len(reqs),
            "seed": args.seed,
            "consents": pop.consents,
            "opt_out_register": len(pop.policy.opt_out),
            "profiles": dict(sorted(pop.profile_counts.items())),
            "build_seconds": round(pop.build_seconds, 2),
        },
        "targets": {"decisions_per_second": TARGET_RATE, "p99_ns": TARGET_P99_NS},
        "results": figures,
        "meets_targets": meets,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"consent-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    text = json.dumps(result, indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
    (args.out / "consent-latest.json").write_text(text, encoding="utf-8")
    print(f"\nwrote {path} (and consent-latest.json)")
    return 1 if args.fail_on_miss and not all(meets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
