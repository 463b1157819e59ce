"""The ceiling for the exchange benchmark: a bare aiokafka consume → produce relay.

It does what every HDX stage does around its handler and nothing else: read a batch
(getmany, up to 500 records, 20 ms), send every record on to the next topic with its key,
value and headers (acks=all, idempotence off, and HDX's own producer linger and record batch
size — `HDX_PRODUCER_LINGER_MS`, `HDX_PRODUCER_MAX_BATCH_BYTES` — as hdx_shared.messaging
configures HDX's producers), wait until the broker acknowledged all of them, then commit
the batch's offsets. With several topics it chains one relay per hop in this one process.

`bench/exchange_bench.py` starts it as its own process (so its CPU and memory are measured
like a service's); run by hand:

    .venv/bin/python bench/ceiling.py --bootstrap 127.0.0.1:9092 \\
        --topics bench.ceiling.0,bench.ceiling.1

It prints "ready" once every relay has its partitions, and stops on SIGTERM or SIGINT.

With `--stages` each hop is instead an HDX stage (`hdx_shared.messaging.add_stage` on
`make_broker`, a handler that forwards every record unchanged): the same relay through
HDX's own plumbing, to tell what the plumbing adds from what the services' handlers do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from hdx_shared.settings import HdxSettings

BATCH_RECORDS = 500  # HDX_CONSUMER_BATCH_SIZE's default
BATCH_TIMEOUT_MS = 20  # HDX_CONSUMER_BATCH_TIMEOUT_MS's default


async def relay(
    bootstrap: str,
    source: str,
    target: str,
    group: str,
    producer: AIOKafkaProducer,
    ready: asyncio.Event,
    stop: asyncio.Event,
    fetch_max_wait_ms: int = 500,
) -> int:
    """Relay `source` to `target` batch by batch until `stop`; the number of records moved."""
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=BATCH_RECORDS,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    await consumer.start()
    moved = 0
    try:
        while not consumer.assignment() and not stop.is_set():
            await consumer.getmany(timeout_ms=100)
        ready.set()
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=BATCH_TIMEOUT_MS, max_records=BATCH_RECORDS)
            records = [r for part in batches.values() for r in part]
            if not records:
                continue
            futures = [
                await producer.send(target, r.value, key=r.key, headers=list(r.headers or ()))
                for r in records
            ]
            await asyncio.gather(*futures)
            await consumer.commit()
            moved += len(records)
    finally:
        await consumer.stop()
    return moved


async def run(bootstrap: str, topics: Sequence[str], fetch_max_wait_ms: int = 500) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The producer settings HDX's stages use (make_broker), so the ceiling differs from a
    # stage only by what the stage does around its handler.
    settings = HdxSettings(service_name="ceiling")
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=settings.producer_linger_ms,
        max_batch_size=settings.producer_max_batch_bytes,
        enable_idempotence=False,
    )
    await producer.start()
    tag = uuid.uuid4().hex[:8]
    try:
        readies = [asyncio.Event() for _ in topics[:-1]]
        tasks = [
            asyncio.create_task(
                relay(
                    bootstrap,
                    src,
                    dst,
                    f"bench-ceiling-{tag}-{i}",
                    producer,
                    ready,
                    stop,
                    fetch_max_wait_ms,
                )
            )
            for i, (src, dst, ready) in enumerate(zip(topics, topics[1:], readies, strict=False))
        ]
        waiting = asyncio.ensure_future(asyncio.gather(*(r.wait() for r in readies)))
        pending: list[asyncio.Future[Any]] = [waiting, *tasks]
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if waiting in done:
            print("ready", flush=True)
        moved = await asyncio.gather(*tasks)
        print(f"moved {sum(moved)}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
    return 0


async def run_stages(bootstrap: str, topics: Sequence[str], fetch_max_wait_ms: int) -> int:
    """The relay as HDX stages: add_stage with a forwarding handler, one per hop."""
    from hdx_shared.messaging import Inbound, Outgoing, add_stage, make_broker, start_broker
    from hdx_shared.topics import Topics

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    settings = HdxSettings(
        kafka_bootstrap_servers=bootstrap,
        kafka_idempotence=False,
        consumer_fetch_max_wait_ms=fetch_max_wait_ms,
        service_name="ceiling",
    )
    broker = make_broker(settings)
    tag = uuid.uuid4().hex[:8]

    def forward(target: str) -> Any:
        async def handler(batch: Sequence[Inbound]) -> list[Outgoing]:
            return [Outgoing(target, m.value, m.key, m.envelope.to_headers()) for m in batch]

        return handler

    stages = [
        add_stage(
            broker,
            name=f"hop{i}",
            topic=src,
            group_id=f"bench-ceiling-{tag}-{i}",
            handler=forward(dst),
            settings=settings,
            topics=Topics("bench."),
        )
        for i, (src, dst) in enumerate(itertools.pairwise(topics))
    ]
    await start_broker(broker)
    try:
        while not stop.is_set():
            consumers = [getattr(s.subscriber, "consumer", None) for s in stages]
            if all(c is not None and c.assignment() for c in consumers):
                break
            await asyncio.sleep(0.1)
        print("ready", flush=True)
        await stop.wait()
        print(f"moved {sum(s.messages for s in stages)}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            await broker.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument(
        "--topics", required=True, help="comma-separated: input, [intermediate…,] output"
    )
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=500,
        help="how long a fetch may wait for data (aiokafka's default, which HDX's stages use)",
    )
    parser.add_argument(
        "--stages", action="store_true", help="each hop an HDX stage (add_stage) instead"
    )
    args = parser.parse_args(argv)
    topics = [t for t in args.topics.split(",") if t]
    if len(topics) < 2:
        parser.error("--topics needs an input and an output topic")
    if args.stages:
        return asyncio.run(run_stages(args.bootstrap, topics, args.fetch_max_wait_ms))
    return asyncio.run(run(args.bootstrap, topics, args.fetch_max_wait_ms))


if __name__ == "__main__":
    sys.exit(main())
