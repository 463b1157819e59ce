"""Run HDX on one machine: the embedded broker and each service as its own process.

`hdx run` and the flow tests both use this, so what a newcomer runs is what is tested.

Authentication is on, as in production: the stack keeps HDX's token signing key and an
admin client's key under ``<data_dir>/auth/`` (made on first start, kept after), registers
the admin client (and any `clients` given) through the exchange's HDX_AUTH_CLIENTS_FILE,
and gets tokens the way an integrator does (`admin_auth`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import orjson

from hdx_shared.auth import (
    ADMIN_SCOPE,
    IDENTITY_SCOPE,
    ClientCredentials,
    Key,
    clients_file_entry,
    generate_key,
    load_private_key,
    private_pem,
)
from hdx_shared.embedded_broker import EMBEDDED_CLIENT_SETTINGS, EmbeddedBroker, free_port

ADMIN_CLIENT = "hdx-admin"
ADMIN_CLIENT_SCOPE = f"system/*.cruds {ADMIN_SCOPE} {IDENTITY_SCOPE}"


@dataclass(frozen=True)
class ClientSpec:
    """A client the stack registers at start, with a key it keeps in its data dir."""

    client_id: str
    scope: str
    source: str | None = None
    subscriber: str | None = None
    name: str | None = None


def client_key_path(auth_dir: Path, client_id: str) -> Path:
    return auth_dir / "clients" / f"{client_id.replace('/', '_')}.pem"


def exchange_auth_env(
    auth_dir: Path, issuer: str, clients: Sequence[ClientSpec] = ()
) -> dict[str, str]:
    """The exchange's HDX_AUTH_* settings for a local run: its address as the issuer, HDX's
    signing key and the client registrations (the admin and `clients`), with keys made under
    `auth_dir` if missing."""
    signing_key = auth_dir / "signing-key.pem"
    key_file(signing_key)
    specs = [ClientSpec(ADMIN_CLIENT, ADMIN_CLIENT_SCOPE, name="HDX admin"), *clients]
    entries = [
        clients_file_entry(
            c.client_id,
            key_file(client_key_path(auth_dir, c.client_id)),
            c.scope,
            name=c.name,
            source=c.source,
            subscriber=c.subscriber,
        )
        for c in specs
    ]
    clients_file = auth_dir / "clients.json"
    clients_file.write_bytes(orjson.dumps(entries, option=orjson.OPT_INDENT_2))
    return {
        "HDX_AUTH_ISSUER": issuer,
        "HDX_AUTH_SIGNING_KEY_FILE": str(signing_key),
        "HDX_AUTH_CLIENTS_FILE": str(clients_file),
    }


# The auth dirs of the exchanges this process started, by address: so a helper handed only
# an exchange's address can authenticate as its admin (`admin_auth_for`).
_AUTH_DIRS: dict[str, Path] = {}


def remember_exchange(exchange_url: str, auth_dir: Path) -> None:
    _AUTH_DIRS[exchange_url.rstrip("/")] = auth_dir


def forget_exchange(exchange_url: str) -> None:
    _AUTH_DIRS.pop(exchange_url.rstrip("/"), None)


def admin_auth_for(exchange_url: str, scope: str | None = None) -> ClientCredentials | None:
    """The admin client of an exchange this process started (None if it did not)."""
    auth_dir = _AUTH_DIRS.get(exchange_url.rstrip("/"))
    if auth_dir is None:
        return None
    return ClientCredentials.from_key_file(
        ADMIN_CLIENT,
        client_key_path(auth_dir, ADMIN_CLIENT),
        f"{exchange_url.rstrip('/')}/auth/token",
        scope,
    )


def key_file(path: Path) -> Key:
    """The private key in `path`, made (EC P-384, mode 0600) if there is none yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem(generate_key()))
    return load_private_key(path.read_bytes())


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


def replica_name(service: str, index: int) -> str:
    """The first replica keeps the service's name; the others are <name>-2, <name>-3, …"""
    return service if index == 0 else f"{service}-{index + 1}"


@dataclass
class LocalStack:
    """A broker (embedded unless bootstrap_servers is given) and the three services.

    A service may run as several processes (`replicas`, e.g. {"exchange": 2}), each with
    its own HTTP port, log file (exchange-2.log) and, from `replica_env`, its own settings
    on top of the others' (e.g. the exchange's stages split between two processes). They
    share the service's database. The first replica starts, and migrates, alone; the
    others start once every service's first replica is ready.
    """

    data_dir: Path
    bootstrap_servers: str | None = None
    ports: Mapping[str, int] = field(default_factory=dict)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    database_urls: Mapping[str, str] = field(default_factory=dict)
    clients: Sequence[ClientSpec] = ()
    replicas: Mapping[str, int] = field(default_factory=dict)
    replica_env: Mapping[str, Sequence[Mapping[str, str]]] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    # By replica name: the first replica of each service under the service's own name.
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def replica_count(self, service: str) -> int:
        return max(self.replicas.get(service, 1), len(self.replica_env.get(service, ())), 1)

    def replica_names(self, service: str) -> list[str]:
        """A service's processes by name (exchange, exchange-2, …), the first one first."""
        names = (replica_name(service, i) for i in range(self.replica_count(service)))
        return [name for name in names if name in self.services]

    def replicas_of(self, service: str) -> list[ServiceProcess]:
        """A service's processes, the first one first."""
        return [self.services[name] for name in self.replica_names(service)]

    @property
    def bootstrap(self) -> str:
        if self.bootstrap_servers:
            return self.bootstrap_servers
        assert self.broker is not None
        return self.broker.bootstrap_servers

    @property
    def auth_dir(self) -> Path:
        return self.data_dir / "auth"

    def client_key_path(self, client_id: str) -> Path:
        return client_key_path(self.auth_dir, client_id)

    @property
    def token_url(self) -> str:
        return f"{self.url('exchange')}/auth/token"

    def client_auth(self, client_id: str, scope: str | None = None) -> ClientCredentials:
        """httpx auth as one of the stack's clients (tokens fetched as an integrator would)."""
        return ClientCredentials.from_key_file(
            client_id, self.client_key_path(client_id), self.token_url, scope
        )

    def admin_auth(self, scope: str | None = None) -> ClientCredentials:
        return self.client_auth(ADMIN_CLIENT, scope)

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
        ports: dict[str, int] = {}
        for spec in SERVICES:
            for i in range(self.replica_count(spec.name)):
                name = replica_name(spec.name, i)
                port = self.ports.get(name) or free_port()
                while port in ports.values():
                    port = free_port()
                ports[name] = port
        # The exchange issues the tokens: its signing key and the client registrations.
        # Every exchange replica has the first one's address as the issuer.
        issuer = f"http://127.0.0.1:{ports['exchange']}"
        exchange_env = exchange_auth_env(self.auth_dir, issuer, self.clients)
        first: list[ServiceProcess] = []
        later: list[ServiceProcess] = []
        try:
            for spec in SERVICES:
                for i in range(self.replica_count(spec.name)):
                    name = replica_name(spec.name, i)
                    port = ports[name]
                    auth_env = {"HDX_AUTH_ISSUER": issuer}
                    if spec.name == "exchange":
                        auth_env |= exchange_env
                    own = self.replica_env.get(spec.name, ())
                    env = {
                        **os.environ,
                        "HDX_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                        # The embedded broker has no InitProducerId; Apache Kafka keeps it on.
                        "HDX_KAFKA_IDEMPOTENCE": "false"
                        if self.broker
                        else os.environ.get("HDX_KAFKA_IDEMPOTENCE", "true"),
                        "HDX_HTTP_PORT": str(port),
                        **(
                            {
                                f"HDX_{k.upper()}": str(v)
                                for k, v in EMBEDDED_CLIENT_SETTINGS.items()
                            }
                            if self.broker
                            else {}
                        ),
                        "HDX_DATA_DIR": str(self.data_dir),
                        # One public address per service, the first replica's: what
                        # notification Bundles and Location headers name.
                        "HDX_PUBLIC_BASE_URL": f"http://127.0.0.1:{ports[spec.name]}/fhir",
                        "OTEL_SERVICE_NAME": f"hdx-{spec.name}",
                        **auth_env,
                        **self.extra_env,
                        **(own[i] if i < len(own) else {}),
                    }
                    if spec.name in self.database_urls:
                        env["HDX_DATABASE_URL"] = self.database_urls[spec.name]
                    proc = ServiceProcess(spec, port, env, self.data_dir / "logs" / f"{name}.log")
                    self.services[name] = proc
                    if i == 0:
                        proc.start()
                        first.append(proc)
                    else:
                        # After the first is ready: it has migrated the shared database.
                        later.append(proc)
            for proc in first:
                proc.wait_ready(ready_timeout)
            for proc in later:
                proc.start()
            for proc in later:
                proc.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        remember_exchange(self.url("exchange"), self.auth_dir)
        return self

    def url(self, service: str) -> str:
        return self.services[service].url

    def restart(self, service: str, *, kill: bool = False, ready_timeout: float = 60.0) -> None:
        proc = self.services[service]
        proc.kill() if kill else proc.stop()
        proc.start()
        proc.wait_ready(ready_timeout)

    def stop(self) -> None:
        if "exchange" in self.services:
            forget_exchange(self.url("exchange"))
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
