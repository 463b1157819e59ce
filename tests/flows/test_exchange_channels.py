"""The exchange's face: FHIR REST publishing with a real FHIR client, and rest-hook
subscribers that fail, recover or are down — on a real broker, all services running."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson
import pytest
from fhirpy import SyncFHIRClient

from hdx_shared.devstack import LocalStack
from tests.support import (
    admin_headers,
    api,
    nhs_number,
    observation,
    patient,
    register_publisher,
    subscription_resource,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@dataclass
class Receiver:
    """A subscriber's HTTP endpoint: records what it is sent, can fail the first N POSTs."""

    fail_first: int = 0
    hang_seconds: float = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/notify"

    def start(self) -> Receiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.attempts += 1
                if outer.hang_seconds:
                    time.sleep(outer.hang_seconds)
                    return
                if outer.attempts <= outer.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                outer.received.append(orjson.loads(body))
                outer.headers.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def observation_ids(self) -> list[str]:
        out = []
        for bundle in self.received:
            for entry in bundle.get("entry", [])[1:]:
                out.append(entry["resource"]["id"])
        return out

    def event_numbers(self) -> list[int]:
        numbers = []
        for bundle in self.received:
            status = bundle["entry"][0]["resource"]
            event = next(p for p in status["parameter"] if p["name"] == "notification-event")
            numbers.append(
                int(next(p["valueString"] for p in event["part"] if p["name"] == "event-number"))
            )
        return numbers


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.stop()


def _client(stack: LocalStack, source: str) -> SyncFHIRClient:
    return SyncFHIRClient(
        f"{stack.url('exchange')}/fhir",
        extra_headers={
            "ce-source": source,
            "content-type": "application/fhir+json",
            **admin_headers(stack),
        },
    )


def test_rest_publisher_and_rest_hook_subscriber_that_fails_twice_get_everything_once_in_order(
    stack: LocalStack, receivers: list[Receiver]
) -> None:
    tag = uuid.uuid4().hex[:8]
    source = f"urn:hdx:org:rest-hospital-{tag}"
    register_publisher(stack.url("exchange"), source)
    receiver = Receiver(fail_first=2).start()
    receivers.append(receiver)
    client = _client(stack, source)

    sub = client.resource(
        "Subscription",
        **subscription_resource(
            f"Organization/rest-home-{tag}",
            endpoint=receiver.url,
            headers=["Authorization: Bearer test-token"],
        ),
    )
    sub.save()
    assert sub.id

    pid = f"p-{tag}"
    obs_ids = [f"o-{tag}-{i}" for i in range(3)]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": patient(pid, nhs_number()),
                "request": {"method": "PUT", "url": f"Patient/{pid}"},
            },
            *[
                {
                    "resource": observation(oid, pid, value=float(i)),
                    "request": {"method": "POST", "url": "Observation"},
                }
                for i, oid in enumerate(obs_ids)
            ],
        ],
    }
    response = client.execute("", method="post", data=bundle)
    assert response["type"] == "transaction-response"
    assert [e["response"]["status"] for e in response["entry"]] == ["202 Accepted"] * 4

    wait_until(lambda: len(receiver.received) >= 3, 60, "three notifications at the rest-hook")
    time.sleep(1.0)  # anything sent twice would arrive within the back-off window
    assert receiver.observation_ids() == obs_ids, "everything once, in order"
    assert receiver.event_numbers() == [1, 2, 3]
    assert receiver.attempts == 5, "two refused attempts, then three deliveries"
    assert receiver.headers[0].get("Authorization") == "Bearer test-token"

    events = (
        api(stack)
        .get(f"{stack.url('exchange')}/fhir/Subscription/{sub.id}/$events", timeout=10)
        .json()
    )
    numbers = [
        p for p in events["entry"][0]["resource"]["parameter"] if p["name"] == "notification-event"
    ]
    assert len(numbers) == 3, events

    # The publisher deletes one: the subscriber is told, in order, with the next number.
    client.execute(f"Observation/{obs_ids[0]}", method="delete")
    wait_until(lambda: len(receiver.received) >= 4, 60, "the deletion notification")
    deletion = receiver.received[3]["entry"][1]
    assert deletion["request"] == {"method": "DELETE", "url": f"Observation/{obs_ids[0]}"}
    assert "resource" not in deletion
    assert receiver.event_numbers() == [1, 2, 3, 4]
    r = api(stack).delete(
        f"{stack.url('exchange')}/fhir/Observation/never-sent",
        headers={"ce-source": source},
        timeout=10,
    )
    assert r.status_code == 404


def test_a_hanging_endpoint_does_not_delay_another_subscriber(
    stack: LocalStack, receivers: list[Receiver]
) -> None:
    tag = uuid.uuid4().hex[:8]
    source = f"urn:hdx:org:rest-hospital-{tag}"
    register_publisher(stack.url("exchange"), source)
    healthy = Receiver().start()
    hanging = Receiver(hang_seconds=30).start()  # longer than the exchange's POST timeout
    receivers += [healthy, hanging]
    client = _client(stack, source)
    pid = f"p-{tag}"
    stuck = client.resource(
        "Subscription",
        **subscription_resource(f"Organization/stuck-home-{tag}", endpoint=hanging.url),
    )
    stuck.save()
    client.resource(
        "Subscription",
        **subscription_resource(f"Organization/live-home-{tag}", endpoint=healthy.url),
    ).save()

    client.execute(f"Patient/{pid}", method="put", data=patient(pid, nhs_number()))
    for i in range(3):
        client.execute("Observation", method="post", data=observation(f"o-{tag}-{i}", pid))
    wait_until(lambda: len(healthy.received) >= 3, 30, "the healthy subscriber's notifications")
    # Each POST to the hanging endpoint waits out a 2 s timeout, four times, before the
    # first notification is given up; the healthy subscriber was not behind it.
    assert hanging.received == []
    assert hanging.attempts <= 2

    def stuck_status() -> dict[str, Any]:
        r = api(stack).get(f"{stack.url('exchange')}/fhir/Subscription/{stuck.id}", timeout=10)
        return dict(r.json())

    wait_until(
        lambda: stuck_status()["status"] == "error",
        60,
        "the hanging subscription to show its error",
    )
    assert "ReadTimeout" in stuck_status()["error"]


def test_rest_publishing_refuses_bad_input_with_an_outcome(stack: LocalStack) -> None:
    tag = uuid.uuid4().hex[:8]
    source = f"urn:hdx:org:rest-hospital-{tag}"
    register_publisher(stack.url("exchange"), source)
    url = f"{stack.url('exchange')}/fhir"
    headers = {"ce-source": source, "content-type": "application/fhir+json"}

    r = api(stack).post(
        f"{url}/Observation", content=b'{"resourceType": "Observation"}', headers=headers
    )
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"

    r = api(stack).post(
        f"{url}/Patient",
        content=orjson.dumps(patient("x", nhs_number())),
        headers={**headers, "ce-source": "urn:hdx:org:nobody"},
    )
    assert r.status_code == 403
    assert "not a registered publisher" in r.text

    r = api(stack).post(f"{url}/Patient", content=b"{nope", headers=headers)
    assert r.status_code == 400

    # The body must be what the URL names: its type, and for an update its id.
    r = api(stack).post(
        f"{url}/Observation", content=orjson.dumps(patient("x", nhs_number())), headers=headers
    )
    assert r.status_code == 400 and "the URL says Observation" in r.text
    r = api(stack).put(
        f"{url}/Patient/other", content=orjson.dumps(patient("x", nhs_number())), headers=headers
    )
    assert r.status_code == 400 and "is not the URL's 'other'" in r.text
    assert r.json()["issue"][0]["expression"] == ["id"]

    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": patient(f"p-{tag}", nhs_number()),
                "request": {"method": "PUT", "url": f"Patient/p-{tag}"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "subject": {"reference": f"Patient/p-{tag}"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    r = api(stack).post(url, content=orjson.dumps(batch), headers=headers)
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses[0] == "202 Accepted"
    assert statuses[1].startswith("4")

    meta = httpx.get(f"{url}/metadata").json()
    assert meta["resourceType"] == "CapabilityStatement"
    assert meta["fhirVersion"] == "4.0.1"
