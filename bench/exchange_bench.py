"""End-to-end benchmark of the whole exchange: three services, a real broker, real traffic.

Starts the embedded broker and the three services as separate processes
(`hdx_shared.devstack.LocalStack`, SQLite — or PostgreSQL with ``--postgres``), registers a
synthetic region over the services' HTTP APIs (10 hospitals and GP practices, 5 care
providers' Subscriptions, the patients' consents: `bench/generator.py`), then

1. **throughput** — publishes N messages (default 50,000) to ``hdx.inbound`` as fast as a
   batched confluent-kafka producer can, and measures messages/s from the first publish
   to the last delivery on the care providers' feeds (``hdx.feed.<subscriber>``), knowing
   from the generator's ground truth exactly which deliveries to expect;
2. **latency** — publishes at a fixed rate (default 1,000 messages/s for 20 s) and
   measures p50/p95/p99 from each message's publish to its notification's arrival on a
   feed (and, from the ``hdx_received_at`` header, ingress → feed);
3. **cost** — CPU seconds per 1,000 messages and peak RSS (sampled every 100 ms) for each
   service, the broker and this driver; per-stage handling time from each service's
   ``/metrics``;
4. **ceiling** — the same two phases through a bare aiokafka consume → produce relay
   (`bench/ceiling.py`) on the same broker, reported as HDX / ceiling.

It checks the deliveries as it goes: every expected notification arrived, none twice,
and none that a consent denied. Results are printed and written to
bench/results/exchange-<timestamp>.json and exchange-latest.json (or
exchange-postgres-…). The targets (≥ 5,000 messages/s, p99 < 50 ms at 1,000/s, peak RSS
< 300 MiB per service) are reported against, never asserted.

Run: `make bench` (`make bench-postgres`), or
`.venv/bin/python bench/exchange_bench.py --messages 3000 --rate-seconds 5` for a quick
look. `--profile exchange` (or patient-index, consent; comma-separated) records a py-spy
profile of that service during the throughput phase (bench/results/profiles/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import psutil  # type: ignore[import-untyped,unused-ignore]
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined,unused-ignore]

# bench/ is the script's directory, so the generator imports as a top-level module.
from generator import DEFAULT_SEED, Event, Region, Traffic, seed_region, traffic_summary

from hdx_exchange.settings import parse_stages
from hdx_shared.devstack import LocalStack
from hdx_shared.envelope import derive_event_id
from hdx_shared.topics import Topics

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SERVICES = ("exchange", "patient-index", "consent")

TARGET_RATE = 5_000  # messages per second, sustained
TARGET_P99_MS = 50.0  # at 1,000 messages per second
TARGET_RSS_MIB = 300.0  # peak, per service
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"

Identity = tuple[str, str]  # (topic, ce_id) of a delivered record


def log(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------
# Measuring processes
# --------------------------------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, all processes)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0))


class ProcessMonitor:
    """CPU time on demand and RSS every `interval` seconds for the named processes."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.procs: dict[str, psutil.Process] = {}
        self.groups: dict[str, str] = {}  # name → command-line text, summed (no RSS)
        self.peak: dict[str, int] = {}  # over the whole run
        self.phase_peak: dict[str, int] = {}
        self._cpu_last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self.procs[name] = psutil.Process(pid)

    def watch_group(self, name: str, title: str) -> None:
        """CPU of every process whose command line holds `title`, summed — PostgreSQL's
        backends for our databases ("postgres: user hdx_bench_… 127.0.0.1(…) idle"). A
        backend that exits during a phase takes its CPU with it (an undercount), and the
        server's shared work (WAL writer, checkpointer) is not in it."""
        with self._lock:
            self.groups[name] = title

    def _group_cpu(self, title: str) -> float:
        total = 0.0
        for proc in psutil.process_iter(["cmdline"]):
            if any(title in part for part in proc.info.get("cmdline") or ()):
                with contextlib.suppress(psutil.Error):
                    total += _cpu_of(proc)
        return total

    def unwatch(self, name: str) -> None:
        with self._lock:
            proc = self.procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                self._cpu_last[name] = _cpu_of(proc)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            items = list(self.procs.items())
        for name, proc in items:
            try:
                rss = int(proc.memory_info().rss)
            except psutil.Error:
                continue
            with self._lock:
                self.peak[name] = max(self.peak.get(name, 0), rss)
                self.phase_peak[name] = max(self.phase_peak.get(name, 0), rss)

    def cpu(self) -> dict[str, float]:
        """User + system CPU seconds so far, per process (the last value of one gone)."""
        out = dict(self._cpu_last)
        with self._lock:
            items = list(self.procs.items())
        for name, proc in items:
            with contextlib.suppress(psutil.Error):
                out[name] = self._cpu_last[name] = _cpu_of(proc)
        with self._lock:
            groups = dict(self.groups)
        for name, title in groups.items():
            out[name] = self._cpu_last[name] = self._group_cpu(title)
        return out

    def begin_phase(self) -> PhaseClock:
        self.sample()
        with self._lock:
            self.phase_peak = {}
        return PhaseClock(self.cpu(), _busy_seconds(), time.perf_counter())

    def end_phase(self, clock: PhaseClock) -> PhaseCost:
        self.sample()
        cpu = self.cpu()
        wall = time.perf_counter() - clock.wall
        with self._lock:
            watched = set(self.procs) | set(self.groups)
        used = {
            n: cpu[n] - clock.cpu[n]
            for n in cpu
            if n in clock.cpu and (n in watched or cpu[n] > clock.cpu[n])
        }
        busy = _busy_seconds() - clock.busy
        with self._lock:
            peaks = dict(self.phase_peak)
        return PhaseCost(wall, used, peaks, max(0.0, busy - sum(used.values())))


def _cpu_of(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


@dataclass(frozen=True)
class PhaseClock:
    cpu: dict[str, float]
    busy: float
    wall: float


@dataclass(frozen=True)
class PhaseCost:
    wall_seconds: float
    cpu_seconds: dict[str, float]
    peak_rss: dict[str, int]
    others_cpu_seconds: float  # what processes other than the watched ones used meanwhile

    def to_json(self, messages: int) -> dict[str, Any]:
        per_k = 1000 / messages if messages else 0.0
        return {
            "wall_seconds": round(self.wall_seconds, 2),
            "cpu_seconds": {k: round(v, 2) for k, v in self.cpu_seconds.items()},
            "cpu_seconds_per_1k_messages": {
                k: round(v * per_k, 3) for k, v in self.cpu_seconds.items()
            },
            "cpu_cores_busy": {
                k: round(v / self.wall_seconds, 2) if self.wall_seconds else 0.0
                for k, v in self.cpu_seconds.items()
            },
            "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in self.peak_rss.items()},
            "other_processes_cpu_seconds": round(self.others_cpu_seconds, 2),
            "other_processes_cores": round(self.others_cpu_seconds / self.wall_seconds, 2)
            if self.wall_seconds
            else 0.0,
        }


# --------------------------------------------------------------------------------------
# Kafka: a fast producer and a reader that timestamps what arrives
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    key: bytes
    value: bytes
    headers: list[tuple[str, str | bytes | None]]
    ce_id: str


def to_message(e: Event) -> Message:
    headers: list[tuple[str, str | bytes | None]] = [(k, v) for k, v in e.headers()]
    return Message(e.key.encode(), e.value(), headers, e.ce_id)


def make_producer(bootstrap: str, linger_ms: int) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": False,  # the embedded broker cannot do InitProducerId
            "linger.ms": linger_ms,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 2_097_151,
            "log.connection.close": False,
        }
    )


def _produce(producer: Producer, topic: str, m: Message) -> None:
    while True:
        try:
            producer.produce(topic, value=m.value, key=m.key, headers=m.headers)
            return
        except BufferError:
            producer.poll(0.005)


def publish_backlog(producer: Producer, topic: str, messages: Sequence[Message]) -> tuple[int, int]:
    """Everything as fast as the producer goes; (first publish, last ack) in epoch ns."""
    first = time.time_ns()
    for i, m in enumerate(messages):
        _produce(producer, topic, m)
        if i % 2000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("the broker did not acknowledge every message within 120 s")
    return first, time.time_ns()


def publish_at_rate(
    producer: Producer, topic: str, messages: Sequence[Message], rate: float
) -> list[int]:
    """One message every 1/rate s on the monotonic clock; each one's publish time (epoch ns)."""
    published = [0] * len(messages)
    start = time.perf_counter()
    for i, m in enumerate(messages):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        published[i] = time.time_ns()
        _produce(producer, topic, m)
        producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("the broker did not acknowledge every message within 120 s")
    return published


@dataclass(frozen=True, slots=True)
class Arrival:
    topic: str
    ce_id: str
    at_ns: int  # when this process received it (epoch ns)
    received_ms: int | None  # hdx_received_at: when HDX ingress accepted the message
    record_ms: int = 0  # the record's own timestamp (when the delivery stage published it)


class TopicReader(threading.Thread):
    """Reads topics from the beginning (no consumer group) and timestamps every record."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        super().__init__(name=f"reader-{topics[0]}", daemon=True)
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,  # timestamps within ~10 ms of the record's arrival
                "fetch.min.bytes": 1,
                "log.connection.close": False,
            }
        )
        parts = []
        for topic in topics:
            md = self.consumer.list_topics(topic, timeout=10).topics[topic]
            parts += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions]
        self.consumer.assign(parts)
        self.arrivals: list[Arrival] = []
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                # poll() returns as soon as one record is there (consume() would wait for a
                # full batch or its timeout, and delay the timestamps); then take the rest.
                first = self.consumer.poll(0.05)
                if first is None:
                    continue
                now = time.time_ns()
                for msg in [first, *self.consumer.consume(num_messages=5000, timeout=0)]:
                    if msg.error():
                        continue
                    ce_id, received = "", None
                    headers = cast(list[tuple[str, bytes | None]], msg.headers() or [])
                    for k, v in headers:
                        if k == "ce_id":
                            ce_id = (v or b"").decode()
                        elif k == "hdx_received_at" and v:
                            received = int(v)
                    self.arrivals.append(
                        Arrival(msg.topic() or "", ce_id, now, received, msg.timestamp()[1])
                    )
        finally:
            self.consumer.close()

    def close(self) -> None:
        self._halt.set()
        self.join(5)


class Deliveries:
    """What a reader has seen, by identity: first arrival, duplicates, unexpected ones."""

    def __init__(self, reader: TopicReader) -> None:
        self.reader = reader
        self.cursor = 0
        self.first: dict[Identity, Arrival] = {}
        self.duplicates: Counter[Identity] = Counter()

    def pull(self) -> list[Identity]:
        """Identities that arrived for the first time since the last pull."""
        arrivals = self.reader.arrivals
        end = len(arrivals)
        fresh: list[Identity] = []
        for a in arrivals[self.cursor : end]:
            ident = (a.topic, a.ce_id)
            if ident in self.first:
                self.duplicates[ident] += 1
            else:
                self.first[ident] = a
                fresh.append(ident)
        self.cursor = end
        return fresh

    def wait_for(
        self,
        expected: set[Identity],
        *,
        stall_seconds: float,
        what: str,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Until every expected identity arrived, or none arrived for `stall_seconds`; the
        number that arrived."""
        got = sum(1 for i in expected if i in self.first)
        last_progress = time.monotonic()
        next_report = time.monotonic() + 5
        while got < len(expected):
            time.sleep(0.02)
            fresh = [i for i in self.pull() if i in expected]
            now = time.monotonic()
            if fresh:
                got += len(fresh)
                last_progress = now
            elif now - last_progress > stall_seconds:
                log(
                    f"  {what}: nothing new for {stall_seconds:.0f} s; "
                    f"{len(expected) - got:,} of {len(expected):,} never arrived"
                )
                break
            if on_progress and now >= next_report:
                on_progress(got, len(expected))
                next_report = now + 5
        return got


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already-sorted values (as bench/consent_bench.py)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def distribution(values_ms: Sequence[float]) -> dict[str, float]:
    v = sorted(values_ms)
    if not v:
        return {"count": 0}
    return {
        "count": len(v),
        "p50": round(percentile(v, 50), 2),
        "p95": round(percentile(v, 95), 2),
        "p99": round(percentile(v, 99), 2),
        "max": round(v[-1], 2),
        "mean": round(sum(v) / len(v), 2),
    }


@dataclass
class PhaseResult:
    name: str
    messages: int
    expected: int
    delivered: int
    first_publish_ns: int
    last_publish_ns: int
    last_delivery_ns: int
    cost: PhaseCost | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    ingress_to_feed_ms: dict[str, float] = field(default_factory=dict)
    publish_to_ingress_ms: dict[str, float] = field(default_factory=dict)
    steady_rate: float | None = None
    stages: dict[str, Any] = field(default_factory=dict)
    timeline: list[int] = field(default_factory=list)  # deliveries per second since start
    published_ns: list[int] = field(default_factory=list)  # per message, epoch ns
    hops_ms: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(1e-9, (self.last_delivery_ns - self.first_publish_ns) / 1e9)

    @property
    def rate(self) -> float:
        """Messages per second from the first publish to the last delivery."""
        return self.messages / self.seconds

    @property
    def drain_seconds(self) -> float:
        """From the last publish to the last delivery."""
        return max(0, self.last_delivery_ns - self.last_publish_ns) / 1e9

    @property
    def kept_up(self) -> bool:
        """Delivered within 2 s of the last publish: no backlog built up."""
        return self.delivered == self.expected and self.drain_seconds < 2.0

    @property
    def publish_rate(self) -> float:
        span = max(1e-9, (self.last_publish_ns - self.first_publish_ns) / 1e9)
        return self.messages / span

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "messages": self.messages,
            "deliveries_expected": self.expected,
            "deliveries_arrived": self.delivered,
            "seconds_first_publish_to_last_delivery": round(self.seconds, 3),
            "messages_per_second": round(self.rate, 1),
            "publish_messages_per_second": round(self.publish_rate, 1),
            "drain_seconds_after_last_publish": round(self.drain_seconds, 3),
            "kept_up": self.kept_up,
        }
        if self.steady_rate is not None:
            out["steady_messages_per_second"] = round(self.steady_rate, 1)
        if self.latency_ms:
            out["latency_ms"] = self.latency_ms
            out["ingress_to_feed_ms"] = self.ingress_to_feed_ms
            out["publish_to_ingress_ms"] = self.publish_to_ingress_ms
        if self.cost is not None:
            out["cost"] = self.cost.to_json(self.messages)
        if self.stages:
            out["stages"] = self.stages
        if self.timeline:
            out["deliveries_per_second"] = self.timeline
        if self.hops_ms:
            out["hops_ms"] = self.hops_ms
        return out


@dataclass
class Workload:
    """Messages to publish and the deliveries each must produce (and must not)."""

    messages: list[Message]
    expects: list[list[Identity]]  # per message
    denied: set[Identity]

    @property
    def expected(self) -> set[Identity]:
        return {i for e in self.expects for i in e}


def hdx_workload(events: Sequence[Event], feeds: dict[str, str]) -> Workload:
    """Deliveries as HDX makes them: on the recipient's feed, ce_id = the derived event id."""
    expects: list[list[Identity]] = []
    denied: set[Identity] = set()
    for e in events:
        derived = derive_event_id(e.source, e.ce_id, "0")
        expects.append([(feeds[r], derived) for r in e.deliveries])
        denied.update((feeds[r], derived) for r in e.denied)
    return Workload([to_message(e) for e in events], expects, denied)


def relay_workload(events: Sequence[Event], out_topic: str) -> Workload:
    """Deliveries as the bare relay makes them: one per message, the ce_id unchanged."""
    return Workload(
        [to_message(e) for e in events], [[(out_topic, e.ce_id)] for e in events], set()
    )


def _timeline(arrivals: Sequence[Arrival], start_ns: int) -> list[int]:
    if not arrivals:
        return []
    span = int((max(a.at_ns for a in arrivals) - start_ns) // 1_000_000_000) + 1
    buckets = [0] * max(1, span)
    for a in arrivals:
        buckets[max(0, int((a.at_ns - start_ns) // 1_000_000_000))] += 1
    return buckets


def _steady_rate(arrivals: Sequence[Arrival], messages: int, expected: int) -> float | None:
    """Messages/s while 10 % → 90 % of the deliveries arrived (no start-up or tail)."""
    if len(arrivals) < 20 or expected == 0:
        return None
    times = sorted(a.at_ns for a in arrivals)
    lo, hi = times[len(times) // 10], times[len(times) * 9 // 10]
    if hi <= lo:
        return None
    share = (len(times) * 9 // 10 - len(times) // 10) / expected
    return messages * share / ((hi - lo) / 1e9)


def run_throughput(
    name: str,
    producer: Producer,
    topic: str,
    work: Workload,
    deliveries: Deliveries,
    monitor: ProcessMonitor,
    stall_seconds: float,
) -> PhaseResult:
    expected = work.expected
    log(
        f"  {name}: publishing {len(work.messages):,} messages as fast as possible "
        f"({len(expected):,} deliveries expected) …"
    )
    clock = monitor.begin_phase()
    first, last_pub = publish_backlog(producer, topic, work.messages)
    log(f"  {name}: published in {(last_pub - first) / 1e9:.1f} s; waiting for deliveries …")

    def progress(got: int, total: int) -> None:
        elapsed = (time.time_ns() - first) / 1e9
        log(f"    {got:,}/{total:,} deliveries after {elapsed:.0f} s")

    got = deliveries.wait_for(
        expected, stall_seconds=stall_seconds, what=name, on_progress=progress
    )
    cost = monitor.end_phase(clock)
    arrivals = [deliveries.first[i] for i in expected if i in deliveries.first]
    last = max((a.at_ns for a in arrivals), default=time.time_ns())
    result = PhaseResult(name, len(work.messages), len(expected), got, first, last_pub, last, cost)
    result.steady_rate = _steady_rate(arrivals, len(work.messages), len(expected))
    result.timeline = _timeline(arrivals, first)
    # A backlog is published at once: every message's publish time is the phase's start.
    result.published_ns = [first] * len(work.messages)
    return result


def run_latency(
    name: str,
    producer: Producer,
    topic: str,
    work: Workload,
    deliveries: Deliveries,
    monitor: ProcessMonitor,
    rate: float,
    stall_seconds: float,
) -> PhaseResult:
    expected = work.expected
    log(
        f"  {name}: publishing {len(work.messages):,} messages at {rate:,.0f}/s "
        f"({len(work.messages) / rate:.0f} s) …"
    )
    clock = monitor.begin_phase()
    published = publish_at_rate(producer, topic, work.messages, rate)
    got = deliveries.wait_for(expected, stall_seconds=stall_seconds, what=name)
    cost = monitor.end_phase(clock)
    e2e: list[float] = []
    ingress_feed: list[float] = []
    pub_ingress: list[float] = []
    last = published[-1] if published else time.time_ns()
    for i, idents in enumerate(work.expects):
        for ident in idents:
            a = deliveries.first.get(ident)
            if a is None:
                continue
            last = max(last, a.at_ns)
            e2e.append((a.at_ns - published[i]) / 1e6)
            if a.received_ms is not None:
                ingress_feed.append(a.at_ns / 1e6 - a.received_ms)
                pub_ingress.append(a.received_ms - published[i] / 1e6)
    result = PhaseResult(
        name, len(work.messages), len(expected), got, published[0], published[-1], last, cost
    )
    result.latency_ms = distribution(e2e)
    result.ingress_to_feed_ms = distribution(ingress_feed)
    result.publish_to_ingress_ms = distribution(pub_ingress)
    result.published_ns = published
    return result


# --------------------------------------------------------------------------------------
# The services' own view: per-stage handling time from /metrics
# --------------------------------------------------------------------------------------


def service_processes(stack: LocalStack) -> list[str]:
    """Every service process by its name in the stack: exchange, exchange-2, … when the
    exchange runs as several processes (--exchange-stages)."""
    return [name for svc in SERVICES for name in stack.replica_names(svc)]


def is_service(name: str) -> bool:
    """A service's process (any replica), as opposed to the broker, driver or database."""
    base, _, n = name.rpartition("-")
    return name in SERVICES or (base in SERVICES and n.isdigit())


def scrape_stages(stack: LocalStack) -> dict[str, dict[str, float]]:
    """Per stage: messages consumed, batches, and seconds handling + publishing them."""
    out: dict[str, dict[str, float]] = {}
    for svc in service_processes(stack):
        try:
            text = httpx.get(f"{stack.url(svc)}/metrics/", timeout=5).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            if not line.startswith(("hdx_stage_", "hdx_since_ingress_seconds_bucket")):
                continue
            name, _, value = line.rpartition(" ")
            metric, _, labels = name.partition("{")
            stage = _label(labels, "stage")
            if stage is None:
                continue
            if metric == "hdx_since_ingress_seconds_bucket":
                le = _label(labels, "le") or "+Inf"
                out.setdefault(f"{svc}/{stage}", {})[f"le:{le}"] = float(value)
                continue
            key = {
                "hdx_stage_messages_total": "messages",
                "hdx_stage_batch_seconds_count": "batches",
                "hdx_stage_batch_seconds_sum": "seconds",
            }.get(metric)
            if key:
                out.setdefault(f"{svc}/{stage}", {})[key] = float(value)
    return out


# How long a phase waits at most for the stages to work off what the phase before left.
SETTLE_CAP_SECONDS = 180.0


def inbound_partitions(bootstrap: str, prefix: str) -> int:
    """How many partitions the ingress reads: every topic its pattern matches (the shared
    inbound topic and each registered publisher's own)."""
    pattern = re.compile(Topics(prefix).inbound_pattern)
    listed = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return sum(len(md.partitions) for name, md in listed.items() if pattern.fullmatch(name))


def wait_for_stages_to_catch_up(
    stack: LocalStack, ingress_partitions: int = 0, cap_s: float = SETTLE_CAP_SECONDS
) -> float:
    """Wait until no stage of any service has records left to read (`hdx_consumer_lag` 0 on
    every partition, twice in a row), so a phase does not measure the queue the one before
    left — the audit log, off the feeds' path, may still be working off a backlog after the
    last delivery arrived. And until the ingress is assigned `ingress_partitions`: it finds
    the publishers' own topics, created as they were registered, at its next metadata
    refresh, and the rebalance that follows would hold it in the middle of a phase. The
    seconds waited (`cap_s` if the stages never caught up)."""
    started = time.monotonic()
    calm = 0
    while time.monotonic() - started < cap_s:
        lag = 0.0
        assigned = 0.0
        for svc in service_processes(stack):
            try:
                text = httpx.get(f"{stack.url(svc)}/metrics/", timeout=5).text
            except httpx.HTTPError:
                lag += 1  # not answering: not known to be idle
                continue
            for line in text.splitlines():
                if line.startswith("hdx_consumer_lag{"):
                    lag += float(line.rpartition(" ")[2])
                elif line.startswith('hdx_stage_partitions{stage="ingress"}'):
                    assigned += float(line.rpartition(" ")[2])
        if assigned < ingress_partitions:
            lag += 1  # a rebalance is still to come
        calm = calm + 1 if lag == 0 else 0
        if calm >= 2:
            return time.monotonic() - started
        time.sleep(0.5)  # a polling interval
    return cap_s


def _label(labels: str, name: str) -> str | None:
    for part in labels.rstrip("}").split(","):
        k, _, v = part.partition("=")
        if k == name:
            return v.strip('"')
    return None


def stage_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage, figures in after.items():
        prev = before.get(stage, {})
        d = {k: v - prev.get(k, 0.0) for k, v in figures.items()}
        msgs, batches, secs = d.get("messages", 0), d.get("batches", 0), d.get("seconds", 0.0)
        out[stage] = {
            "messages": int(msgs),
            "batches": int(batches),
            "mean_batch": round(msgs / batches, 1) if batches else 0,
            "handle_and_publish_seconds": round(secs, 2),
            "us_per_message": round(secs / msgs * 1e6, 1) if msgs else 0,
        }
        buckets = sorted(
            ((float(k[3:]), v) for k, v in d.items() if k.startswith("le:")),
            key=lambda kv: kv[0],
        )
        if buckets and buckets[-1][1] > 0:
            out[stage]["since_ingress_ms"] = {
                f"p{q}": round(_histogram_quantile(buckets, q / 100) * 1000, 1)
                for q in (50, 95, 99)
            }
    return out


def _histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket (cumulative counts)."""
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            width = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / width if width else 1.0)
        prev_le, prev_count = le, count
    return prev_le


# --------------------------------------------------------------------------------------
# PostgreSQL, profiling, the ceiling relay
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_databases(admin_url: str) -> Iterator[dict[str, str]]:
    """A fresh database per service, dropped afterwards."""
    import psycopg

    tag = uuid.uuid4().hex[:8]
    names = {svc: f"hdx_bench_{svc.replace('-', '_')}_{tag}" for svc in SERVICES}
    base = admin_url.rsplit("/", 1)[0]
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        for name in names.values():
            conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {svc: f"{base}/{name}" for svc, name in names.items()}
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            for name in names.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_reachable(admin_url: str) -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(admin_url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


class Profiler:
    """py-spy recording a process until stopped (collapsed stacks, bench/profile_summary.py)."""

    def __init__(self, pid: int, out: Path, rate: int = 100, gil: bool = False) -> None:
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).with_name("py-spy")
        self.proc = subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--nonblocking",
                *(["--gil"] if gil else []),
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> Path | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not self.out.exists():
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            log(f"  py-spy wrote no profile: {err.strip()[-300:]}")
            return None
        return self.out


def create_topics(bootstrap: str, names: Sequence[str], partitions: int = 6) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    for fut in futures.values():
        fut.result(30)


@contextlib.contextmanager
def ceiling_relay(
    bootstrap: str, topics: Sequence[str], fetch_max_wait_ms: int, stages: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "ceiling.py"),
            "--bootstrap",
            bootstrap,
            "--topics",
            ",".join(topics),
            "--fetch-max-wait-ms",
            str(fetch_max_wait_ms),
            *(["--stages"] if stages else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"the ceiling relay did not start: {line}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    freq = psutil.cpu_freq()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "cpu_mhz": round(freq.current) if freq else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def source_state() -> dict[str, Any]:
    """The commit measured, and whether the services' code differed from it."""

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=HERE.parent, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "shared", "services").splitlines()
    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted_service_changes": len(changed)}


def machine_state() -> dict[str, Any]:
    """How busy the machine is now: load averages and a 1 s CPU sample."""
    load = os.getloadavg()
    busy = psutil.cpu_percent(interval=1.0)
    return {
        "load_average": [round(x, 2) for x in load],
        "cpu_percent_1s": busy,
        "busy_cores_1s": round(busy / 100 * (os.cpu_count() or 1), 2),
    }


def seed_stack(stack: LocalStack, region: Region) -> dict[str, Any]:
    seeded = asyncio.run(
        seed_region(region, stack.url("exchange"), stack.url("consent"), auth=stack.admin_auth())
    )
    return {
        "publishers": seeded.publishers,
        "subscriptions": len(seeded.subscriptions),
        "consents": seeded.consents,
        "seconds": round(seeded.seconds, 1),
    }


@dataclass
class Phases:
    """One system's figures: throughput (backlog), latency at the fixed rate, and latency
    at a light rate the system can certainly take."""

    throughput: PhaseResult
    latency: PhaseResult
    light: PhaseResult | None

    def to_json(self) -> dict[str, Any]:
        out = {"throughput": self.throughput.to_json(), "latency": self.latency.to_json()}
        if self.light is not None:
            out["light_latency"] = self.light.to_json()
        return out


def run_phases(
    name: str,
    bootstrap: str,
    topic: str,
    workloads: dict[str, Workload],
    deliveries: Deliveries,
    monitor: ProcessMonitor,
    args: argparse.Namespace,
    *,
    on_phase: Callable[[str], Callable[[PhaseResult], None]] | None = None,
) -> Phases:
    """Warm up, then the three phases against one system (HDX or the ceiling relay)."""
    fast = make_producer(bootstrap, linger_ms=5)
    paced = make_producer(bootstrap, linger_ms=0)
    try:
        warm = workloads["warmup"]
        log(f"{name}: warming up with {len(warm.messages):,} messages …")
        publish_backlog(fast, topic, warm.messages)
        deliveries.wait_for(warm.expected, stall_seconds=args.stall_seconds, what="warm-up")

        done = on_phase("throughput") if on_phase else None
        log(f"{name} phase 1: throughput")
        throughput = run_throughput(
            name, fast, topic, workloads["throughput"], deliveries, monitor, args.stall_seconds
        )
        if done:
            done(throughput)

        done = on_phase("latency") if on_phase else None
        log(f"{name} phase 2: latency at {args.rate:,.0f} messages/s")
        latency = run_latency(
            name,
            paced,
            topic,
            workloads["latency"],
            deliveries,
            monitor,
            args.rate,
            args.stall_seconds,
        )
        if done:
            done(latency)

        light = None
        if workloads["light"].messages:
            done = on_phase("light") if on_phase else None
            log(f"{name} phase 3: latency at a light {args.light_rate:,.0f} messages/s")
            light = run_latency(
                name,
                paced,
                topic,
                workloads["light"],
                deliveries,
                monitor,
                args.light_rate,
                args.stall_seconds,
            )
            if done:
                done(light)
    finally:
        fast.flush(10)
        paced.flush(10)
    return Phases(throughput, latency, light)


HOPS = ("validated", "identified", "routed", "decided")


def record_times(bootstrap: str, topics: Sequence[str]) -> dict[tuple[str, str], int]:
    """(topic, ce_id) → the record's timestamp (ms; the producer's send time, so for a
    pipeline topic: when the stage writing it had handled the message), first occurrence."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-hops-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "log.connection.close": False,
        }
    )
    try:
        parts, ends = [], {}
        for topic in topics:
            md = consumer.list_topics(topic, timeout=10).topics[topic]
            for p in md.partitions:
                tp = TopicPartition(topic, p, OFFSET_BEGINNING)
                parts.append(tp)
                ends[(topic, p)] = consumer.get_watermark_offsets(tp, timeout=10)[1]
        consumer.assign(parts)
        times: dict[tuple[str, str], int] = {}
        done = {k for k, end in ends.items() if end <= 0}
        deadline = time.monotonic() + 60
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=5000, timeout=0.5):
                if msg.error():
                    continue
                topic, partition = msg.topic() or "", msg.partition() or 0
                if (msg.offset() or 0) + 1 >= ends[(topic, partition)]:
                    done.add((topic, partition))
                for k, v in cast(list[tuple[str, bytes | None]], msg.headers() or []):
                    if k == "ce_id":
                        times.setdefault((topic, (v or b"").decode()), msg.timestamp()[1])
                        break
        return times
    finally:
        consumer.close()


def hop_trace(
    bootstrap: str, prefix: str, work: Workload, result: PhaseResult, deliveries: Deliveries
) -> dict[str, dict[str, float]]:
    """Where a phase's latency goes, hop by hop: for every delivery, the time between the
    records it caused on each pipeline topic (their timestamps: when each stage published).
    `publish→validated` is the bench's publish to ingress's send; `decided→feed` consent's
    send to delivery's; `feed→reader` the delivery's send to its arrival at the reader."""
    times = record_times(bootstrap, [f"{prefix}{h}" for h in HOPS])
    steps: dict[str, list[float]] = {}
    for i, idents in enumerate(work.expects):
        for ident in idents:
            a = deliveries.first.get(ident)
            if a is None or not a.record_ms:
                continue
            marks = [result.published_ns[i] / 1e6]
            marks += [times.get((f"{prefix}{h}", ident[1]), 0) for h in HOPS]
            marks += [a.record_ms, a.at_ns / 1e6]
            if not all(marks):
                continue
            names = ["publish", *HOPS, "feed", "reader"]
            for (n1, t1), (n2, t2) in zip(
                zip(names, marks, strict=True), zip(names[1:], marks[1:], strict=True), strict=False
            ):
                steps.setdefault(f"{n1}→{n2}", []).append(t2 - t1)
    return {k: distribution(v) for k, v in steps.items()}


def run_hdx(
    args: argparse.Namespace, events: dict[str, list[Event]], region: Region
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # On a broker of your own, a fresh topic prefix per run: nothing from an earlier run
    # (the same seed makes the same event ids) can be taken for this run's deliveries.
    prefix = f"hdxbench{uuid.uuid4().hex[:8]}." if args.bootstrap else "hdx."
    feeds = {p.recipient: p.feed(prefix) for p in region.providers}
    env = {
        "HDX_LOG_LEVEL": "WARNING",
        "HDX_TOPIC_PREFIX": prefix,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
        # Seeding stores a consent per patient as fast as it can, as one (admin) client.
        "HDX_AUTH_RATE_LIMIT": "100000/second",
        **dict(kv.split("=", 1) for kv in args.service_env),
    }
    if not args.bootstrap:
        env["HDX_KAFKA_IDEMPOTENCE"] = "false"  # the embedded broker has no InitProducerId
    with contextlib.ExitStack() as stack_ctx:
        tmp = Path(stack_ctx.enter_context(tempfile.TemporaryDirectory(prefix="hdx-bench-")))
        database_urls: dict[str, str] = {}
        if args.postgres:
            database_urls = stack_ctx.enter_context(postgres_databases(args.postgres_url))
        database = "PostgreSQL" if args.postgres else "SQLite"
        where = f"the broker at {args.bootstrap}" if args.bootstrap else "the embedded broker"
        log(f"starting the services ({database}) on {where} …")
        # --exchange-stages: one exchange process per value, running those stages.
        split = [{"HDX_EXCHANGE_STAGES": s} for s in args.exchange_stages]
        if split:
            log(f"  the exchange as {len(split)} processes: {' | '.join(args.exchange_stages)}")
        stack = LocalStack(
            tmp,
            bootstrap_servers=args.bootstrap,
            extra_env=env,
            database_urls=database_urls,
            replica_env={"exchange": split} if split else {},
        ).start(ready_timeout=120)
        stack_ctx.callback(stack.stop)
        bootstrap = stack.bootstrap
        monitor = ProcessMonitor()
        stack_ctx.callback(monitor.stop)
        for svc in service_processes(stack):
            proc = stack.services[svc].process
            assert proc is not None
            monitor.watch(svc, proc.pid)
        if stack.broker is not None and stack.broker.process is not None:
            monitor.watch("broker", stack.broker.process.pid)
        monitor.watch("driver", os.getpid())
        if args.postgres:
            monitor.watch_group("postgresql", "hdx_bench_")
        monitor.start()

        log("registering the region: publishers, subscriptions, consents …")
        out["seed"] = seed_stack(stack, region)
        log(
            f"  {out['seed']['publishers']} publishers, {out['seed']['subscriptions']} "
            f"subscriptions, {out['seed']['consents']:,} consents in {out['seed']['seconds']} s"
        )
        ingress_partitions = inbound_partitions(bootstrap, prefix)
        reader = TopicReader(bootstrap, sorted(set(feeds.values())))
        reader.start()
        stack_ctx.callback(reader.close)
        deliveries = Deliveries(reader)
        workloads = {name: hdx_workload(evs, feeds) for name, evs in events.items()}
        out["profiles"] = {}
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

        out["settle_seconds"] = {}

        def on_phase(phase: str) -> Callable[[PhaseResult], None]:
            """Let the stages catch up, then scrape /metrics around the phase; py-spy it if
            asked."""
            waited = wait_for_stages_to_catch_up(stack, ingress_partitions)
            out["settle_seconds"][phase] = round(waited, 1)
            if waited >= SETTLE_CAP_SECONDS:
                log(f"  the stages still had records to read after {waited:.0f} s; going on")
            elif waited > 1:
                log(f"  waited {waited:.1f} s for every stage to catch up")
            before = scrape_stages(stack)
            profilers: list[tuple[str, Profiler]] = []
            if phase == args.profile_phase:
                for svc in args.profile:
                    proc = stack.services[svc].process
                    assert proc is not None
                    path = RESULTS / "profiles" / f"{svc}-{stamp}.txt"
                    profilers.append((svc, Profiler(proc.pid, path, gil=args.profile_gil)))
                    monitor.watch(f"py-spy:{svc}", profilers[-1][1].proc.pid)

            def done(result: PhaseResult) -> None:
                result.stages = stage_delta(before, scrape_stages(stack))
                for svc, prof in profilers:
                    monitor.unwatch(f"py-spy:{svc}")
                    written = prof.stop()
                    if written:
                        out["profiles"][svc] = str(written)
                        log(f"  profile of {svc}: {written}")

            return done

        out["hdx"] = run_phases(
            "HDX",
            bootstrap,
            f"{prefix}inbound",
            workloads,
            deliveries,
            monitor,
            args,
            on_phase=on_phase,
        )
        for key, phase in (
            ("throughput", out["hdx"].throughput),
            ("latency", out["hdx"].latency),
            ("light", out["hdx"].light),
        ):
            if phase is not None and phase.published_ns:
                phase.hops_ms = hop_trace(bootstrap, prefix, workloads[key], phase, deliveries)
        all_expected = {i for w in workloads.values() for i in w.expected}
        all_denied = {i for w in workloads.values() for i in w.denied}
        deliveries.pull()
        out["checks"] = {
            "expected": len(all_expected),
            "missing": sum(1 for i in all_expected if i not in deliveries.first),
            "duplicates": sum(deliveries.duplicates.values()),
            "denied_but_delivered": sum(1 for i in all_denied if i in deliveries.first),
            "unexpected": sum(
                1 for i in deliveries.first if i not in all_expected and i not in all_denied
            ),
        }
        out["peak_rss_mib"] = {k: round(v / 2**20, 1) for k, v in monitor.peak.items()}

        if not args.skip_ceiling:
            # The services stop first, so the relay has the machine (and the broker) alone.
            for svc in service_processes(stack):
                monitor.unwatch(svc)
                stack.services[svc].stop()
            out["ceiling"] = run_ceiling(args, bootstrap, events, monitor)
        monitor.stop()
    return out


def run_ceiling(
    args: argparse.Namespace,
    bootstrap: str,
    events: dict[str, list[Event]],
    monitor: ProcessMonitor,
) -> Phases:
    tag = uuid.uuid4().hex[:6]
    topics = [f"bench.ceiling.{tag}.{i}" for i in range(args.ceiling_hops + 1)]
    create_topics(bootstrap, topics)
    log(f"ceiling: a bare aiokafka relay, {args.ceiling_hops} hop(s), on the same broker")
    workloads = {name: relay_workload(evs, topics[-1]) for name, evs in events.items()}
    with ceiling_relay(bootstrap, topics, args.ceiling_fetch_wait_ms, args.ceiling_stages) as relay:
        monitor.watch("ceiling-relay", relay.pid)
        reader = TopicReader(bootstrap, [topics[-1]])
        reader.start()
        try:
            return run_phases(
                "ceiling", bootstrap, topics[0], workloads, Deliveries(reader), monitor, args
            )
        finally:
            reader.close()
            monitor.unwatch("ceiling-relay")


def ceiling_only(args: argparse.Namespace, events: dict[str, list[Event]]) -> int:
    """The relay alone on a fresh embedded broker: figures printed, nothing written."""
    from hdx_shared.embedded_broker import EmbeddedBroker

    with tempfile.TemporaryDirectory(prefix="hdx-bench-") as tmp:
        broker = EmbeddedBroker(log_path=Path(tmp) / "broker.log").start()
        monitor = ProcessMonitor()
        try:
            assert broker.process is not None
            monitor.watch("broker", broker.process.pid)
            monitor.start()
            phases = run_ceiling(args, broker.bootstrap_servers, events, monitor)
        finally:
            monitor.stop()
            broker.stop()
    t = phases.throughput
    log(
        f"\nceiling relay{' (HDX stages)' if args.ceiling_stages else ''}, "
        f"fetch_max_wait_ms={args.ceiling_fetch_wait_ms}, hops={args.ceiling_hops}"
    )
    log(f"  throughput {t.rate:,.0f} msg/s end to end, {t.steady_rate or 0:,.0f} steady")
    for name, phase in (("latency", phases.latency), ("light", phases.light)):
        if phase is not None:
            d = phase.latency_ms
            log(
                f"  {name}: p50 {d.get('p50')} p95 {d.get('p95')} p99 {d.get('p99')} "
                f"max {d.get('max')} ms"
            )
    return 0


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

OK = {True: "ok", False: "MISSED"}


def _ms(d: dict[str, float], key: str) -> str:
    return f"{d[key]:,.1f}" if d.get("count") else "n/a"


def _ratio(a: float | None, b: float | None, fmt: str) -> str:
    return format(a / b, fmt) if a and b else "-"


def report(
    result: dict[str, Any], hdx: Phases, ceiling: Phases | None, out: dict[str, Any]
) -> None:
    cfg = result["config"]
    m, before = result["machine"], result["machine_state"]["before"]
    t, lat, light = hdx.throughput, hdx.latency, hdx.light
    ct = ceiling.throughput if ceiling else None
    others = (
        t.cost.others_cpu_seconds / t.cost.wall_seconds if t.cost and t.cost.wall_seconds else 0
    )
    s = result["traffic"]["throughput"]
    log("")
    log(
        f"HDX end-to-end benchmark — {result['timestamp']}, {cfg['database']}, {cfg['broker']}; "
        f"{m['cpu_count']} cores ({m['cpu_model']}), {m['memory_gib']} GiB"
    )
    log(
        f"machine: load average {before['load_average'][0]:.2f} at the start; other processes "
        f"used {others:.2f} cores during phase 1"
        + ("  (busy: figures are pessimistic)" if others > 0.25 else "")
    )
    log(
        f"traffic: {s['messages']:,} messages — {s['by_type']}; {s['deliveries']:,} deliveries "
        f"expected, {s['denied']:,} denied by consent ({s['denied_share']:.1%}); region of "
        f"{result['region']['persons']:,} persons, {result['region']['source_records']:,} "
        "source records at 10 sources, 5 subscribers"
    )

    def row(label: str, a: str, b: str = "", ratio: str = "", target: str = "") -> None:
        log(f"  {label:<34}{a:>13}{b:>13}{ratio:>13}   {target}")

    log("")
    row("", "HDX", "ceiling", "HDX/ceiling", "target")
    row(
        "throughput, end to end (msg/s)",
        f"{t.rate:,.0f}",
        f"{ct.rate:,.0f}" if ct else "-",
        _ratio(t.rate, ct.rate if ct else None, ".1%"),
        f"≥ {TARGET_RATE:,}  [{OK[t.rate >= TARGET_RATE]}]",
    )
    row(
        "  steady, 10→90 % of deliveries",
        f"{t.steady_rate or 0:,.0f}",
        f"{ct.steady_rate or 0:,.0f}" if ct else "-",
        _ratio(t.steady_rate, ct.steady_rate if ct else None, ".1%"),
    )
    row(
        "  publish rate (msg/s)", f"{t.publish_rate:,.0f}", f"{ct.publish_rate:,.0f}" if ct else "-"
    )
    row(
        "  deliveries arrived",
        f"{t.delivered:,}/{t.expected:,}",
        f"{ct.delivered:,}/{ct.expected:,}" if ct else "-",
    )
    for label, phase, other, rate, secs in (
        ("latency", lat, ceiling.latency if ceiling else None, cfg["rate"], cfg["rate_seconds"]),
        (
            "light",
            light,
            ceiling.light if ceiling else None,
            cfg["light_rate"],
            cfg["light_seconds"],
        ),
    ):
        if phase is None:
            continue
        log(f"  publish → feed at {rate:,.0f} msg/s for {secs:g} s (ms)")
        for q in ("p50", "p95", "p99", "max"):
            target = ""
            if label == "latency" and q == "p99":
                p99 = phase.latency_ms.get("p99", float("inf"))
                target = f"< {TARGET_P99_MS:.0f} ms  [{OK[p99 < TARGET_P99_MS]}]"
            row(
                f"    {q}",
                _ms(phase.latency_ms, q),
                _ms(other.latency_ms, q) if other else "-",
                _ratio(phase.latency_ms.get(q), other.latency_ms.get(q) if other else None, ".1f")
                + ("×" if other and other.latency_ms.get(q) else ""),
                target,
            )
        row(
            "    of which ingress → feed p50/p99",
            f"{_ms(phase.ingress_to_feed_ms, 'p50')}/{_ms(phase.ingress_to_feed_ms, 'p99')}",
        )
        row(
            "    drained after last publish (s)",
            f"{phase.drain_seconds:,.1f}",
            f"{other.drain_seconds:,.1f}" if other else "-",
            "",
            "kept up" if phase.kept_up else "FELL BEHIND (queueing)",
        )

    log("")
    log(
        f"  {'process (phase 1)':<20}{'CPU s/1k msg':>13}{'cores busy':>12}"
        f"{'peak RSS MiB':>14}   target (RSS)"
    )
    peaks = out["peak_rss_mib"]
    if t.cost:
        for name, cpu in t.cost.cpu_seconds.items():
            rss = peaks.get(name, 0.0)
            target = (
                f"< {TARGET_RSS_MIB:.0f}  [{OK[rss < TARGET_RSS_MIB]}]" if is_service(name) else ""
            )
            log(
                f"  {name:<20}{cpu * 1000 / t.messages:>13.3f}"
                f"{cpu / t.cost.wall_seconds:>12.2f}{rss:>14.1f}   {target}"
            )
        total = sum(
            v
            for k, v in t.cost.cpu_seconds.items()
            if is_service(k) or k in ("broker", "postgresql")
        )
        label = "services + broker" + (" + db" if "postgresql" in t.cost.cpu_seconds else "")
        log(f"  {label:<20}{total * 1000 / t.messages:>13.3f}{total / t.cost.wall_seconds:>12.2f}")
    if ct and ct.cost:
        for name in ("ceiling-relay", "broker"):
            cpu = ct.cost.cpu_seconds.get(name, 0.0)
            rss = ct.cost.peak_rss.get(name, 0) / 2**20
            label = "ceiling: " + name.removeprefix("ceiling-")
            log(
                f"  {label:<20}{cpu * 1000 / ct.messages:>13.3f}"
                f"{cpu / ct.cost.wall_seconds:>12.2f}{rss:>14.1f}"
            )
    if t.stages:
        log("")
        log(
            f"  {'stage (phase 1, /metrics)':<30}{'messages':>10}{'mean batch':>12}"
            f"{'µs/msg':>10}{'busy s':>9}"
        )
        ranked = sorted(t.stages.items(), key=lambda kv: -kv[1]["handle_and_publish_seconds"])
        for stage, d in ranked:
            log(
                f"  {stage:<30}{d['messages']:>10,}{d['mean_batch']:>12}"
                f"{d['us_per_message']:>10,.0f}{d['handle_and_publish_seconds']:>9.1f}"
            )
        log("  (µs/msg: wall time in handler + publish + acks per message, CPU waits included)")
    for label, phase in (("latency", lat), ("light", light)):
        if phase is None or not phase.stages:
            continue
        hops = sorted(
            (
                (k, v["since_ingress_ms"])
                for k, v in phase.stages.items()
                if "since_ingress_ms" in v
            ),
            key=lambda kv: kv[1]["p50"],
        )
        if hops:
            log("")
            log(f"  {label} phase: time since ingress when each stage finished (/metrics, ms)")
            for stage, q in hops:
                log(f"    {stage:<30} p50 {q['p50']:>9,.1f}   p95 {q['p95']:>9,.1f}")
    for label, phase in (("throughput", t), ("latency", lat), ("light", light)):
        if phase is None or not phase.hops_ms:
            continue
        log("")
        log(f"  {label} phase: hop by hop, from the records' timestamps (ms)")
        for hop, d in phase.hops_ms.items():
            log(f"    {hop:<30} p50 {d['p50']:>8,.1f}   p99 {d['p99']:>8,.1f}")
    c = out["checks"]
    log("")
    log(
        f"checks: {c['expected']:,} deliveries expected over all phases — {c['missing']} missing, "
        f"{c['duplicates']} duplicates, {c['denied_but_delivered']} denied-but-delivered, "
        f"{c['unexpected']} unexpected"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--messages", type=int, default=50_000, help="throughput phase")
    parser.add_argument("--rate", type=float, default=1_000.0, help="latency phase, messages/s")
    parser.add_argument("--rate-seconds", type=float, default=20.0, help="latency phase length")
    parser.add_argument(
        "--light-rate", type=float, default=100.0, help="phase 3: latency at this rate"
    )
    parser.add_argument(
        "--light-seconds", type=float, default=10.0, help="phase 3 length (0: skip it)"
    )
    parser.add_argument("--warmup", type=int, default=500, help="messages before measuring")
    parser.add_argument("--persons", type=int, default=0, help="region size (0: messages / 12)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--bootstrap",
        default=None,
        help="a Kafka of your own (e.g. Apache Kafka) instead of the embedded broker; "
        "topics get a fresh prefix per run",
    )
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    parser.add_argument("--postgres-url", default=DEFAULT_PG, help="an admin connection")
    parser.add_argument("--skip-ceiling", action="store_true", help="no bare-relay comparison")
    parser.add_argument("--ceiling-hops", type=int, default=1, help="relays chained")
    parser.add_argument(
        "--ceiling-fetch-wait-ms",
        type=int,
        default=500,
        help="the relay's fetch_max_wait_ms (500: aiokafka's default, as HDX's stages)",
    )
    parser.add_argument(
        "--profile-phase",
        default="throughput",
        choices=("throughput", "latency", "light"),
        help="the phase --profile records",
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="HDX_NAME=VALUE",
        help="a setting for every service (repeatable), e.g. HDX_CONSUMER_FETCH_MAX_WAIT_MS=5",
    )
    parser.add_argument(
        "--exchange-stages",
        action="append",
        default=[],
        metavar="STAGES",
        help="run the exchange as one process per use of this option, each running these "
        "stages (HDX_EXCHANGE_STAGES), e.g. --exchange-stages ingress,router "
        "--exchange-stages delivery,audit-log",
    )
    parser.add_argument(
        "--ceiling-stages",
        action="store_true",
        help="the relay's hops as HDX stages (add_stage, a forwarding handler): the plumbing alone",
    )
    parser.add_argument(
        "--ceiling-only",
        action="store_true",
        help="only the broker and the relay (to experiment with the ceiling)",
    )
    parser.add_argument(
        "--profile",
        type=lambda s: [x for x in s.split(",") if x],
        default=[],
        help="py-spy these services during --profile-phase (comma-separated)",
    )
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="--profile samples only the thread holding the GIL: a process's Python CPU, "
        "without threads waiting in SQLite or I/O",
    )
    parser.add_argument(
        "--stall-seconds", type=float, default=60.0, help="give up when nothing arrives for this"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON")
    parser.add_argument(
        "--name", default="", help="results file prefix (default exchange / exchange-postgres)"
    )
    args = parser.parse_args(argv)
    for svc in args.profile:
        if svc not in SERVICES:
            parser.error(f"--profile: {svc} is not one of {', '.join(SERVICES)}")
    for stages in args.exchange_stages:
        try:
            parse_stages(stages)
        except ValueError as exc:
            parser.error(f"--exchange-stages: {exc}")
    if args.postgres and (why := postgres_reachable(args.postgres_url)):
        log(f"PostgreSQL is not reachable at {args.postgres_url}: {why}")
        return 2

    state_before = machine_state()
    persons = args.persons or max(300, args.messages // 12)
    log(f"building the region ({persons:,} persons, seed {args.seed}) and its traffic …")
    region = Region.build(args.seed, persons)
    traffic = Traffic(region)
    events = {
        "warmup": traffic.take(args.warmup),
        "throughput": traffic.take(args.messages),
        "latency": traffic.take(round(args.rate * args.rate_seconds)),
        "light": traffic.take(round(args.light_rate * args.light_seconds)),
    }
    summary = {name: traffic_summary(evs) for name, evs in events.items()}
    s = summary["throughput"]
    log(
        f"  {s['messages']:,} messages: {s['by_type']}, {s['deliveries']:,} deliveries, "
        f"{s['denied']:,} denied ({s['denied_share']:.1%}), {s['bytes_mean']} bytes on average"
    )

    if args.ceiling_only:
        return ceiling_only(args, events)
    out = run_hdx(args, events, region)
    hdx: Phases = out.pop("hdx")
    ceiling: Phases | None = out.pop("ceiling", None)
    stamp = datetime.now(UTC)
    command = ["bench/exchange_bench.py", *(argv if argv is not None else sys.argv[1:])]
    t, lat = hdx.throughput, hdx.latency
    peaks = out["peak_rss_mib"]
    result: dict[str, Any] = {
        "benchmark": "exchange-end-to-end",
        "timestamp": stamp.isoformat(timespec="seconds"),
        "command": " ".join(command),
        "machine": machine(),
        "machine_state": {"before": state_before, "after": machine_state()},
        "source": source_state(),
        "config": {
            "database": "postgresql" if args.postgres else "sqlite",
            "broker": args.bootstrap or "embedded Tansu (memory storage)",
            "messages": args.messages,
            "warmup": args.warmup,
            "rate": args.rate,
            "rate_seconds": args.rate_seconds,
            "light_rate": args.light_rate,
            "light_seconds": args.light_seconds,
            "seed": args.seed,
            "ceiling_hops": args.ceiling_hops,
            "service_env": args.service_env,
            "exchange_stages": args.exchange_stages or ["all"],
            "pythonpath": os.environ.get("PYTHONPATH"),
        },
        "region": region.summary(),
        "traffic": summary,
        "targets": {
            "messages_per_second": TARGET_RATE,
            "p99_ms_at_1000_per_second": TARGET_P99_MS,
            "peak_rss_mib_per_service": TARGET_RSS_MIB,
        },
        "meets_targets": {
            "throughput": t.rate >= TARGET_RATE,
            "p99": lat.latency_ms.get("p99", float("inf")) < TARGET_P99_MS,
            "rss": all(v < TARGET_RSS_MIB for k, v in peaks.items() if is_service(k)),
        },
        "hdx": hdx.to_json(),
        **out,
    }
    if ceiling is not None:
        result["ceiling"] = {"hops": args.ceiling_hops, **ceiling.to_json()}
        cp99 = ceiling.latency.latency_ms.get("p99")
        result["hdx_over_ceiling"] = {
            "throughput": round(t.rate / ceiling.throughput.rate, 4),
            "p99_latency": round(lat.latency_ms["p99"] / cp99, 2)
            if cp99 and lat.latency_ms.get("p99")
            else None,
        }
    report(result, hdx, ceiling, out)

    args.out.mkdir(parents=True, exist_ok=True)
    kind = args.name or ("exchange-postgres" if args.postgres else "exchange")
    if args.profile:
        kind += "-profiled"  # py-spy's sampling costs CPU: not comparable with a plain run
    path = args.out / f"{kind}-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    text = json.dumps(result, indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
    (args.out / f"{kind}-latest.json").write_text(text, encoding="utf-8")
    log(f"\nwrote {path} (and {kind}-latest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
