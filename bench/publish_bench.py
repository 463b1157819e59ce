"""What publishing a stage's output costs the producing process, per record.

Starts the embedded broker, then publishes the same batches — 500 keyed records of ≈ 600
bytes with 8 headers onto a 6-partition topic, acks=all — in two ways, alternating:

- `send`: aiokafka's `send` for every record, then wait for all the futures (how
  `hdx_shared.messaging.publish_all` published until 2026-12-07);
- `publish_all`: HDX's `publish_all` through a broker from `make_broker`, as every stage
  publishes (one record batch per partition, `send_batch`).

It prints the process's CPU (user + system) and wall time per record for each, best of the
rounds, and writes them to bench/results/publish-<timestamp>.json and publish-latest.json.
The broker runs in its own process, so its CPU is not counted.

Run: `.venv/bin/python bench/publish_bench.py [--batches 30 --rounds 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hdx_shared.embedded_broker import EmbeddedBroker
from hdx_shared.messaging import (
    Outgoing,
    _aiokafka_producer,
    ensure_topics,
    make_broker,
    publish_all,
    start_broker,
)
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import TopicSpec

RESULTS = Path(__file__).resolve().parent / "results"
RECORDS = 500


async def measure(bootstrap: str, batches: int, rounds: int) -> dict[str, Any]:
    topic = f"bench.publish.{uuid.uuid4().hex[:8]}"
    settings = HdxSettings(
        kafka_bootstrap_servers=bootstrap, kafka_idempotence=False, service_name="publish-bench"
    )
    await ensure_topics(settings, [TopicSpec(topic, 6)])
    broker = make_broker(settings)
    await start_broker(broker)
    producer = _aiokafka_producer(broker)
    value = (b"{" + os.urandom(300).hex().encode())[:600]
    headers = {f"hdx_header_{i}": "x" * 30 for i in range(8)}
    batch = [
        Outgoing(topic, value, f"person-{i:05d}-{uuid.uuid4()}".encode(), headers)
        for i in range(RECORDS)
    ]

    async def per_record() -> None:
        futures = [
            await producer.send(
                o.topic, o.value, key=o.key, headers=[(k, v.encode()) for k, v in o.headers.items()]
            )
            for o in batch
        ]
        await asyncio.gather(*futures)

    async def hdx() -> None:
        await publish_all(broker, batch)

    ways: dict[str, Callable[[], Awaitable[None]]] = {"send": per_record, "publish_all": hdx}
    best: dict[str, dict[str, float]] = {}
    try:
        for _ in range(rounds):
            for name, publish in ways.items():
                await publish()  # warm
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(batches):
                    await publish()
                n = batches * RECORDS
                figures = {
                    "cpu_us_per_record": 1e6 * (time.process_time() - cpu) / n,
                    "wall_us_per_record": 1e6 * (time.perf_counter() - wall) / n,
                }
                cpu_us = figures["cpu_us_per_record"]
                if name not in best or cpu_us < best[name]["cpu_us_per_record"]:
                    best[name] = figures
    finally:
        await broker.stop()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30, help="batches of 500 per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with EmbeddedBroker() as embedded:
        best = asyncio.run(measure(embedded.bootstrap_servers, args.batches, args.rounds))
    print(f"publishing {RECORDS}-record batches, best of {args.rounds} rounds of {args.batches}:")
    for name, f in best.items():
        print(
            f"  {name:12s} CPU {f['cpu_us_per_record']:6.1f} µs/record   "
            f"wall {f['wall_us_per_record']:6.1f} µs/record"
        )
    stamp = datetime.now(UTC)
    result = {
        "benchmark": "publish",
        "when": stamp.isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "records_per_batch": RECORDS,
        "batches": args.batches,
        "rounds": args.rounds,
        "results": best,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"publish-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    text = json.dumps(result, indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
    (args.out / "publish-latest.json").write_text(text, encoding="utf-8")
    print(f"\nwrote {path} (and publish-latest.json)")


if __name__ == "__main__":
    main()
