"""docker-compose.yml: valid Compose, pinned, hardened, scaled out, and wired as documented."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"

HDX = {"patient-index": "hdx_patient_index", "consent": "hdx_consent", "exchange": "hdx_exchange"}
REPLICATED = {"patient-index": 2, "exchange": 2}
INFRA_IMAGES = {  # service -> image repository that must be used, pinned
    "kafka": "apache/kafka",
    "topics": "apache/kafka",
    "kafka-acls": "apache/kafka",
    "postgres": "postgres",
    "otel-collector": "otel/opentelemetry-collector-contrib",
    "jaeger": "jaegertracing/all-in-one",
    "prometheus": "prom/prometheus",
}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a literal $.
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-style interpolation of every string value (keys are left alone)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        have = name in env and (env[name] != "" or op in (None, "-", "?"))
        if have:
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return ""

    parts = value.split("$$")
    return "$".join(VAR.sub(sub, p) for p in parts)


# ------------------------------------------------------------------ validity


def test_compose_config_accepts_the_file(run_compose: Any) -> None:
    """The Docker Compose v2 binary itself parses, validates and resolves the project."""
    proc = run_compose("config", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_compose(
        "config",
        "--quiet",
        env_files=(DEPLOY / "compose.env", DEPLOY / "compose.kafka-3.env"),
        profiles=("kafka-3",),
    )
    assert proc.returncode == 0, proc.stderr


def test_compose_config_rejects_a_broken_file(compose_bin: Path, tmp_path: Path) -> None:
    """The check above can fail: an unknown key is an error."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  a:\n    image: busybox:1\n    no_such_key: 1\n")
    import subprocess

    proc = subprocess.run(
        [str(compose_bin), "-f", str(bad), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode != 0 and "no_such_key" in proc.stderr


def test_file_validates_against_the_compose_schema(
    compose_schema: dict[str, Any], compose_env: dict[str, str]
) -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())  # SafeLoader resolves the << merges
    doc = interpolate(raw, compose_env)
    jsonschema.Draft7Validator.check_schema(compose_schema)
    errors = sorted(
        jsonschema.Draft7Validator(compose_schema).iter_errors(doc),
        key=lambda e: list(e.absolute_path),
    )
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_resolved_projects_validate_against_the_compose_schema(
    compose_schema: dict[str, Any],
    compose_model: dict[str, Any],
    compose_model_kafka3: dict[str, Any],
) -> None:
    validator = jsonschema.Draft7Validator(compose_schema)
    for model in (compose_model, compose_model_kafka3):
        errors = list(validator.iter_errors(model))
        assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def test_schema_check_can_fail(compose_schema: dict[str, Any]) -> None:
    bad = {"services": {"a": {"image": "x:1", "read_only": "sometimes", "bogus": 1}}}
    assert list(jsonschema.Draft7Validator(compose_schema).iter_errors(bad))


# ------------------------------------------------------------------ env file


def test_env_file_and_defaults_agree(
    compose_env: dict[str, str], kafka3_env: dict[str, str]
) -> None:
    text = re.sub(r"(?m)^\s*#.*$", "", COMPOSE_FILE.read_text())  # comments aside
    used = {m.group(1) for m in VAR.finditer(text)}
    missing = used - compose_env.keys()
    assert not missing, f"set in docker-compose.yml but not in deploy/compose.env: {missing}"
    unused = compose_env.keys() - used
    assert not unused, f"in deploy/compose.env but not used by docker-compose.yml: {unused}"
    for m in VAR.finditer(text):
        name, op, default = m.groups()
        assert op == ":-", f"${{{name}}} should have a default (${{{name}:-...}})"
        assert default == compose_env[name], (
            f"default of ${{{name}}} is {default!r}, deploy/compose.env says {compose_env[name]!r}"
        )
    assert kafka3_env.keys() <= compose_env.keys()


def test_every_image_version_and_port_comes_from_the_env_file(
    compose_model: dict[str, Any], compose_env: dict[str, str]
) -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for name, svc in raw["services"].items():
        assert "${" in svc["image"], f"{name}: image is not a ${{VAR}}"
        for port in svc.get("ports", []):
            host_part = port.rsplit(":", 1)[0]
            assert re.fullmatch(r"(\$\{[A-Z0-9_]+:-[^}]*\}:?)+", host_part), (
                f"{name}: host side of {port!r} is not from the env file"
            )
    images = {k: v for k, v in compose_env.items() if k.endswith("_IMAGE")}
    assert {
        k: compose_model["services"][s]["image"]
        for s, k in [
            ("kafka", "KAFKA_IMAGE"),
            ("postgres", "POSTGRES_IMAGE"),
            ("otel-collector", "OTEL_COLLECTOR_IMAGE"),
            ("jaeger", "JAEGER_IMAGE"),
            ("prometheus", "PROMETHEUS_IMAGE"),
        ]
    } == images


# ------------------------------------------------------------------ images and builds


def test_images_are_pinned(compose_model: dict[str, Any]) -> None:
    for name, repo in INFRA_IMAGES.items():
        image = compose_model["services"][name]["image"]
        got_repo, _, tag = image.rpartition(":")
        assert got_repo == repo, f"{name} runs {image}, expected {repo}"
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} not pinned"
    assert compose_model["services"]["kafka"]["image"].startswith("apache/kafka:3.")
    assert compose_model["services"]["postgres"]["image"].split(":")[1].startswith("16")


def test_every_service_has_an_image_or_a_build_whose_dockerfile_exists(
    compose_model: dict[str, Any],
) -> None:
    for name, svc in compose_model["services"].items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = Path(svc["build"]["context"])
            dockerfile = context / svc["build"].get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
    for name in HDX:
        build = compose_model["services"][name]["build"]
        assert Path(build["context"]) == ROOT
        assert build["args"]["SERVICE"] == name
        assert compose_model["services"][name]["image"].startswith(f"hdx-{name}:")


# ------------------------------------------------------------------ HDX services


@pytest.mark.parametrize("name", list(HDX))
def test_hdx_service_is_hardened_and_checked(compose_model: dict[str, Any], name: str) -> None:
    svc = compose_model["services"][name]
    assert svc["read_only"] is True
    assert any(t.split(":")[0] == "/tmp" for t in svc["tmpfs"])
    assert svc["restart"] == "unless-stopped"
    assert svc["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in svc["security_opt"]
    assert int(svc["deploy"]["resources"]["limits"]["memory"]) > 0
    test = " ".join(svc["healthcheck"]["test"])
    assert "127.0.0.1:8000/readyz" in test
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert svc["depends_on"]["kafka-acls"]["condition"] == "service_completed_successfully"
    assert [p["target"] for p in svc["ports"]] == [8000]
    assert all(p["host_ip"] == "127.0.0.1" for p in svc["ports"])
    env = svc["environment"]
    assert env["HDX_HTTP_HOST"] == "0.0.0.0"
    assert env["HDX_HTTP_PORT"] == "8000"
    assert env["HDX_SERVICE_NAME"] == name
    assert env["HDX_KAFKA_IDEMPOTENCE"] == "true"
    assert env["OTEL_SERVICE_NAME"] == f"hdx-{name}"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert "service.namespace=hdx" in env["OTEL_RESOURCE_ATTRIBUTES"]
    db = env["HDX_DATABASE_URL"]
    assert re.fullmatch(rf"postgresql://[^:]+:[^@]+@postgres:5432/{HDX[name]}", db), db


def test_replicas(compose_model: dict[str, Any]) -> None:
    for name in HDX:
        want = REPLICATED.get(name, 1)
        assert compose_model["services"][name]["deploy"]["replicas"] == want, name
        ports = compose_model["services"][name]["ports"][0]["published"]
        lo, _, hi = ports.partition("-")
        count = int(hi or lo) - int(lo) + 1
        assert count >= want, f"{name}: {want} replicas but host ports {ports}"


def test_every_container_has_a_memory_limit(compose_model: dict[str, Any]) -> None:
    for name, svc in compose_model["services"].items():
        assert (
            int(svc.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory", 0)) > 0
        ), name


def test_healthy_dependencies_have_healthchecks(
    compose_model: dict[str, Any], compose_model_kafka3: dict[str, Any]
) -> None:
    for model in (compose_model, compose_model_kafka3):
        services = model["services"]
        for name, svc in services.items():
            for dep, how in svc.get("depends_on", {}).items():
                if dep not in services:
                    assert how.get("required") is False, f"{name} needs missing {dep}"
                    continue
                if how["condition"] == "service_healthy":
                    assert services[dep].get("healthcheck", {}).get("test"), (
                        f"{name} waits for {dep} to be healthy, which has no healthcheck"
                    )
                if how["condition"] == "service_completed_successfully":
                    assert services[dep].get("restart", "no") == "no", dep


def test_postgres_creates_one_database_per_service(compose_model: dict[str, Any]) -> None:
    sql = (DEPLOY / "postgres-init.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+);", sql))
    assert created == set(HDX.values())
    pg = compose_model["services"]["postgres"]
    mounts = {v["target"]: v for v in pg["volumes"]}
    init = [v for t, v in mounts.items() if t.startswith("/docker-entrypoint-initdb.d/")]
    assert init and Path(init[0]["source"]) == DEPLOY / "postgres-init.sql"
    assert "hdx_exchange" in pg["healthcheck"]["test"]


# ------------------------------------------------------------------ Kafka


def _kafka_brokers(model: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        n: s["environment"]
        for n, s in model["services"].items()
        if s["image"].startswith("apache/kafka") and "KAFKA_NODE_ID" in s["environment"]
    }


def _check_brokers(model: dict[str, Any], count: int) -> None:
    brokers = _kafka_brokers(model)
    assert len(brokers) == count
    voters = {
        v.split("@")[1].split(":")[0]: v.split("@")[0]
        for v in next(iter(brokers.values()))["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    }
    assert voters == {n: e["KAFKA_NODE_ID"] for n, e in brokers.items()}
    ids = [e["KAFKA_NODE_ID"] for e in brokers.values()]
    assert len(set(ids)) == count
    for name, env in brokers.items():
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == count
        assert f"CLIENT://{name}:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
        assert len({e["CLUSTER_ID"] for e in brokers.values()}) == 1
        assert model["services"][name]["healthcheck"]["test"]
    bootstrap = model["services"]["exchange"]["environment"]["HDX_KAFKA_BOOTSTRAP_SERVERS"]
    assert {b.split(":")[0] for b in bootstrap.split(",")} == set(brokers)
    topics_env = model["services"]["topics"]["environment"]
    # As the admin, on the admin listener (test_kafka_security checks the logins).
    assert topics_env["BOOTSTRAP_SERVERS"] == bootstrap.replace(":9092", ":9091")
    assert int(topics_env["REPLICATION_FACTOR"]) == count
    assert int(topics_env["MIN_INSYNC_REPLICAS"]) == (1 if count == 1 else 2)


def test_one_kraft_broker_by_default(compose_model: dict[str, Any]) -> None:
    _check_brokers(compose_model, 1)


def test_three_brokers_with_the_switch(compose_model_kafka3: dict[str, Any]) -> None:
    _check_brokers(compose_model_kafka3, 3)
    deps = compose_model_kafka3["services"]["topics"]["depends_on"]
    assert {d for d, h in deps.items() if h["condition"] == "service_healthy"} >= {
        "kafka",
        "kafka-2",
        "kafka-3",
    }


def test_topics_job_runs_the_script(compose_model: dict[str, Any]) -> None:
    job = compose_model["services"]["topics"]
    assert job["restart"] == "no"
    assert job["entrypoint"] == ["/bin/bash", "/hdx/create-topics.sh"]
    mounts = {v["target"]: v for v in job["volumes"]}
    mount = mounts["/hdx/create-topics.sh"]
    assert Path(mount["source"]) == DEPLOY / "create-topics.sh" and mount["read_only"]
    assert job["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = (DEPLOY / "create-topics.sh").read_text()
    assert "/opt/kafka/bin}/kafka-topics.sh" in script and "--if-not-exists" in script


# ------------------------------------------------------------------ observability


def test_prometheus_scrapes_every_service(compose_model: dict[str, Any]) -> None:
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    scraped: dict[str, tuple[str, int]] = {}
    for job in cfg["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for n in sd["names"]:
                scraped[n] = (job.get("metrics_path", "/metrics"), sd["port"])
    assert scraped == dict.fromkeys(HDX, ("/metrics", 8000))
    prom = compose_model["services"]["prometheus"]
    assert any(Path(v["source"]) == DEPLOY / "prometheus.yml" for v in prom["volumes"])
    assert [p["target"] for p in prom["ports"]] == [9090]
    assert [p["target"] for p in compose_model["services"]["jaeger"]["ports"]] == [16686]


def test_collector_sends_traces_to_jaeger(compose_model: dict[str, Any]) -> None:
    cfg = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    assert cfg["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    pipeline = cfg["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(cfg[kind]), kind
    (exporter,) = pipeline["exporters"]
    host = cfg["exporters"][exporter]["endpoint"].split(":")[0]
    assert host == "jaeger" and "jaeger" in compose_model["services"]
    col = compose_model["services"]["otel-collector"]
    assert any(Path(v["source"]) == DEPLOY / "otel-collector.yaml" for v in col["volumes"])
    mounted = next(v["target"] for v in col["volumes"])
    assert col["command"] == [f"--config={mounted}"]
