"""The tamper-evident audit log: every decision's AuditEvent is in a patient's trail, and
altering, removing or cutting off records makes `hdx audit verify` fail and point at them."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest

from hdx_shared.devstack import LocalStack
from hdx_shared.embedded_broker import BrokerEndpoint
from tests.support import (
    NHS,
    Publisher,
    api,
    nhs_number,
    observation,
    patient,
    register_publisher,
    subscription_resource,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _verify(stack: LocalStack) -> dict:  # type: ignore[type-arg]
    return dict(api(stack).get(f"{stack.url('exchange')}/admin/audit/verify", timeout=60).json())


def test_a_patients_trail_is_queryable_and_tampering_is_detected(
    stack: LocalStack, kafka: BrokerEndpoint
) -> None:
    tag = uuid.uuid4().hex[:8]
    source = f"urn:hdx:org:audited-{tag}"
    ex = stack.url("exchange")
    register_publisher(ex, source)
    r = api(stack).post(
        f"{ex}/fhir/Subscription",
        timeout=10,
        content=orjson.dumps(subscription_resource(f"Organization/audit-home-{tag}")),
    )
    assert r.status_code == 201, r.text
    nhs = nhs_number()
    pid = f"local-{uuid.uuid4().hex[:10]}"
    publisher = Publisher(kafka.bootstrap_servers, idempotence=kafka.idempotence)
    publisher.publish(source, patient(pid, nhs))
    for i in range(3):
        publisher.publish(source, observation(f"o-{tag}-{i}", pid))

    person: str | None = None
    deadline = time.monotonic() + 60
    trail: list[dict] = []  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        found = (
            api(stack)
            .get(
                f"{stack.url('patient-index')}/fhir/Patient",
                params={"identifier": f"{NHS}|{nhs}"},
                timeout=10,
            )
            .json()
        )
        if found.get("entry"):
            person = found["entry"][0]["resource"]["id"]
            bundle = (
                api(stack)
                .get(f"{ex}/fhir/AuditEvent", params={"patient": f"Patient/{person}"}, timeout=10)
                .json()
            )
            trail = [e["resource"] for e in bundle.get("entry", [])]
            if len(trail) >= 3:
                break
        time.sleep(0.2)
    assert person is not None, "the patient was never identified"
    assert len(trail) >= 3, f"the audit trail has {len(trail)} of 3 decisions"
    assert all(e["resourceType"] == "AuditEvent" for e in trail)
    assert nhs not in orjson.dumps(trail).decode()

    # The anchor follows its batch's append onto the anchors topic: wait until it is there.
    deadline = time.monotonic() + 30
    result = _verify(stack)
    while time.monotonic() < deadline:
        anchor = result["anchor"]
        if anchor and anchor["seq"] == result["records"]:
            break
        time.sleep(0.5)
        result = _verify(stack)
    assert result["intact"], result["problems"]
    assert result["anchor"] is not None, "no audit anchor was ever published"
    assert result["anchor"]["seq"] == result["records"], result

    db = Path(stack.data_dir) / "exchange.db"
    target_seq = result["records"] - 1
    with sqlite3.connect(db) as conn:
        (original,) = conn.execute(
            "SELECT body FROM audit_log WHERE seq = ?", (target_seq,)
        ).fetchone()
        conn.execute(
            "UPDATE audit_log SET body = ? WHERE seq = ?",
            (original.replace(b"AuditEvent", b"AuditEvenT", 1), target_seq),
        )
    try:
        tampered = _verify(stack)
        assert not tampered["intact"]
        assert [(p["seq"], p["what"]) for p in tampered["problems"]] == [
            (target_seq, "content altered")
        ]
        hdx = str(Path(sys.executable).with_name("hdx"))
        cli = subprocess.run(
            [
                *(hdx, "audit", "verify", "--exchange", ex),
                *("--client-id", "hdx-admin", "--key", str(stack.client_key_path("hdx-admin"))),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={"COLUMNS": "200", "PATH": ""},
        )
        assert cli.returncode == 1
        assert f"record {target_seq}" in cli.stdout
    finally:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE audit_log SET body = ? WHERE seq = ?", (original, target_seq))

    # Cutting off the newest record shows against the anchor, though the chain is consistent.
    last = result["records"]
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT * FROM audit_log WHERE seq = ?", (last,)).fetchone()
        conn.execute("DELETE FROM audit_log WHERE seq = ?", (last,))
    try:
        cut = _verify(stack)
        assert not cut["intact"]
        # "cut off" against the anchor — or "missing", if more records arrived since.
        assert any(p["seq"] == last for p in cut["problems"]), cut["problems"]
    finally:
        with sqlite3.connect(db) as conn:
            conn.execute(f"INSERT INTO audit_log VALUES ({','.join('?' * len(row))})", row)
    assert _verify(stack)["intact"]
