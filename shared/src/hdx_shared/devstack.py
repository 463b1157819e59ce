"""Run HDX on one machine: the embedded broker and each service as its own process.

`hdx run` and the flow tests both use this, so what a newcomer runs is what is tested.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from hdx_shared.embedded_broker import EmbeddedBroker, free_port


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # as in services/<name>
    module: str  # python -m <module>


SERVICES: tuple[ServiceSpec, ...] = (
    # In this order `hdx run` gives them consecutive ports (8001, 8002, 8003 by default).
    ServiceSpec("patient-index", "hdx_patient_index"),
    ServiceSpec("consent", "hdx_consent"),
    ServiceSpec("exchange", "hdx_exchange"),
)


class ServiceStartError(RuntimeError):
    pass


@dataclass
class ServiceProcess:
    spec: ServiceSpec
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.spec.module],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise ServiceStartError(
                    f"{self.spec.name} exited with {self.process.returncode}; "
                    f"last lines of {self.log_path}:\n{self.tail()}"
                )
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=1.0)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise ServiceStartError(
            f"{self.spec.name} not ready after {timeout:.0f}s ({last}); "
            f"last lines of {self.log_path}:\n{self.tail()}"
        )

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if self._log:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class LocalStack:
    """A broker (embedded unless bootstrap_servers is given) and the three services."""

    data_dir: Path
    bootstrap_servers: str | None = None
    ports: Mapping[str, int] = field(default_factory=dict)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    database_urls: Mapping[str, str] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        if self.bootstrap_servers:
            return self.bootstrap_servers
        assert self.broker is not None
        return self.broker.bootstrap_servers

    def start(self, ready_timeout: float = 60.0) -> LocalStack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        busy = [
            f"{name} (port {port})"
            for name, port in self.ports.items()
            if port and not (name == "broker" and self.bootstrap_servers) and not _port_free(port)
        ]
        if busy:
            # Else a service would fail to bind and the readiness probe would find whatever
            # already answers there — another HDX, most likely.
            raise ServiceStartError(f"ports in use: {', '.join(busy)}; is HDX already running?")
        if not self.bootstrap_servers:
            self.broker = EmbeddedBroker(
                port=self.ports.get("broker", 0), log_path=self.data_dir / "logs" / "broker.log"
            )
            self.broker.start()
        try:
            for spec in SERVICES:
                port = self.ports.get(spec.name) or free_port()
                env = {
                    **os.environ,
                    "HDX_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                    # The embedded broker has no InitProducerId; Apache Kafka keeps it on.
                    "HDX_KAFKA_IDEMPOTENCE": "false"
                    if self.broker
                    else os.environ.get("HDX_KAFKA_IDEMPOTENCE", "true"),
                    "HDX_HTTP_PORT": str(port),
                    # Tansu does not answer a waiting fetch when data arrives: poll briskly.
                    **({"HDX_CONSUMER_FETCH_MAX_WAIT_MS": "10"} if self.broker else {}),
                    "HDX_DATA_DIR": str(self.data_dir),
                    "HDX_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}/fhir",
                    "OTEL_SERVICE_NAME": f"hdx-{spec.name}",
                    **self.extra_env,
                }
                if spec.name in self.database_urls:
                    env["HDX_DATABASE_URL"] = self.database_urls[spec.name]
                proc = ServiceProcess(spec, port, env, self.data_dir / "logs" / f"{spec.name}.log")
                self.services[spec.name] = proc
                proc.start()
            for proc in self.services.values():
                proc.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, service: str) -> str:
        return self.services[service].url

    def restart(self, service: str, *, kill: bool = False, ready_timeout: float = 60.0) -> None:
        proc = self.services[service]
        proc.kill() if kill else proc.stop()
        proc.start()
        proc.wait_ready(ready_timeout)

    def stop(self) -> None:
        for proc in reversed(list(self.services.values())):
            proc.stop()
        if self.broker:
            self.broker.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextmanager
def local_stack(data_dir: Path, **kwargs: object) -> Iterator[LocalStack]:
    stack = LocalStack(data_dir, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield stack
    finally:
        stack.stop()
