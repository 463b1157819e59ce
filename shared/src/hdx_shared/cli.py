"""`hdx`: run HDX on this machine, publish FHIR to it, and read what comes out."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.console import Console
from rich.table import Table

from hdx_shared.auth import (
    ClientCredentials,
    TokenRequestError,
    fetch_token,
    load_private_key,
    public_jwk,
)
from hdx_shared.devstack import (
    ADMIN_CLIENT,
    SERVICES,
    ClientSpec,
    LocalStack,
    ServiceStartError,
    client_key_path,
    exchange_auth_env,
)
from hdx_shared.embedded_broker import EmbeddedBroker
from hdx_shared.envelope import CE_SPECVERSION, FHIR_JSON, Header
from hdx_shared.settings import HdxSettings
from hdx_shared.topics import Topics

app = typer.Typer(
    help="HDX — an open, event-driven FHIR health data exchange over Kafka.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
DEMO_DIR = Path(__file__).resolve().parents[3] / "deploy" / "demo"
DEFAULT_EXCHANGE = "http://127.0.0.1:8003"
# What the demo's hospitals may publish over FHIR REST (create, update, delete).
PUBLISHER_SCOPE = " ".join(
    f"system/{t}.cud"
    for t in (
        "Patient",
        "Observation",
        "Encounter",
        "Condition",
        "Procedure",
        "DiagnosticReport",
        "MedicationRequest",
        "MedicationStatement",
        "AllergyIntolerance",
        "Immunization",
    )
)
SUBSCRIBER_SCOPE = "system/Subscription.crus"


def _settings() -> HdxSettings:
    return HdxSettings()


@app.command()
def run(
    data_dir: Annotated[Path, typer.Option(help="SQLite files and logs go here")] = Path("data"),
    broker_port: Annotated[int, typer.Option(help="embedded broker port")] = 9092,
    http_port_base: Annotated[
        int, typer.Option(help="patient-index's HTTP port; consent and exchange take the next")
    ] = 8001,
    seed: Annotated[
        bool, typer.Option(help="load the demo publishers, consents and subscription")
    ] = True,
    demo_dir: Annotated[Path, typer.Option(help="where the demo seed lives")] = DEMO_DIR,
    ready_timeout: Annotated[
        float, typer.Option(help="seconds each service may take to become ready")
    ] = 180.0,
    exchange_stages: Annotated[
        list[str] | None,
        typer.Option(
            "--exchange-stages",
            help="run the exchange as one process per use of this option, each running these "
            "stages (HDX_EXCHANGE_STAGES), e.g. --exchange-stages ingress,router "
            "--exchange-stages delivery,audit-log",
        ),
    ] = None,
) -> None:
    """Start the embedded broker and all three services; Ctrl-C stops everything."""
    ports = {s.name: http_port_base + i for i, s in enumerate(SERVICES)} | {"broker": broker_port}
    stack = LocalStack(
        data_dir=data_dir,
        ports=ports,
        clients=demo_clients(demo_dir),
        replica_env={"exchange": [{"HDX_EXCHANGE_STAGES": v} for v in exchange_stages]}
        if exchange_stages
        else {},
    )
    with console.status("starting the broker and the services…"):
        try:
            stack.start(ready_timeout=ready_timeout)
        except ServiceStartError as exc:
            # What went wrong and the service's own log say more than a traceback.
            console.print(f"[red]HDX did not start:[/red] {exc}", markup=True, highlight=False)
            raise typer.Exit(1) from None
    try:
        if seed:
            seed_demo(stack, demo_dir)
        _print_stack(stack, seeded=seed)
        stop = _stop_on_signals()
        while not stop:
            time.sleep(0.5)
            for name, proc in stack.services.items():
                if proc.process and proc.process.poll() is not None:
                    console.print(f"[red]{name} exited[/red]; its log:\n{proc.tail()}")
                    stop.append(signal.SIGTERM)
    finally:
        console.print("stopping…")
        stack.stop()


def _stop_on_signals() -> list[int]:
    """A list that SIGINT/SIGTERM append to. A signal handler must not take locks (a
    threading.Event would deadlock when a second signal arrives while the main thread
    waits on it); appending to a list is safe."""
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    return received


def _organization(subscription: dict[str, Any]) -> str:
    return str(
        next(
            e["valueReference"]["reference"]
            for e in subscription["extension"]
            if e["url"].endswith("/recipient")
        )
    )


def demo_clients(demo_dir: Path = DEMO_DIR) -> list[ClientSpec]:
    """A client for each demo publisher (bound to its source) and each demo subscriber
    (bound to its organization), named by the last part of the source or organization."""
    clients = [
        ClientSpec(
            pub["source"].rsplit(":", 1)[-1],
            PUBLISHER_SCOPE,
            source=pub["source"],
            name=pub["name"],
        )
        for pub in orjson.loads((demo_dir / "publishers.json").read_bytes())
    ]
    for path in sorted(demo_dir.glob("subscription-*.json")):
        org = _organization(orjson.loads(path.read_bytes()))
        clients.append(ClientSpec(org.rsplit("/", 1)[-1], SUBSCRIBER_SCOPE, subscriber=org))
    return clients


def seed_demo(stack: LocalStack, demo_dir: Path = DEMO_DIR) -> None:
    """Load the demo configuration through the services' own APIs, as the admin client and
    the subscriber's own client would (safe to repeat)."""
    exchange_url, consent_url = stack.url("exchange"), stack.url("consent")
    with httpx.Client(timeout=10, auth=stack.admin_auth()) as http:
        for pub in orjson.loads((demo_dir / "publishers.json").read_bytes()):
            http.post(f"{exchange_url}/admin/publishers", json=pub).raise_for_status()
        for path in sorted(demo_dir.glob("consent-*.json")):
            consent = orjson.loads(path.read_bytes())
            http.put(
                f"{consent_url}/fhir/Consent/{consent['id']}",
                content=path.read_bytes(),
                headers={"content-type": FHIR_JSON},
            ).raise_for_status()
    for path in sorted(demo_dir.glob("subscription-*.json")):
        organization = _organization(orjson.loads(path.read_bytes())).rsplit("/", 1)[-1]
        with httpx.Client(timeout=10, auth=stack.client_auth(organization)) as http:
            existing = http.get(
                f"{exchange_url}/fhir/Subscription", params={"subscriber": organization}
            )
            existing.raise_for_status()
            if not existing.json().get("total"):
                http.post(
                    f"{exchange_url}/fhir/Subscription",
                    content=path.read_bytes(),
                    headers={"content-type": FHIR_JSON},
                ).raise_for_status()


def _print_stack(stack: LocalStack, *, seeded: bool) -> None:
    topics = Topics()
    table = Table(title="HDX is running", show_lines=False)
    table.add_column("what")
    table.add_column("where")
    table.add_row("Kafka broker (embedded Tansu, plaintext, memory only)", stack.bootstrap)
    for name, proc in stack.services.items():
        table.add_row(f"{name} (HTTP, /docs for the API)", proc.url)
    table.add_row(
        "publish to",
        f"{topics.publisher_inbound('<topic_name>')} (each publisher's own), {topics.inbound}",
    )
    table.add_row(
        "internal",
        ", ".join(
            [
                topics.validated,
                topics.identified,
                topics.routed,
                topics.decided,
                topics.links,
                topics.consents,
            ]
        ),
    )
    table.add_row("audit / dead letters", f"{topics.audit} / {topics.deadletter}")
    if seeded:
        table.add_row("demo subscriber feed", topics.feed("oakwood-care-home"))
    table.add_row("logs and SQLite files", str(stack.data_dir))
    table.add_row("client keys (demo only)", str(stack.auth_dir / "clients"))
    console.print(table)
    examples = DEMO_DIR / "examples"
    exchange = stack.url("exchange")
    admin_key = stack.client_key_path(ADMIN_CLIENT)
    console.print(
        "Try:\n"
        f"  hdx publish {examples / 'patient-ada.json'} --source urn:hdx:org:st-marys"
        f" --topic {topics.publisher_inbound('st-marys')}\n"
        f"  hdx publish {examples / 'observation-ada.json'} --source urn:hdx:org:st-marys"
        f" --topic {topics.publisher_inbound('st-marys')}\n"
        f"  hdx tail {topics.feed('oakwood-care-home')}\n"
        "Every HTTP API needs an access token (5 minutes; docs/security.md). The admin's:\n"
        f"  TOKEN=$(hdx token --client-id {ADMIN_CLIENT} --key {admin_key}"
        f" --exchange {exchange})\n"
        f'  curl -H "Authorization: Bearer $TOKEN" {exchange}/fhir/Subscription\n'
        + (
            "St Mary's publishing over FHIR REST, as itself:\n"
            f"  TOKEN=$(hdx token --client-id st-marys --key "
            f"{stack.client_key_path('st-marys')} --exchange {exchange})\n"
            f'  curl -H "Authorization: Bearer $TOKEN" -H "content-type: application/fhir+json"'
            f" --data @{examples / 'patient-ada.json'} {exchange}/fhir/Patient\n"
            if seeded
            else ""
        )
        + "Press Ctrl-C to stop."
    )


def _patient_key(source: str, doc: dict[str, Any]) -> bytes:
    if doc.get("resourceType") == "Patient":
        return f"{source}|{doc.get('id', '')}".encode()
    for element in ("subject", "patient"):
        ref = (
            (doc.get(element) or {}).get("reference", "")
            if isinstance(doc.get(element), dict)
            else ""
        )
        if ref.startswith("Patient/"):
            return f"{source}|{ref.removeprefix('Patient/')}".encode()
    return source.encode()


def _kafka_config(settings: HdxSettings, bootstrap: str | None) -> dict[str, Any]:
    """aiokafka connection arguments from the settings (login included); --bootstrap wins."""
    from hdx_shared.messaging import client_config

    return client_config(settings) | ({"bootstrap_servers": bootstrap} if bootstrap else {})


@app.command()
def publish(
    files: Annotated[list[Path], typer.Argument(help="FHIR JSON resources or Bundles")],
    source: Annotated[str, typer.Option(help="your publisher id (ce_source)")],
    change: Annotated[str, typer.Option("--type", help="create, update or delete")] = "update",
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
    topic: Annotated[
        str | None,
        typer.Option(help="your own topic, hdx.inbound.<topic_name>; default: hdx.inbound"),
    ] = None,
) -> None:
    """Publish FHIR files to HDX's inbound topic, as a hospital system would. The Kafka login
    (HDX_KAFKA_SECURITY_PROTOCOL, _USERNAME, _PASSWORD…) comes from the environment."""
    settings = _settings()
    target = topic or Topics(settings.topic_prefix).inbound

    async def send() -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(**_kafka_config(settings, bootstrap), acks="all")
        await producer.start()
        try:
            for path in files:
                raw = path.read_bytes()
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    doc = {}
                event_id = str(uuid.uuid4())
                headers = [
                    (Header.ID.value, event_id.encode()),
                    (Header.SOURCE.value, source.encode()),
                    (Header.TYPE.value, change.encode()),
                    (Header.SPECVERSION.value, CE_SPECVERSION.encode()),
                    (Header.CONTENT_TYPE.value, FHIR_JSON.encode()),
                ]
                md = await producer.send_and_wait(
                    target, raw, key=_patient_key(source, doc), headers=headers
                )
                console.print(
                    f"{path.name} → {target}[{md.partition}]@{md.offset} ce_id={event_id}"
                )
        finally:
            await producer.stop()

    asyncio.run(send())


@app.command()
def tail(
    topic: Annotated[str, typer.Argument(help="e.g. hdx.feed.oakwood-care-home")],
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
    limit: Annotated[int, typer.Option(help="stop after this many records (0: never)")] = 0,
    timeout: Annotated[float, typer.Option(help="stop after this many idle seconds")] = 0,
) -> None:
    """Print a topic's records from the beginning (a feed, the audit or dead letters). The
    Kafka login comes from the environment, as for `hdx publish`."""
    config = _kafka_config(_settings(), bootstrap)

    async def read() -> None:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            topic, **config, auto_offset_reset="earliest", enable_auto_commit=False
        )
        await consumer.start()
        seen = 0
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=int((timeout or 3600) * 1000))
                if not batch and timeout:
                    return
                for records in batch.values():
                    for r in records:
                        headers = {k: v.decode(errors="replace") for k, v in r.headers}
                        console.print(
                            f"[bold]{r.topic}[{r.partition}]@{r.offset}[/bold] "
                            f"{orjson.dumps(headers).decode()}"
                        )
                        console.print(r.value.decode(errors="replace") if r.value else "")
                        seen += 1
                        if limit and seen >= limit:
                            return
        finally:
            await consumer.stop()

    asyncio.run(read())


@app.command("trace")
def trace_message(
    event_id: Annotated[
        str, typer.Argument(help="HDX's event id, or the publisher's ce_id with --source")
    ],
    source: Annotated[
        str | None, typer.Option(help="the publisher (ce_source), when EVENT_ID is its own ce_id")
    ] = None,
) -> None:
    """Print the path of one message through HDX: hops, decisions with reasons, deliveries
    and dead letters, with timings — read from the topics, no tracing backend needed."""
    from hdx_shared.message_path import find_path

    hops = find_path(_settings(), event_id, source)
    if not hops:
        console.print(f"no record of {event_id} on the HDX topics")
        raise typer.Exit(1)
    start = hops[0].timestamp_ms
    table = Table(title=f"event {event_id}")
    for column in ("+ms", "topic", "what", "detail"):
        table.add_column(column)
    for hop in hops:
        table.add_row(str(hop.timestamp_ms - start), hop.topic, hop.what, hop.detail)
    console.print(table)


def _token_url(exchange: str) -> str:
    """The token endpoint, from the exchange's SMART configuration (as a client finds it)."""
    r = httpx.get(f"{exchange.rstrip('/')}/.well-known/smart-configuration", timeout=10)
    r.raise_for_status()
    return str(r.json()["token_endpoint"])


ClientIdOption = Annotated[
    str, typer.Option("--client-id", envvar="HDX_CLIENT_ID", help="your registered client id")
]
KeyOption = Annotated[
    Path,
    typer.Option(
        "--key", envvar="HDX_CLIENT_KEY", help="your private key (PEM) registered with HDX"
    ),
]
ExchangeOption = Annotated[
    str, typer.Option("--exchange", envvar="HDX_EXCHANGE_URL", help="the exchange's address")
]


@app.command()
def token(
    client_id: ClientIdOption,
    key: KeyOption,
    scope: Annotated[
        str | None,
        typer.Option(help="scopes to ask for, space-separated (default: all registered)"),
    ] = None,
    exchange: ExchangeOption = DEFAULT_EXCHANGE,
) -> None:
    """Print an access token: signs a client assertion with KEY and trades it at the
    exchange's token endpoint (SMART Backend Services). Use it as
    curl -H "Authorization: Bearer $(hdx token ...)"."""
    try:
        body = fetch_token(
            client_id, load_private_key(key.read_bytes()), _token_url(exchange), scope
        )
    except (TokenRequestError, httpx.HTTPError) as exc:
        Console(stderr=True).print(f"[red]no token:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    print(body["access_token"])


@app.command()
def jwks(key: KeyOption) -> None:
    """Print the public half of a private key as a JWKS (kid = its thumbprint): what a
    client registers with HDX (POST /admin/clients)."""
    print(orjson.dumps({"keys": [public_jwk(load_private_key(key.read_bytes()))]}).decode())


audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    client_id: ClientIdOption,
    key: KeyOption,
    exchange: ExchangeOption = DEFAULT_EXCHANGE,
) -> None:
    """Recompute the audit log's hash chain and compare its end with the newest anchor;
    exit 1 and name every record that was altered, removed, reordered or cut off. Needs a
    client with the system/hdx-admin scope."""
    auth = ClientCredentials.from_key_file(client_id, key, _token_url(exchange))
    r = httpx.get(f"{exchange}/admin/audit/verify", timeout=300, auth=auth)
    if r.status_code != 200:
        console.print(f"[red]audit verification refused:[/red] {r.status_code} {r.text[:300]}")
        raise typer.Exit(2)
    result = r.json()
    anchor = result.get("anchor") or {}
    console.print(f"{result['records']} records; newest anchor: seq {anchor.get('seq', '-')}")
    for p in result["problems"]:
        console.print(f"[red]record {p['seq']}[/red] ({p['audit_id'] or '-'}): {p['what']}")
    if not result["intact"]:
        raise typer.Exit(1)
    console.print("[green]intact[/green]")


@app.command("db-revision")
def db_revision(
    service: Annotated[str, typer.Argument(help="patient-index, consent or exchange")],
    message: Annotated[str, typer.Argument(help="what the migration changes")],
) -> None:
    """Write a new Alembic migration for a service from the change in its models."""
    from hdx_shared.db import new_revision

    specs = {s.name: s for s in SERVICES}
    if service not in specs:
        raise typer.BadParameter(f"one of {', '.join(specs)}")
    new_revision(specs[service].module, message)


@app.command("auth-init")
def auth_init(
    directory: Annotated[Path, typer.Argument(help="where the keys and clients.json go")],
    issuer: Annotated[
        str, typer.Option(help="the exchange's address as clients see it (HDX_AUTH_ISSUER)")
    ],
) -> None:
    """Make HDX's signing key and a first admin client (hdx-admin) in DIRECTORY, unless they
    exist: what an exchange deployment needs before its first start. Prints the exchange's
    HDX_AUTH_* settings. Keys are PEM files of mode 0600; keep the admin key off servers."""
    env = exchange_auth_env(directory, issuer)
    for name, value in env.items():
        print(f"{name}={value}")
    print(f"# admin key: {client_key_path(directory, ADMIN_CLIENT)}", file=sys.stderr)


@app.command()
def broker(port: Annotated[int, typer.Option()] = 9092) -> None:
    """Run only the embedded Kafka-protocol broker (Tansu, memory storage)."""
    with EmbeddedBroker(port=port) as b:
        console.print(f"embedded broker on {b.bootstrap_servers}; Ctrl-C stops it")
        stop = _stop_on_signals()
        while not stop:
            time.sleep(0.5)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
