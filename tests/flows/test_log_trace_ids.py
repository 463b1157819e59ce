"""A service's JSON log lines about a message carry the trace_id and span_id of that
message's trace: an exchange of its own with tracing on (a real OTLP/HTTP receiver), a
message the ingress dead-letters, and its line in the exchange's log."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from hdx_shared.embedded_broker import BrokerEndpoint
from hdx_shared.topics import Topics
from tests.flows.test_tracing import OtlpReceiver
from tests.reliability.harness import (
    BulkPublisher,
    TopicTail,
    ce_headers,
    start_exchange_only,
    tag,
)
from tests.support import register_publisher

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            out.append(line)
    return out


def test_a_dead_letter_line_carries_the_trace_of_its_message(
    kafka: BrokerEndpoint, tmp_path: Path
) -> None:
    receiver = OtlpReceiver().start()
    t = tag()
    topics = Topics(f"logs{t}.")
    proc = start_exchange_only(
        kafka.bootstrap_servers,
        tmp_path,
        topics.prefix,
        idempotence=kafka.idempotence,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    dead = TopicTail(kafka.bootstrap_servers, [topics.deadletter])
    try:
        source = f"urn:hdx:org:logs-{t}"
        register_publisher(proc.url, source)
        # The hospital traced each publish: every message is its own trace. Sent together
        # with one key, so the ingress most likely gets them in one batch.
        traces = {f"logs-{t}-{i}": (secrets.token_hex(16), secrets.token_hex(8)) for i in range(3)}
        publisher = BulkPublisher(
            kafka.bootstrap_servers, idempotence=kafka.idempotence, topic=topics.inbound
        )
        for ce_id, (trace_id, parent) in traces.items():
            publisher.send(
                # Not FHIR: an Observation without status, code or subject.
                orjson.dumps({"resourceType": "Observation", "id": ce_id}),
                key=f"{source}|p1",
                headers=[
                    *ce_headers(source, ce_id),
                    ("traceparent", f"00-{trace_id}-{parent}-01".encode()),
                ],
            )
        publisher.flush()
        for ce_id in traces:
            dead.wait_for(lambda r, c=ce_id: r.headers.get("ce_id") == c, 60, "the dead letter")

        deadline = time.monotonic() + 30
        while True:
            consumed = {
                s.trace_id: s
                for s in receiver.spans
                if s.trace_id in {tid for tid, _ in traces.values()}
                and s.name == f"{topics.inbound} process"
            }
            lines = {
                line.get("event_id"): line
                for line in _json_lines(proc.log_path)
                if str(line.get("event", "")).startswith("dead-lettered")
            }
            if len(consumed) == len(traces) and set(traces) <= set(lines):
                break
            assert time.monotonic() < deadline, (
                f"consumer spans {len(consumed)}, lines {sorted(map(str, lines))}; "
                f"log: {proc.tail()}"
            )
            time.sleep(0.2)
        for ce_id, (trace_id, parent) in traces.items():
            span = consumed[trace_id]
            assert span.parent_id == parent
            line = lines[ce_id]
            # The line is its message's ingress CONSUMER span's: that trace, that span.
            assert (line.get("trace_id"), line.get("span_id")) == (trace_id, span.span_id), line
            assert line.get("stage") == "ingress", line
            # Never the payload.
            assert '"resourceType"' not in json.dumps(line)
    finally:
        dead.close()
        proc.stop()
        receiver.stop()
