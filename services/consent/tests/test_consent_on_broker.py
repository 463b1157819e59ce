"""The consent service alone on a real broker: its HTTP API, the gate stage, the audit
topic and the consents change feed reaching a second replica."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fastapi import FastAPI

from hdx_consent.app import create_app
from hdx_consent.examples import consent, provision
from hdx_consent.service import ConsentService
from hdx_consent.settings import ConsentSettings
from hdx_shared.auth import LocalTokens, install_auth
from hdx_shared.embedded_broker import BrokerEndpoint
from hdx_shared.envelope import Envelope, Header
from hdx_shared.topics import Topics

pytestmark = [pytest.mark.broker, pytest.mark.slow]
FHIR = {"content-type": "application/fhir+json"}


def settings(kafka: BrokerEndpoint, prefix: str, data: Path) -> ConsentSettings:
    return ConsentSettings(
        **kafka.client_settings,
        topic_prefix=prefix,
        data_dir=data,
        database_url=None,
        environment="test",
        db_check_seconds=0.2,
        outbox_seconds=0.2,
        public_base_url="http://consent.test/fhir",
    )


TOKENS = LocalTokens.generate()


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    install_auth(app, TOKENS.authenticator())  # no exchange here: tokens of a local issuer
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://consent.test",
            headers=TOKENS.headers("system/Consent.cruds"),
        ) as client,
    ):
        yield client


async def read(
    bootstrap: str, topic: str, done: Callable[[list[Any]], bool], wait_s: float = 60
) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + wait_s
    try:
        while not done(out) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


async def until(check: Callable[[], bool], what: str, wait_s: float = 60) -> None:
    deadline = time.monotonic() + wait_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def routed(person: str, event_id: str, candidates: list[dict[str, str]]) -> tuple[bytes, Any]:
    value = orjson.dumps(
        {
            "resourceType": "Observation",
            "id": event_id,
            "status": "final",
            "code": {"text": "test"},
            "subject": {"reference": "Patient/x"},
        }
    )
    env = Envelope(
        event_id=event_id,
        source="urn:test:hospital",
        resource_type="Observation",
        person=person,
        extra={Header.CANDIDATES: orjson.dumps(candidates).decode()},
    )
    return value, [(k, v.encode()) for k, v in env.to_headers().items()]


async def test_consent_service_on_a_broker(kafka: BrokerEndpoint, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"c{tag}."
    topics = Topics(prefix)
    first = create_app(settings(kafka, prefix, tmp_path / "one"))
    second = create_app(settings(kafka, prefix, tmp_path / "two"))  # its own empty SQLite
    candidate = {
        "subscription": f"s-{tag}",
        "subscriber": "care-home",
        "recipient": "Organization/care-home",
        "purpose": "TREAT",
    }

    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(running(first))
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text

        denial = consent(
            provision("deny", actor=["Organization/care-home"]), patient=f"Patient/denied-{tag}"
        )
        r = await client.post("/fhir/Consent", content=orjson.dumps(denial), headers=FHIR)
        assert r.status_code == 201, r.text
        consent_id = r.json()["id"]

        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        try:
            for person, event in ((f"denied-{tag}", f"e1-{tag}"), (f"other-{tag}", f"e2-{tag}")):
                value, headers = routed(person, event, [candidate])
                await producer.send_and_wait(
                    topics.routed, value, key=person.encode(), headers=headers
                )
        finally:
            await producer.stop()

        audits = await read(kafka.bootstrap_servers, topics.audit, lambda o: len(o) >= 2)
        events = {
            orjson.loads(a.value)["entity"][1]["what"]["identifier"]["value"]: orjson.loads(a.value)
            for a in audits
        }
        assert events[f"e1-{tag}"]["outcome"] == "4"
        assert events[f"e2-{tag}"]["outcome"] == "0"
        # Both audited means both decided; read a moment longer to be sure of "only e2".
        decided = await read(kafka.bootstrap_servers, topics.decided, lambda o: False, wait_s=3)
        assert [dict(d.headers)[Header.ID] for d in decided] == [f"e2-{tag}".encode()]
        assert orjson.loads(dict(decided[0].headers)[Header.PERMITTED]) == [candidate]

        changes = await read(kafka.bootstrap_servers, topics.consents, lambda o: len(o) >= 1)
        assert changes[0].key == consent_id.encode()

        # A second replica with its own empty database learns the consent from the topic.
        await stack.enter_async_context(running(second))
        replica: ConsentService = second.state.consent_service
        await until(
            lambda: replica.index.get(consent_id) is not None,
            "the second replica to index the consent",
        )
        # ...and a revocation written on the first reaches it too.
        revoked = {**denial, "id": consent_id, "status": "inactive"}
        r = await client.put(
            f"/fhir/Consent/{consent_id}",
            content=orjson.dumps(revoked),
            headers={**FHIR, "If-Match": 'W/"1"'},
        )
        assert r.status_code == 200, r.text
        await until(
            lambda: getattr(replica.index.get(consent_id), "status", "") == "inactive",
            "the revocation to reach the second replica",
        )
