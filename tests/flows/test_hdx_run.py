"""`hdx run` (what `make run` runs) starts everything, seeds the demo, delivers the demo
message, refuses to start twice on the same ports, and stops everything on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hdx_shared.embedded_broker import free_port
from tests.support import TopicReader

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
HDX = str(Path(sys.executable).with_name("hdx"))


def _free_block(size: int = 3) -> int:
    for _ in range(50):
        base = free_port()
        if all(_free(base + i) for i in range(size)):
            return base
    raise AssertionError("no block of free ports")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_hdx_run_starts_seeds_delivers_and_stops_cleanly(tmp_path: Path) -> None:
    broker, base = free_port(), _free_block()
    args = [
        HDX,
        "run",
        "--data-dir",
        str(tmp_path / "data"),
        "--broker-port",
        str(broker),
        "--http-port-base",
        str(base),
    ]
    env = {**os.environ, "COLUMNS": "200"}
    run = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240  # hdx run allows each service 180 s to be ready
        lines: list[str] = []
        assert run.stdout is not None
        while time.monotonic() < deadline:
            line = run.stdout.readline()
            if not line and run.poll() is not None:
                break
            lines.append(line)
            if "Press Ctrl-C to stop" in line:
                break
        out = "".join(lines)
        assert "HDX is running" in out, out
        assert f"127.0.0.1:{broker}" in out
        for port in (base, base + 1, base + 2):
            assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200

        again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode != 0
        assert "in use" in again.stdout + again.stderr

        examples = ROOT / "deploy" / "demo" / "examples"
        bootstrap = f"127.0.0.1:{broker}"
        publish = subprocess.run(
            [
                HDX,
                "publish",
                str(examples / "patient-ada.json"),
                str(examples / "observation-ada.json"),
                "--source",
                "urn:hdx:org:st-marys",
                "--topic",  # St Mary's own topic, as README.md says
                "hdx.inbound.st-marys",
                "--bootstrap",
                bootstrap,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert publish.returncode == 0, publish.stdout + publish.stderr
        feed = TopicReader(bootstrap, ["hdx.feed.oakwood-care-home"])
        try:
            feed.wait_for(
                lambda r: b"sm-obs-5001" in r.value,
                timeout=60,
                what="the demo Observation in the care home's feed",
            )
        finally:
            feed.close()
    finally:
        # Two signals in a row, as a terminal or a supervisor may send: still a clean stop.
        if run.poll() is None:
            os.kill(run.pid, signal.SIGTERM)
            os.kill(run.pid, signal.SIGTERM)
        try:
            run.wait(60)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0
    for port in (base, base + 1, base + 2, broker):
        assert _free(port), f"port {port} still taken after hdx run stopped"
