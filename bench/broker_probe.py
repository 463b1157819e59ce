"""What the embedded broker costs on its own: one aiokafka consumer's fetches, measured apart
from HDX, by partition count, fetch wait and how many records each partition already holds.

Every `make bench` run shows Tansu's CPU a message growing as the run goes on, and the
stack at light load far dearer than in a backlog. This separates the broker's part: each
case starts a fresh embedded Tansu (so no case inherits another's records), creates a topic,
optionally fills every partition with `--history` records and reads them, then for
`--seconds` each measures the consumer idle and with a producer sending `--rate` records a
second (500-byte values, keys spread over the partitions):

- fetch requests a second (aiokafka's fetcher, counted);
- the broker's CPU (its process's utime + stime) and the client's (this process), as
  cores and as milliseconds a fetch;
- produce-to-consume latency p50 / p99 (the records' CreateTime to `getmany`).

It also asks a fresh broker to trim a topic (DeleteRecords, what Kafka's retention does) and
reports what happened.

Run: `.venv/bin/python bench/broker_probe.py` (about two minutes); `--case P,W,H[,E]`
(partitions, fetch wait ms, records held per partition, and optionally records held per
partition in another topic; repeatable) chooses the cases. Prints a table and writes
bench/results/broker-probe-<UTC stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.records_to_delete import RecordsToDelete
from aiokafka.consumer.fetcher import Fetcher

from hdx_shared.embedded_broker import EmbeddedBroker

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CASES = ("6,10,0", "6,10,50000", "6,10,0,50000", "66,10,0", "1,10,0", "6,50,0")
VALUE = b"x" * 500


@dataclass(frozen=True)
class Case:
    partitions: int
    fetch_wait_ms: int
    history_per_partition: int
    # Records held a partition in another topic of the same broker (not read).
    elsewhere_per_partition: int = 0

    @classmethod
    def parse(cls, text: str) -> Case:
        return cls(*(int(x) for x in text.split(",")))


@dataclass
class Phase:
    fetches_per_second: float
    broker_cores: float
    client_cores: float
    broker_ms_per_fetch: float
    client_ms_per_fetch: float
    records: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None


class FetchCounter:
    """Counts the fetch requests aiokafka's fetcher sends (one per broker per round)."""

    def __init__(self) -> None:
        self.count = 0
        original = Fetcher._proc_fetch_request
        counter = self

        async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.count += 1
            return await original(self, *args, **kwargs)

        Fetcher._proc_fetch_request = counted


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)]


async def fill(producer: AIOKafkaProducer, topic: str, partitions: int, per_partition: int) -> None:
    for partition in range(partitions):
        for start in range(0, per_partition, 1000):
            sent = [
                await producer.send(topic, VALUE, partition=partition)
                for _ in range(min(1000, per_partition - start))
            ]
            await asyncio.gather(*sent)


async def run_case(
    case: Case, seconds: float, rate: float, counter: FetchCounter
) -> dict[str, Any]:
    with EmbeddedBroker() as broker:
        assert broker.process is not None
        bootstrap = broker.bootstrap_servers
        topic = f"probe-{uuid.uuid4().hex[:8]}"
        elsewhere = f"{topic}-elsewhere"
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(topic, case.partitions, 1), NewTopic(elsewhere, case.partitions, 1)]
            )
        finally:
            await admin.close()
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=0, enable_idempotence=False
        )
        await producer.start()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=topic,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=case.fetch_wait_ms,
            session_timeout_ms=2_000,  # the embedded settings' (Tansu joins after half of it)
            heartbeat_interval_ms=600,
        )
        try:
            await fill(producer, topic, case.partitions, case.history_per_partition)
            await fill(producer, elsewhere, case.partitions, case.elsewhere_per_partition)
            await consumer.start()
            held = case.partitions * case.history_per_partition
            read = 0
            deadline = time.monotonic() + 120
            while (read < held or not consumer.assignment()) and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
                read += sum(len(records) for records in batches.values())
            if read < held:
                raise RuntimeError(f"read {read} of the {held} records held within 120 s")
            phases = {}
            for name, phase_rate in (("idle", 0.0), ("light", rate)):
                phases[name] = asdict(
                    await measure(
                        consumer, producer, topic, broker.process.pid, seconds, phase_rate, counter
                    )
                )
        finally:
            await consumer.stop()
            await producer.stop()
    return {"case": asdict(case), "phases": phases}


async def measure(
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    topic: str,
    broker_pid: int,
    seconds: float,
    rate: float,
    counter: FetchCounter,
) -> Phase:
    latencies: list[float] = []
    stop = asyncio.Event()

    async def consume() -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=20)
            now_ms = time.time() * 1000
            for records in batches.values():
                latencies.extend(now_ms - r.timestamp for r in records)

    reader = asyncio.create_task(consume())
    fetches, broker0, client0 = counter.count, process_cpu_seconds(broker_pid), time.process_time()
    started = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - started) < seconds:
        if rate:
            due = int(elapsed * rate) + 1
            while sent < due:
                await producer.send(topic, VALUE, key=str(sent).encode())
                sent += 1
        await asyncio.sleep(1 / rate if rate else 0.1)
    wall = time.monotonic() - started
    fetched = counter.count - fetches
    broker_cpu = process_cpu_seconds(broker_pid) - broker0
    client_cpu = time.process_time() - client0
    await asyncio.sleep(0.3)  # the last records in flight
    stop.set()
    await reader
    return Phase(
        fetches_per_second=round(fetched / wall, 1),
        broker_cores=round(broker_cpu / wall, 3),
        client_cores=round(client_cpu / wall, 3),
        broker_ms_per_fetch=round(1000 * broker_cpu / max(fetched, 1), 3),
        client_ms_per_fetch=round(1000 * client_cpu / max(fetched, 1), 3),
        records=len(latencies),
        latency_p50_ms=percentile(latencies, 0.5),
        latency_p99_ms=percentile(latencies, 0.99),
    )


async def try_delete_records() -> str:
    """Ask a fresh broker to delete a topic's first records; what happened, in words."""
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        topic = f"probe-trim-{uuid.uuid4().hex[:8]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
        await admin.start()
        await producer.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
            await fill(producer, topic, 1, 100)
            low = await asyncio.wait_for(
                admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(50)}), 10
            )
            return f"trimmed: log start now {low[TopicPartition(topic, 0)]}"
        except Exception as exc:
            return f"not trimmed: {type(exc).__name__}: {exc}"
        finally:
            await producer.stop()
            await admin.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        help=f"partitions,fetch wait ms,records held per partition (default: {DEFAULT_CASES})",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="each phase's length")
    parser.add_argument("--rate", type=float, default=100.0, help="records a second (light)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cases = [Case.parse(c) for c in (args.case or DEFAULT_CASES)]
    counter = FetchCounter()
    results = []
    print(
        f"{'partitions':>10} {'wait ms':>7} {'held/part':>9} {'elsewhere':>9} {'phase':>5} "
        f"{'fetch/s':>7} "
        f"{'broker':>6} {'client':>6} {'br ms/f':>7} {'cl ms/f':>7} {'p50 ms':>7} {'p99 ms':>7}"
    )
    for case in cases:
        result = asyncio.run(run_case(case, args.seconds, args.rate, counter))
        results.append(result)
        for name, p in result["phases"].items():
            p50 = "-" if p["latency_p50_ms"] is None else f"{p['latency_p50_ms']:.1f}"
            p99 = "-" if p["latency_p99_ms"] is None else f"{p['latency_p99_ms']:.1f}"
            print(
                f"{case.partitions:>10} {case.fetch_wait_ms:>7} {case.history_per_partition:>9} "
                f"{case.elsewhere_per_partition:>9} {name:>5} {p['fetches_per_second']:>7.0f} "
                f"{p['broker_cores']:>6.2f} "
                f"{p['client_cores']:>6.2f} {p['broker_ms_per_fetch']:>7.2f} "
                f"{p['client_ms_per_fetch']:>7.2f} {p50:>7} {p99:>7}",
                flush=True,
            )
    trimmed = asyncio.run(try_delete_records())
    print(f"DeleteRecords on the embedded broker: {trimmed}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"broker-probe-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "broker-probe",
                "timestamp": stamp,
                "command": " ".join(sys.argv),
                "seconds": args.seconds,
                "rate": args.rate,
                "results": results,
                "delete_records": trimmed,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
