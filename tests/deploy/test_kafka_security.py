"""Kafka security of docker-compose.yml and deploy/k8s (issue #6): every listener authenticates
(SASL/SCRAM-SHA-512 for clients), every request is authorized (StandardAuthorizer, nothing
allowed without an ACL), every HDX service logs in as its own user, and each principal's ACLs
are exactly what its code uses — derived from the services' source (conftest.kafka_use), so
that the code, deploy/kafka-acls.sh and the Strimzi KafkaUsers cannot drift apart. External
clients are confined: the demo publisher writes its own hdx.inbound.st-marys only, the demo
subscriber reads its own feed only.

All static: deploy/kafka-acls.sh runs against stand-ins for the Kafka tools that record what
it asks for; no broker is started (there is no Docker engine here).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from hdx_shared.messaging import client_config
from hdx_shared.settings import DEV_SECRET, HdxSettings
from hdx_shared.topics import Topics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HDX = ("patient-index", "consent", "exchange")
PUBLISHER = "publisher-st-marys"
OWN_INBOUND = "hdx.inbound.st-marys"  # its registered topic_name (deploy/demo/publishers.json)
SUBSCRIBER = "subscriber-oakwood-care-home"
FEED = "hdx.feed.oakwood-care-home"
ADMIN_JOBS = ("topics", "kafka-acls")
CLIENT_PORT, ADMIN_PORT, CONTROLLER_PORT, EXTERNAL_PORT = 9092, 9091, 9093, 9094
# The env variables of the apache/kafka image that are not broker settings
# (kafka.docker.KafkaDockerWrapper's exclusions).
NOT_BROKER_SETTINGS = {
    "KAFKA_VERSION",
    "KAFKA_HEAP_OPT",
    "KAFKA_LOG4J_OPTS",
    "KAFKA_OPTS",
    "KAFKA_JMX_OPTS",
    "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_GC_LOG_OPTS",
    "KAFKA_LOG4J_ROOT_LOGLEVEL",
    "KAFKA_LOG4J_LOGGERS",
    "KAFKA_TOOLS_LOG4J_LOGLEVEL",
    "KAFKA_JMX_HOSTNAME",
}
# Operations any principal here may hold; Create only on the feeds (the exchange).
LEAST_PRIVILEGE = {"Read", "Write", "Describe", "Create", "IdempotentWrite"}
# Kafka: Read, Write, Delete and Alter imply Describe.
IMPLIES_DESCRIBE = {"Read", "Write", "Delete", "Alter"}

Acl = tuple[str, str, str]
Model = dict[str, Any]


@pytest.fixture(params=["one broker", "three brokers"], scope="module")
def model(
    request: pytest.FixtureRequest, compose_model: Model, compose_model_kafka3: Model
) -> Model:
    return compose_model if request.param == "one broker" else compose_model_kafka3


def brokers(model: Model) -> dict[str, dict[str, Any]]:
    return {
        n: s
        for n, s in model["services"].items()
        if s["image"].startswith("apache/kafka") and "KAFKA_NODE_ID" in s["environment"]
    }


def broker_properties(env: dict[str, str]) -> dict[str, str]:
    """The server.properties the apache/kafka image writes from a broker's environment
    (kafka.docker.KafkaDockerWrapper: KAFKA_ dropped, lower case, "_" → ".", "___" → "-",
    "__" → "_")."""
    props = {}
    for key, value in env.items():
        if key.startswith("KAFKA_") and key not in NOT_BROKER_SETTINGS:
            name = key.replace("KAFKA_", "").lower().replace("_", ".")
            props[name.replace("...", "-").replace("..", "_")] = value
    return props


def endpoints(value: str) -> dict[str, tuple[str, int]]:
    """LISTENER://host:port,... → {listener: (host, port)}."""
    out = {}
    for item in value.split(","):
        m = re.fullmatch(r"([A-Z_]+)://([^:]*):(\d+)", item.strip())
        assert m, item
        out[m.group(1)] = (m.group(2), int(m.group(3)))
    return out


def jaas_options(value: str) -> tuple[str, dict[str, str]]:
    m = re.fullmatch(r"(\S+) required((?: \w+=\"[^\"]*\")*);", value)
    assert m, value
    return m.group(1), dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(2)))


def allowed(acls: set[Acl], kind: str, name: str, op: str) -> bool:
    """Kafka's StandardAuthorizer on allow-only ACLs: a literal pattern matches its name (or
    every name when it is "*"), a prefixed one ("x*" here) every name it starts."""
    for a_kind, pattern, a_op in acls:
        if a_kind != kind:
            continue
        if pattern.endswith("*") and pattern != "*":
            hit = name.startswith(pattern[:-1])
        else:
            hit = pattern in (name, "*")
        ops_ok = a_op in (op, "All") or (op == "Describe" and a_op in IMPLIES_DESCRIBE)
        if hit and ops_ok:
            return True
    return False


def script_env(model: Model, prefix: str | None = None) -> dict[str, str]:
    env = dict(model["services"]["kafka-acls"]["environment"])
    if prefix is not None:
        env["TOPIC_PREFIX"] = prefix
    return env


@pytest.fixture(scope="module")
def compose_acls(
    compose_model: Model, kafka_helpers: Any, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """What deploy/kafka-acls.sh creates with the compose defaults."""
    return kafka_helpers.run_acl_script(script_env(compose_model), tmp_path_factory.mktemp("acls"))


def diff(got: set[Acl], want: set[Acl]) -> str:
    return f"missing {sorted(want - got)}, not needed {sorted(got - want)}"


# ------------------------------------------------------------------ brokers


def test_every_listener_authenticates_and_every_request_is_authorized(model: Model) -> None:
    for name, svc in brokers(model).items():
        props = broker_properties(svc["environment"])
        protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
        listeners = endpoints(props["listeners"])
        assert set(protocols) == set(listeners) == {"BROKER", "CLIENT", "CONTROLLER", "EXTERNAL"}
        assert set(protocols.values()) == {"SASL_PLAINTEXT"}, f"{name}: an anonymous listener"
        assert {n: p for n, (_, p) in listeners.items()} == {
            "BROKER": ADMIN_PORT,
            "CLIENT": CLIENT_PORT,
            "CONTROLLER": CONTROLLER_PORT,
            "EXTERNAL": EXTERNAL_PORT,
        }
        mechanisms = {
            n: props[f"listener.name.{n.lower()}.sasl.enabled.mechanisms"] for n in listeners
        }
        # Clients log in with SCRAM only; the admin (brokers, controllers, jobs) with PLAIN
        # on listeners that are not published.
        assert mechanisms == {
            "CLIENT": "SCRAM-SHA-512",
            "EXTERNAL": "SCRAM-SHA-512",
            "BROKER": "PLAIN",
            "CONTROLLER": "PLAIN",
        }, name
        assert props["inter.broker.listener.name"] == "BROKER"
        assert props["controller.listener.names"] == "CONTROLLER"
        assert props["sasl.mechanism.inter.broker.protocol"] == "PLAIN"
        assert props["sasl.mechanism.controller.protocol"] == "PLAIN"
        assert props["authorizer.class.name"] == (
            "org.apache.kafka.metadata.authorizer.StandardAuthorizer"  # KRaft
        )
        assert props["allow.everyone.if.no.acl.found"] == "false"
        assert props["super.users"] == "User:admin"
        # The quorum is reached on the controller listener.
        for voter in props["controller.quorum.voters"].split(","):
            assert voter.rsplit(":", 1)[1] == str(CONTROLLER_PORT), voter
        advertised = endpoints(props["advertised.listeners"])
        assert advertised["BROKER"] == (name, ADMIN_PORT)
        assert advertised["CLIENT"] == (name, CLIENT_PORT)
        assert advertised["EXTERNAL"][0] == "localhost"
        assert "CONTROLLER" not in advertised


def test_listener_settings_are_well_formed(model: Model) -> None:
    """Every listener.name.* setting names a listener and one of its mechanisms: a wrong
    number of underscores in an env name would make a setting Kafka silently ignores."""
    for name, svc in brokers(model).items():
        props = broker_properties(svc["environment"])
        listeners = {n.lower() for n in endpoints(props["listeners"])}
        jaas = set()
        for key in props:
            if not key.startswith("listener.name."):
                continue
            listener, _, rest = key.removeprefix("listener.name.").partition(".")
            assert listener in listeners, f"{name}: {key} names no listener"
            enabled = props[f"listener.name.{listener}.sasl.enabled.mechanisms"].lower()
            if rest != "sasl.enabled.mechanisms":
                mech, _, setting = rest.partition(".")
                assert setting == "sasl.jaas.config" and mech in enabled.split(","), key
                jaas.add(listener)
        assert jaas == listeners, f"{name}: a listener without a login module"


def test_one_admin_login_everywhere(model: Model) -> None:
    """The brokers' PLAIN logins, their healthcheck and the admin jobs use the same admin."""
    passwords = set()
    for name, svc in brokers(model).items():
        env = svc["environment"]
        props = broker_properties(env)
        for listener in ("broker", "controller"):
            module, opts = jaas_options(props[f"listener.name.{listener}.plain.sasl.jaas.config"])
            assert module == "org.apache.kafka.common.security.plain.PlainLoginModule"
            # Only the admin can log in with PLAIN: no user_<other> entries.
            assert set(opts) == {"username", "password", "user_admin"}, name
            assert opts["username"] == "admin" and opts["password"] == opts["user_admin"]
            passwords.add(opts["password"])
        for listener in ("client", "external"):
            module, opts = jaas_options(
                props[f"listener.name.{listener}.scram-sha-512.sasl.jaas.config"]
            )
            assert module == "org.apache.kafka.common.security.scram.ScramLoginModule"
            assert not opts, f"{name}: SCRAM users live in the cluster metadata, not here"
        assert env["ADMIN_USERNAME"] == "admin"
        passwords.add(env["ADMIN_PASSWORD"])
        check = " ".join(svc["healthcheck"]["test"])
        assert "/hdx/kafka-admin.sh" in check and f"localhost:{ADMIN_PORT}" in check
        mounts = {v["target"]: v for v in svc["volumes"]}
        assert Path(mounts["/hdx/kafka-admin.sh"]["source"]) == DEPLOY / "kafka-admin.sh"
        assert mounts["/hdx/kafka-admin.sh"]["read_only"]
    for job in ADMIN_JOBS:
        env = model["services"][job]["environment"]
        assert env["ADMIN_USERNAME"] == "admin"
        passwords.add(env["ADMIN_PASSWORD"])
    assert len(passwords) == 1


def test_only_the_external_listener_is_published(model: Model) -> None:
    for name, svc in brokers(model).items():
        ports = svc["ports"]
        assert [p["target"] for p in ports] == [EXTERNAL_PORT], name
        assert all(p["host_ip"] == "127.0.0.1" for p in ports)
        advertised = endpoints(broker_properties(svc["environment"])["advertised.listeners"])
        assert advertised["EXTERNAL"] == ("localhost", int(ports[0]["published"]))


def test_admin_jobs_use_the_admin_listener(model: Model) -> None:
    names = set(brokers(model))
    for job in ADMIN_JOBS:
        svc = model["services"][job]
        assert svc["restart"] == "no"
        assert svc["entrypoint"][0] == "/bin/bash"
        script = Path(svc["entrypoint"][1])
        mounts = {v["target"]: Path(v["source"]) for v in svc["volumes"]}
        assert mounts[str(script)] == DEPLOY / script.name
        assert mounts["/hdx/kafka-admin.sh"] == DEPLOY / "kafka-admin.sh"
        servers = [s.rsplit(":", 1) for s in svc["environment"]["BOOTSTRAP_SERVERS"].split(",")]
        assert {h for h, _ in servers} == names and {int(p) for _, p in servers} == {ADMIN_PORT}
        deps = svc["depends_on"]
        assert {d for d in names if deps.get(d, {}).get("condition") == "service_healthy"} == names
    for script in ("create-topics.sh", "kafka-acls.sh"):
        assert "kafka-admin.sh" in (DEPLOY / script).read_text()


# ------------------------------------------------------------------ HDX services


def test_every_service_logs_in_as_its_own_user(
    model: Model,
    kafka_helpers: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created = kafka_helpers.run_acl_script(script_env(model), tmp_path).users
    names = set(brokers(model))
    for svc in HDX:
        service = model["services"][svc]
        env = service["environment"]
        assert env["HDX_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
        assert env["HDX_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert env["HDX_KAFKA_USERNAME"] == f"hdx-{svc}"
        # The password the kafka-acls job gives the user is the one the service has.
        assert env["HDX_KAFKA_PASSWORD"] and created[f"hdx-{svc}"] == env["HDX_KAFKA_PASSWORD"]
        servers = [s.rsplit(":", 1) for s in env["HDX_KAFKA_BOOTSTRAP_SERVERS"].split(",")]
        assert {h for h, _ in servers} == names and {int(p) for _, p in servers} == {CLIENT_PORT}
        assert service["depends_on"]["kafka-acls"]["condition"] == (
            "service_completed_successfully"
        )
        # What HdxSettings and hdx_shared.messaging make of it: a SCRAM login as that user.
        for name in [n for n in os.environ if n.startswith("HDX_")]:
            monkeypatch.delenv(name)
        for key, value in env.items():
            if key.startswith("HDX_"):
                monkeypatch.setenv(key, value)
        config = client_config(HdxSettings(_env_file=None))  # type: ignore[call-arg]
        assert config["security_protocol"] == "SASL_PLAINTEXT"
        assert config["sasl_mechanism"] == "SCRAM-SHA-512"
        assert config["sasl_plain_username"] == f"hdx-{svc}"
        assert config["sasl_plain_password"] == env["HDX_KAFKA_PASSWORD"]


def test_nothing_else_in_compose_uses_kafka(model: Model) -> None:
    """Besides the brokers, the admin jobs and the HDX services, no container talks to Kafka
    (the collector and Prometheus do not), so none is left without a login."""
    names = set(brokers(model))
    for name, svc in model["services"].items():
        if name in names or name in ADMIN_JOBS or name in HDX:
            continue
        text = yaml.safe_dump({k: svc.get(k) for k in ("environment", "command", "entrypoint")})
        assert not any(re.search(rf"\b{b}:\d", text) for b in names), name
        assert not set(svc.get("depends_on", {})) & names, name
    for config in ("otel-collector.yaml", "prometheus.yml"):
        assert "kafka" not in (DEPLOY / config).read_text().lower(), config


def test_development_passwords_are_refused_in_production(
    compose_env: dict[str, str], compose_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Kafka password in deploy/compose.env is the development placeholder that HDX's
    settings refuse when HDX_ENVIRONMENT=production."""
    kafka_passwords = {
        k: v for k, v in compose_env.items() if re.fullmatch(r"KAFKA_\w+_PASSWORD", k)
    }
    assert set(kafka_passwords) >= {
        "KAFKA_ADMIN_PASSWORD",
        "KAFKA_PATIENT_INDEX_PASSWORD",
        "KAFKA_CONSENT_PASSWORD",
        "KAFKA_EXCHANGE_PASSWORD",
    }
    assert set(kafka_passwords.values()) == {DEV_SECRET}
    for name in [n for n in os.environ if n.startswith("HDX_")]:
        monkeypatch.delenv(name)
    for svc in HDX:
        password = compose_model["services"][svc]["environment"]["HDX_KAFKA_PASSWORD"]
        with pytest.raises(ValidationError, match="HDX_KAFKA_PASSWORD"):
            HdxSettings(  # type: ignore[call-arg]
                _env_file=None, environment="production", kafka_password=password
            )


# ------------------------------------------------------------------ ACLs against the code


@pytest.mark.parametrize("prefix", ["hdx.", "acme."])
def test_compose_acls_are_what_each_service_uses(
    compose_model: Model, kafka_helpers: Any, tmp_path: Path, prefix: str
) -> None:
    """deploy/kafka-acls.sh grants each service exactly what its code reads, writes, creates
    and consumes as — under any topic prefix."""
    run = kafka_helpers.run_acl_script(script_env(compose_model, prefix), tmp_path)
    topics = Topics(prefix)
    for svc in HDX:
        want = kafka_helpers.kafka_use(svc, topics).acls(topics)
        got = run.acls.get(f"hdx-{svc}", set())
        assert got == want, f"hdx-{svc}: {diff(got, want)}"


def test_compose_users_are_the_services_and_the_demo_clients(compose_acls: Any) -> None:
    # Other users are external clients (test_every_external_client_is_a_publisher_...).
    assert set(compose_acls.users) >= {f"hdx-{s}" for s in HDX} | {PUBLISHER, SUBSCRIBER}
    assert set(compose_acls.acls) == set(compose_acls.users), "an ACL for a user never made"
    # Every call ran as the admin (kafka-admin.sh adds the admin's client settings).
    calls = len(compose_acls.users) + sum(len(a) for a in compose_acls.acls.values())
    assert 0 < len(compose_acls.command_configs) <= calls
    assert all(c.startswith("/tmp/hdx-admin.") for c in compose_acls.command_configs)


@pytest.mark.parametrize(
    "target", ["base", "overlays/dev", "overlays/production", "overlays/production-stages-apart"]
)
def test_strimzi_users_are_what_each_service_uses(
    render: Callable[[str], list[dict[str, Any]]],
    find: Callable[..., dict[str, dict[str, Any]]],
    service_kafka_use: dict[str, Any],
    kafka_helpers: Any,
    target: str,
) -> None:
    users = find(render(target), "KafkaUser")
    topics = Topics("hdx.")
    for svc in HDX:
        want = service_kafka_use[svc].acls(topics)
        got = kafka_helpers.strimzi_acls(users[f"hdx-{svc}"])
        assert got == want, f"{target}: KafkaUser hdx-{svc}: {diff(got, want)}"


def test_compose_and_kubernetes_grant_the_same(
    render: Callable[[str], list[dict[str, Any]]],
    find: Callable[..., dict[str, dict[str, Any]]],
    compose_acls: Any,
    kafka_helpers: Any,
) -> None:
    """The dev overlay has the services and the demo clients of compose, with the same ACLs;
    the base and production have the services' users only."""
    dev = find(render("overlays/dev"), "KafkaUser")
    assert set(dev) >= {f"hdx-{s}" for s in HDX} | {PUBLISHER, SUBSCRIBER}
    for name in set(dev) & set(compose_acls.acls):
        assert kafka_helpers.strimzi_acls(dev[name]) == compose_acls.acls[name], name
    for name, user in dev.items():
        assert user["spec"]["authentication"]["type"] == "scram-sha-512", name
    for target in ("base", "overlays/production", "overlays/production-stages-apart"):
        assert set(find(render(target), "KafkaUser")) == {f"hdx-{s}" for s in HDX}


def test_no_principal_gets_more_than_it_needs(
    render: Callable[[str], list[dict[str, Any]]],
    find: Callable[..., dict[str, dict[str, Any]]],
    compose_acls: Any,
    kafka_helpers: Any,
) -> None:
    everyone = dict(compose_acls.acls)
    for target in ("base", "overlays/dev", "overlays/production"):
        for name, user in find(render(target), "KafkaUser").items():
            everyone[f"{target}:{name}"] = kafka_helpers.strimzi_acls(user)
    for who, acls in everyone.items():
        for kind, name, op in acls:
            assert op in LEAST_PRIVILEGE, f"{who}: {op} on {kind} {name}"
            assert name != "*", f"{who}: {op} on every {kind}"
            if name.endswith("*"):
                assert (kind, name, op) == ("topic", "hdx.*", "Describe") or (
                    name in ("hdx.feed.*", "hdx.inbound.*") and who.endswith("hdx-exchange")
                ), f"{who}: {op} on every {kind} named {name}"
            if op == "Create":
                assert (kind, name) in (("topic", "hdx.feed.*"), ("topic", "hdx.inbound.*")), who
            if kind == "cluster":
                assert op == "IdempotentWrite" and any(o == "Write" for *_, o in acls), who


# ------------------------------------------------------------------ external clients


def test_the_publisher_writes_its_own_topic_and_nothing_else(compose_acls: Any) -> None:
    acls = compose_acls.acls[PUBLISHER]
    assert acls == {
        ("topic", OWN_INBOUND, "Write"),
        ("topic", OWN_INBOUND, "Describe"),
        ("cluster", "kafka-cluster", "IdempotentWrite"),
    }
    topics = Topics("hdx.")
    assert allowed(acls, "topic", OWN_INBOUND, "Write")
    assert not allowed(acls, "topic", OWN_INBOUND, "Read")
    # Not the shared inbound topic (where a writer may claim any source), nor another's.
    for other in (topics.inbound, topics.publisher_inbound("riverside"), OWN_INBOUND + "-2"):
        assert not allowed(acls, "topic", other, "Write"), other
    for spec in topics.core():
        for op in ("Read", "Write", "Describe"):
            assert not allowed(acls, "topic", spec.name, op), (spec.name, op)
    assert not allowed(acls, "topic", FEED, "Read")
    assert not allowed(acls, "topic", "hdx.feed.new", "Create")


def test_the_subscriber_reads_its_feed_and_nothing_else(compose_acls: Any) -> None:
    acls = compose_acls.acls[SUBSCRIBER]
    assert acls == {
        ("topic", FEED, "Read"),
        ("topic", FEED, "Describe"),
        ("group", SUBSCRIBER, "Read"),
    }
    assert allowed(acls, "topic", FEED, "Read") and allowed(acls, "group", SUBSCRIBER, "Read")
    assert not allowed(acls, "topic", FEED, "Write")
    topics = Topics("hdx.")
    others = [s.name for s in topics.core()] + [
        topics.feed("riverside-gp"),
        FEED + "-annex",  # a literal grant: no other feed that starts with the same name
        "hdx.feed.",
    ]
    for topic in others:
        for op in ("Read", "Write", "Describe", "Create"):
            assert not allowed(acls, "topic", topic, op), (topic, op)
    for group in ("hdx-exchange-delivery", "subscriber-riverside-gp", SUBSCRIBER + "-2"):
        assert not allowed(acls, "group", group, "Read"), group


def test_a_feed_is_read_by_its_subscriber_only(compose_acls: Any) -> None:
    readers = {p for p, acls in compose_acls.acls.items() if allowed(acls, "topic", FEED, "Read")}
    assert readers == {SUBSCRIBER}
    writers = {p for p, acls in compose_acls.acls.items() if allowed(acls, "topic", FEED, "Write")}
    assert writers == {"hdx-exchange"}

    # What HDX takes in on a publisher's topic is written by that publisher alone, and nobody
    # writes the shared hdx.inbound, where a writer could claim any source.
    def writers(topic: str) -> set[str]:
        return {
            p for p, acls in compose_acls.acls.items() if allowed(acls, "topic", topic, "Write")
        }

    assert writers(OWN_INBOUND) == {PUBLISHER}
    assert writers(Topics("hdx.").inbound) == set()


def client_kind(name: str, acls: set[Acl]) -> str:
    """ "publisher" (writes one publisher topic hdx.inbound.<name>, named literally, nothing
    else) or "subscriber" (reads one feed, named literally, in its own group, nothing else);
    an AssertionError for anything else."""
    topic_names = {n for k, n, _ in acls if k == "topic"}
    if any(op == "Write" for k, _, op in acls if k == "topic"):
        assert len(topic_names) == 1, f"{name}: writes more than one topic: {sorted(acls)}"
        (own,) = topic_names
        assert Topics("hdx.").publisher_topic_name(own), f"{name}: {own} is no publisher topic"
        assert acls <= {
            ("topic", own, "Write"),
            ("topic", own, "Describe"),
            ("cluster", "kafka-cluster", "IdempotentWrite"),
        }, f"{name}: a publisher writes its own topic, nothing else: {sorted(acls)}"
        return "publisher"
    feeds = topic_names
    assert len(feeds) == 1, f"{name}: neither a publisher nor a subscriber: {sorted(acls)}"
    (feed,) = feeds
    assert re.fullmatch(r"hdx\.feed\.[a-z0-9][a-z0-9.-]*", feed), f"{name}: {feed}"
    assert acls == {
        ("topic", feed, "Read"),
        ("topic", feed, "Describe"),
        ("group", name, "Read"),
    }, f"{name}: a subscriber reads its feed in its own group, nothing else: {sorted(acls)}"
    return "subscriber"


def test_every_external_client_is_a_publisher_or_a_subscriber(
    render: Callable[[str], list[dict[str, Any]]],
    find: Callable[..., dict[str, dict[str, Any]]],
    compose_acls: Any,
    kafka_helpers: Any,
) -> None:
    clients = {n: a for n, a in compose_acls.acls.items() if not n.startswith("hdx-")}
    for name, user in find(render("overlays/dev"), "KafkaUser").items():
        if not name.startswith("hdx-"):
            clients[f"dev:{name}"] = kafka_helpers.strimzi_acls(user)
    kinds = {n: client_kind(n.removeprefix("dev:"), a) for n, a in clients.items()}
    assert kinds[PUBLISHER] == "publisher" and kinds[SUBSCRIBER] == "subscriber"
    with pytest.raises(AssertionError):  # the check can fail: a prefix opens every feed
        client_kind("greedy", {("topic", "hdx.feed.*", "Read"), ("group", "greedy", "Read")})
    with pytest.raises(AssertionError):  # ... and the shared inbound topic any source
        client_kind("forger", {("topic", "hdx.inbound", "Write")})


def test_the_docs_table_is_what_the_code_uses(service_kafka_use: dict[str, Any]) -> None:
    """docs/operations.md, "Kafka security": the users' reads, writes and groups."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Kafka security\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("| user | reads | writes | consumer groups |\n", 1)[1]
    rows = {}
    for line in table.split("\n\n", 1)[0].splitlines()[1:]:  # after the | --- | line
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, line
        rows[cells[0].split()[0]] = [set(re.findall(r"`([^`]+)`", c)) for c in cells[1:]]
    assert set(rows) == {f"hdx-{s}" for s in HDX} | {PUBLISHER, SUBSCRIBER}
    for svc in HDX:
        use = service_kafka_use[svc]
        assert rows[f"hdx-{svc}"] == [set(use.reads), set(use.writes), set(use.groups)], svc
    assert rows[PUBLISHER] == [set(), {OWN_INBOUND}, set()]
    assert rows[SUBSCRIBER] == [{FEED}, set(), {SUBSCRIBER}]


# ------------------------------------------------------------------ the checks can fail


def test_the_derivation_follows_the_code(kafka_helpers: Any, tmp_path: Path) -> None:
    """A new topic in the code changes what is expected; code it cannot read fails loudly."""
    pkg = tmp_path / "svc"
    pkg.mkdir()
    (pkg / "app.py").write_text(
        "def wire(broker, topics, settings):\n"
        "    for name, topic in (('a', topics.inbound), ('b', topics.links)):\n"
        "        add_stage(broker, name=name, topic=topic, group_id=topics.group(f'x-{name}'))\n"
        "    return [Outgoing(self.topics.consents, b'', b'k', {}),\n"
        "            Outgoing(topics.feed(sub), b'', b'k', {})]\n"
    )
    use = kafka_helpers.kafka_use_of(pkg, Topics("hdx."))
    assert use.reads == {"hdx.inbound", "hdx.links"}
    assert use.groups == {"hdx-x-a", "hdx-x-b"}
    assert use.writes == {"hdx.consents", "hdx.feed.*", "hdx.deadletter"}
    (pkg / "more.py").write_text("def f(topic):\n    return Outgoing(topic, b'', b'k', {})\n")
    with pytest.raises(kafka_helpers.UnknownKafkaUse, match="cannot tell which topic"):
        kafka_helpers.kafka_use_of(pkg, Topics("hdx."))
    (pkg / "more.py").write_text("def f():\n    return AIOKafkaProducer()\n")
    with pytest.raises(kafka_helpers.UnknownKafkaUse, match="AIOKafkaProducer"):
        kafka_helpers.kafka_use_of(pkg, Topics("hdx."))


def test_the_acl_comparison_can_fail(
    compose_model: Model, kafka_helpers: Any, tmp_path: Path
) -> None:
    """A table that grants one topic too many is caught."""
    script = (DEPLOY / "kafka-acls.sh").read_text()
    marker = "\nacl hdx-exchange "
    assert marker in script
    extra = '\nacl hdx-consent topic literal "${prefix}inbound" Read'
    copy = tmp_path / "deploy"
    copy.mkdir()
    (copy / "kafka-acls.sh").write_text(script.replace(marker, extra + marker, 1))
    shutil.copy(DEPLOY / "kafka-admin.sh", copy / "kafka-admin.sh")
    run = kafka_helpers.run_acl_script(script_env(compose_model), tmp_path, copy / "kafka-acls.sh")
    want = kafka_helpers.kafka_use("consent", Topics("hdx.")).acls(Topics("hdx."))
    assert run.acls["hdx-consent"] - want == {("topic", "hdx.inbound", "Read")}
