"""One trace per message across all three services, received by a real OTLP/HTTP receiver.

The stack here is its own (own topic prefix, tracing on), on the session's broker.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint
from hdx_shared.envelope import derive_event_id
from tests.flows.test_exchange_channels import wait_until
from tests.support import (
    Publisher,
    TopicReader,
    api,
    consent_denying,
    nhs_number,
    observation,
    patient,
    register_publisher,
    subscription_resource,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]
PREFIX = "traced."


@dataclass
class SpanRecord:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]


@dataclass
class OtlpReceiver:
    spans: list[SpanRecord] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> OtlpReceiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                outer._collect(request)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def _collect(self, request: ExportTraceServiceRequest) -> None:
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.append(
                        SpanRecord(
                            service=str(resource.get("service.name")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture(scope="module")
def traced(
    kafka: BrokerEndpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, OtlpReceiver]]:
    receiver = OtlpReceiver().start()
    env = {
        "HDX_KAFKA_IDEMPOTENCE": str(kafka.idempotence).lower(),
        "HDX_TOPIC_PREFIX": PREFIX,
        "HDX_REGISTRY_REFRESH_SECONDS": "0.5",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    stack = LocalStack(
        data_dir=Path(tmp_path_factory.mktemp("traced")),
        bootstrap_servers=kafka.bootstrap_servers,
        extra_env=env,
    )
    stack.start(ready_timeout=90)
    try:
        yield stack, receiver
    finally:
        stack.stop()
        receiver.stop()


def test_one_message_is_one_trace_across_all_services_with_no_patient_data(
    traced: tuple[LocalStack, OtlpReceiver], kafka: BrokerEndpoint
) -> None:
    stack, receiver = traced
    tag = uuid.uuid4().hex[:8]
    source = f"urn:hdx:org:traced-hospital-{tag}"
    ex = stack.url("exchange")
    register_publisher(ex, source)
    permitted, denied = f"Organization/gp-{tag}", f"Organization/insurer-{tag}"
    for recipient in (permitted, denied):
        r = api(stack).post(
            f"{ex}/fhir/Subscription",
            timeout=10,
            content=orjson.dumps(subscription_resource(recipient)),
        )
        assert r.status_code == 201, r.text
    nhs, family, given = nhs_number(), "Featherstonehaugh", "Philippa"
    consent = consent_denying(nhs, denied)
    r = api(stack).post(
        f"{stack.url('consent')}/fhir/Consent",
        content=orjson.dumps(consent),
        headers={"content-type": "application/fhir+json"},
        timeout=10,
    )
    assert r.status_code == 201, r.text

    publisher = Publisher(kafka.bootstrap_servers, idempotence=kafka.idempotence)
    pid, oid = f"local-{uuid.uuid4().hex[:12]}", f"o-{tag}"  # pid: a local identifier
    publisher.publish(
        source,
        patient(pid, nhs, family=family, given=given, birth_date="1958-03-14"),
        topic=f"{PREFIX}inbound",
    )
    ce_id = publisher.publish(source, observation(oid, pid), topic=f"{PREFIX}inbound")
    event_id = derive_event_id(source, ce_id, "0")
    feed = TopicReader(kafka.bootstrap_servers, [f"{PREFIX}feed.gp-{tag}"])
    try:
        feed.wait_for(lambda r: oid.encode() in r.value, timeout=60, what="the delivery")
    finally:
        feed.close()

    def trace_of_event() -> list[SpanRecord]:
        ids = {s.trace_id for s in receiver.spans if s.attributes.get("hdx.event_id") == event_id}
        return [s for s in receiver.spans if s.trace_id in ids]

    wanted_names = {
        f"{PREFIX}inbound process",
        f"{PREFIX}validated process",
        f"{PREFIX}identified process",
        f"{PREFIX}routed process",
        f"{PREFIX}decided process",
        f"{PREFIX}feed.gp-{tag} publish",
        f"{PREFIX}audit publish",
    }
    wait_until(
        lambda: wanted_names <= {s.name for s in trace_of_event()}, 30, "the spans of every hop"
    )
    spans = trace_of_event()
    assert len({s.trace_id for s in spans}) == 1, "one message, one trace"
    assert {s.service for s in spans} >= {"hdx-exchange", "hdx-patient-index", "hdx-consent"}
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_id]
    assert len(roots) == 1 and roots[0].name == f"{PREFIX}inbound process"
    for s in spans:
        assert not s.parent_id or s.parent_id in by_id, f"{s.name} has a broken parent link"
    # Each hop's consumer span is the child of the previous hop's producer span.
    for s in spans:
        if s.name.endswith(" process") and s.parent_id:
            parent = by_id[s.parent_id]
            assert parent.name == s.name.replace(" process", " publish")
            assert parent.service != s.service or parent.service == "hdx-exchange"
            assert s.attributes["messaging.system"] == "kafka"
            assert s.attributes["messaging.consumer.group.name"].startswith("traced-")
            assert "messaging.kafka.offset" in s.attributes
    audit = [s for s in spans if s.name == f"{PREFIX}audit publish"]
    assert len(audit) == 2, "a permit and a deny, each audited"
    # The database work a message causes is in its trace too (SQLAlchemy's instrumentation).
    wait_until(
        lambda: any("db.system" in s.attributes for s in trace_of_event()),
        30,
        "a database span in the message's trace",
    )
    spans = trace_of_event()
    for s in spans:
        text = orjson.dumps(s.attributes).decode()
        for secret in (nhs, family, given, "1958-03-14", pid):
            assert secret not in text, f"{s.name} carries patient data ({secret!r})"


def test_hdx_trace_prints_the_path_of_a_message_from_the_topics(
    traced: tuple[LocalStack, OtlpReceiver], kafka: BrokerEndpoint
) -> None:
    stack, _ = traced
    tag = uuid.uuid4().hex[:8]
    source = f"urn:hdx:org:traced-hospital-{tag}"
    ex = stack.url("exchange")
    register_publisher(ex, source)
    r = api(stack).post(
        f"{ex}/fhir/Subscription",
        timeout=10,
        content=orjson.dumps(subscription_resource(f"Organization/ward-{tag}")),
    )
    assert r.status_code == 201, r.text
    publisher = Publisher(kafka.bootstrap_servers, idempotence=kafka.idempotence)
    pid = f"local-{uuid.uuid4().hex[:12]}"
    nhs = nhs_number()
    publisher.publish(source, patient(pid, nhs), topic=f"{PREFIX}inbound")
    ce_id = publisher.publish(source, observation(f"o-{tag}", pid), topic=f"{PREFIX}inbound")
    bad_id = publisher.publish(
        source,
        {
            "resourceType": "Observation",
            "status": "final",
            "subject": {"reference": f"Patient/{pid}"},
        },
        topic=f"{PREFIX}inbound",
    )
    feed = TopicReader(kafka.bootstrap_servers, [f"{PREFIX}feed.ward-{tag}"])
    try:
        feed.wait_for(lambda r: f"o-{tag}".encode() in r.value, timeout=60, what="delivery")
    finally:
        feed.close()

    env = {
        **os.environ,
        "HDX_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "HDX_TOPIC_PREFIX": PREFIX,
        "COLUMNS": "250",
    }
    hdx = str(Path(sys.executable).with_name("hdx"))
    done = subprocess.run(
        [hdx, "trace", ce_id, "--source", source],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for step in (
        "published",
        "accepted",
        "identified",
        "routed",
        "consent permit",
        "permitted",
        f"delivered to ward-{tag}",
    ):
        assert step in out, f"'{step}' missing from:\n{out}"
    assert nhs not in out

    dead = subprocess.run(
        [hdx, "trace", bad_id, "--source", source],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dead.returncode == 0, dead.stderr
    assert "dead-lettered (invalid-resource)" in dead.stdout
    assert "code" in dead.stdout
