"""The whole service on a real broker: create_app's lifespan, the stage, parking, links,
the park timeout, and the HTTP API answering about what went through."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pix_builders import NHS_A, ST_MARYS, observation, patient

from hdx_patient_index.app import create_app
from hdx_patient_index.domain.identifiers import NHS_NUMBER, PERSON_SYSTEM
from hdx_patient_index.settings import PatientIndexSettings
from hdx_shared.auth import LocalTokens, install_auth
from hdx_shared.embedded_broker import BrokerEndpoint
from hdx_shared.envelope import Envelope
from hdx_shared.topics import Topics

pytestmark = [pytest.mark.broker]


async def _read(bootstrap: str, topic: str, count: int, wait_s: float = 45) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + wait_s
    try:
        while len(out) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def _headers(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


async def test_the_service_on_a_real_broker(kafka: BrokerEndpoint, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    topics = Topics(prefix=f"pix{tag}.")
    settings = PatientIndexSettings(
        environment="test",
        **kafka.client_settings,
        topic_prefix=topics.prefix,
        data_dir=tmp_path,
        park_timeout_seconds=1.0,
        park_sweep_seconds=0.3,
        log_json=False,
    )
    app = create_app(settings)
    tokens = LocalTokens.generate()
    install_auth(app, tokens.authenticator())  # no exchange here: a local issuer's tokens
    async with app.router.lifespan_context(app):
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        try:

            async def send(resource: dict[str, Any], local: str) -> None:
                env = Envelope(
                    event_id=str(uuid.uuid4()),
                    source=ST_MARYS,
                    resource_type=resource["resourceType"],
                    patient_ref=local,
                )
                await producer.send_and_wait(
                    topics.validated,
                    orjson.dumps(resource),
                    key=f"{ST_MARYS}|{local}".encode(),
                    headers=[(k, v.encode()) for k, v in env.to_headers().items()],
                )

            # The Observation first: parked until its Patient arrives, then released after it.
            await send(observation("o1", "p1"), "p1")
            await send(patient("p1", nhs=NHS_A), "p1")
            # An Observation whose Patient never comes: dead-lettered after the timeout.
            await send(observation("o9", "ghost"), "ghost")
        finally:
            await producer.stop()

        identified = await _read(kafka.bootstrap_servers, topics.identified, 2)
        assert [orjson.loads(r.value)["id"] for r in identified] == ["p1", "o1"]
        person = _headers(identified[0])["hdx_person"]
        assert all(r.key == person.encode() for r in identified)
        subject = orjson.loads(identified[1].value)["subject"]
        assert subject["identifier"] == {"system": PERSON_SYSTEM, "value": person}
        assert _headers(identified[1])["hdx_person_identifiers"] == f"{NHS_NUMBER}|{NHS_A}"

        [link] = await _read(kafka.bootstrap_servers, topics.links, 1)
        assert orjson.loads(link.value)["person"] == person

        dead = await _read(kafka.bootstrap_servers, topics.deadletter, 1)
        assert [_headers(d)["hdx_reason"] for d in dead] == ["patient-unknown"]
        assert orjson.loads(dead[0].value)["id"] == "o9"

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://pix",
            headers=tokens.headers("system/Patient.rs"),
        ) as client:
            r = await client.get("/fhir/Patient", params={"identifier": f"{NHS_NUMBER}|{NHS_A}"})
            assert [e["resource"]["id"] for e in r.json()["entry"]] == [person]
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
