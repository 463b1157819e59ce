"""The publishing examples in docs/publishing.md work as written (against the test broker)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint
from tests.support import TopicReader, register_client, register_publisher

pytestmark = [pytest.mark.broker, pytest.mark.slow]
DOC = Path(__file__).resolve().parents[2] / "docs" / "publishing.md"
SOURCE = "urn:hdx:org:st-marys"


def _block(language: str, index: int = 0) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) > index, f"docs/publishing.md has no {language} example {index}"
    return str(blocks[index])


@pytest.fixture(scope="module")
def registered(stack: LocalStack) -> LocalStack:
    # As the docs say the demo registers St Mary's: its own topic is hdx.inbound.st-marys.
    register_publisher(stack.url("exchange"), SOURCE, topic_name="st-marys")
    return stack


def test_the_confluent_kafka_example_publishes_an_accepted_observation(
    registered: LocalStack, kafka: BrokerEndpoint
) -> None:
    code = _block("python").replace("127.0.0.1:9092", kafka.bootstrap_servers)
    reader = TopicReader(kafka.bootstrap_servers, ["hdx.validated"])
    try:
        exec(compile(code, str(DOC), "exec"), {})
        reader.wait_for(
            lambda r: r.headers.get("ce_source") == SOURCE and b"sm-obs-5001" in r.value,
            timeout=60,
            what="the documented Observation, accepted by the exchange",
        )
    finally:
        reader.close()


def test_the_kcat_example_publishes_an_accepted_patient(
    registered: LocalStack, kafka: BrokerEndpoint
) -> None:
    if shutil.which("kcat") is None:
        pytest.skip("kcat is not installed (apt-get install kcat) — the example is not run")
    if kafka.kind == "embedded":
        pytest.skip(
            "kcat 1.7 (Debian's librdkafka) fails ApiVersions against the embedded Tansu "
            "broker ('Read underflow'); this example runs against Apache Kafka only"
        )
    command = _block("bash").replace("127.0.0.1:9092", kafka.bootstrap_servers)
    reader = TopicReader(kafka.bootstrap_servers, ["hdx.validated"])
    try:
        subprocess.run(["bash", "-c", command], check=True, timeout=30, cwd=DOC.parents[1])
        reader.wait_for(
            lambda r: (
                r.headers.get("ce_source") == SOURCE
                and b'"sm-1001"' in r.value
                and r.headers.get("hdx_resource_type") == "Patient"
            ),
            timeout=60,
            what="the documented Patient, accepted by the exchange",
        )
    finally:
        reader.close()


def test_the_fhir_rest_example_publishes_with_a_token(
    registered: LocalStack, kafka: BrokerEndpoint
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed — the example is not run")
    register_client(registered, "st-marys", "system/Patient.cud", source=SOURCE)
    key = registered.client_key_path("st-marys")
    exchange = registered.url("exchange")
    command = (
        _block("bash", 1)
        .replace("data/auth/clients/st-marys.pem", f"{key} --exchange {exchange}")
        .replace("http://127.0.0.1:8003", exchange)
    )
    assert str(key) in command and "Authorization: Bearer $TOKEN" in command
    reader = TopicReader(kafka.bootstrap_servers, ["hdx.validated"])
    try:
        done = subprocess.run(
            ["bash", "-c", command], timeout=60, cwd=DOC.parents[1], capture_output=True, text=True
        )
        assert done.returncode == 0 and "accepted Patient" in done.stdout, done
        reader.wait_for(
            lambda r: (
                r.headers.get("ce_source") == SOURCE
                and r.headers.get("hdx_resource_type") == "Patient"
                and b"Lovelace" in r.value
            ),
            timeout=60,
            what="the Patient published over FHIR REST, accepted by the exchange",
        )
    finally:
        reader.close()
