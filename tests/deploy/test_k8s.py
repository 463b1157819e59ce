"""deploy/k8s: every overlay renders with Kustomize, validates against Kubernetes' schemas, and
carries what running HDX safely needs; Strimzi objects are checked field by field."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"  # the Kubernetes release the manifests are validated against
TARGETS = ("base", "overlays/dev", "overlays/production", "overlays/production-stages-apart")
STAGES_APART = "overlays/production-stages-apart"
HDX = {"patient-index": "hdx_patient_index", "consent": "hdx_consent", "exchange": "hdx_exchange"}
STRIMZI = "kafka.strimzi.io/"

ACL_OPERATIONS = {
    "Read",
    "Write",
    "Create",
    "Delete",
    "Alter",
    "Describe",
    "ClusterAction",
    "AlterConfigs",
    "DescribeConfigs",
    "IdempotentWrite",
    "All",
}

Objects = list[dict[str, Any]]
Render = Callable[[str], Objects]
Find = Callable[..., dict[str, dict[str, Any]]]


def hdx_deployments(objects: Objects) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"].removeprefix("hdx-"): o
        for o in objects
        if o["kind"] == "Deployment"
        and o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "hdx"
        and o["metadata"]["name"].startswith("hdx-")
    }


def service_of(deployment: str) -> str:
    """The HDX service a Deployment (its name less 'hdx-') runs: 'exchange-delivery' is the
    exchange's second Deployment where its stages run apart."""
    return next(s for s in HDX if deployment == s or deployment.startswith(f"{s}-"))


def container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def quantity(q: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m, q
    return float(m.group(1)) * units.get(m.group(2), 1)


# ------------------------------------------------------------------ rendering and schemas


def test_kubectl_has_kustomize(kubectl_bin: Path) -> None:
    import subprocess

    out = subprocess.run(
        [str(kubectl_bin), "version", "--client"], capture_output=True, text=True, check=True
    ).stdout
    assert "Kustomize Version: v5" in out, out


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates(render: Render, target: str) -> None:
    objects = render(target)
    assert objects
    kinds: set[str] = set()
    for obj in objects:
        kinds.add(obj["kind"])
        assert obj["metadata"].get("namespace", "hdx") == "hdx" or obj["kind"] == "Namespace"
        if obj["apiVersion"].startswith(STRIMZI):
            continue  # custom resources: test_strimzi_objects checks them
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except ValidationError as e:
            pytest.fail(
                f"{target}: {obj['kind']}/{obj['metadata']['name']} is invalid for "
                f"Kubernetes {K8S_VERSION}: {'.'.join(map(str, e.path))}: {e.message}"
            )
        except SchemaNotFoundError as e:
            pytest.fail(f"{target}: {e.message}")
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "KafkaTopic",
        "KafkaUser",
    } <= kinds


def test_schema_validation_can_fail() -> None:
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {},
            "template": {
                "spec": {"containers": [{"name": "c", "image": "i", "resources": {"limitz": {}}}]}
            },
        },
    }
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_strimzi_objects(render: Render, target: str) -> None:
    """Required fields of the Strimzi custom resources (no schema is available for them)."""
    for obj in render(target):
        api = obj["apiVersion"]
        if not api.startswith(STRIMZI):
            continue
        where = f"{target}: {obj['kind']}/{obj['metadata']['name']}"
        assert api == "kafka.strimzi.io/v1beta2", where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", obj["metadata"]["name"]), where
        spec = obj["spec"]
        kind = obj["kind"]
        if kind in ("KafkaTopic", "KafkaUser", "KafkaNodePool"):
            assert obj["metadata"]["labels"]["strimzi.io/cluster"] == "hdx-kafka", where
        if kind == "KafkaTopic":
            assert isinstance(spec["partitions"], int) and spec["partitions"] > 0, where
            assert isinstance(spec["replicas"], int) and 0 < spec["replicas"] <= 32767, where
            assert re.fullmatch(r"[a-zA-Z0-9._-]{1,249}", spec["topicName"]), where
            assert all(isinstance(v, str | int | bool) for v in spec.get("config", {}).values())
        elif kind == "KafkaUser":
            auth = spec["authentication"]
            assert auth["type"] in ("scram-sha-512", "tls", "tls-external"), where
            if "password" in auth:
                ref = auth["password"]["valueFrom"]["secretKeyRef"]
                assert ref["name"] and ref["key"], where
            assert spec["authorization"]["type"] == "simple", where
            for acl in spec["authorization"]["acls"]:
                res = acl["resource"]
                assert res["type"] in ("topic", "group", "cluster", "transactionalId"), where
                if res["type"] != "cluster":
                    assert res["name"] and res.get("patternType", "literal") in (
                        "literal",
                        "prefix",
                    ), where
                assert acl["operations"] and set(acl["operations"]) <= ACL_OPERATIONS, where
        elif kind == "Kafka":
            listeners = spec["kafka"]["listeners"]
            assert listeners, where
            for lis in listeners:
                assert re.fullmatch(r"[a-z0-9]{1,11}", lis["name"]), where
                assert isinstance(lis["port"], int) and lis["port"] >= 9092, where
                assert lis["type"] in (
                    "internal",
                    "route",
                    "loadbalancer",
                    "nodeport",
                    "ingress",
                    "cluster-ip",
                ), where
                assert isinstance(lis["tls"], bool), where
            assert spec["kafka"]["authorization"]["type"] == "simple", where
        elif kind == "KafkaNodePool":
            assert spec["replicas"] >= 1 and spec["roles"], where
            assert set(spec["roles"]) <= {"controller", "broker"}, where
            assert spec["storage"]["type"] in ("ephemeral", "persistent-claim", "jbod"), where
        else:
            pytest.fail(f"{where}: unexpected Strimzi kind")


# ------------------------------------------------------------------ workloads


@pytest.mark.parametrize("target", TARGETS)
def test_deployments(render: Render, find: Find, target: str) -> None:
    objects = render(target)
    deps = hdx_deployments(objects)
    assert {service_of(d) for d in deps} == set(HDX)
    config_maps, secrets = find(objects, "ConfigMap"), find(objects, "Secret")
    for name, dep in deps.items():
        svc = service_of(name)
        where = f"{target}: {name}"
        pod = dep["spec"]["template"]["spec"]
        c = container(dep)
        assert c["command"] == ["python", "-m", HDX[svc]], where
        assert c["image"].split("/")[-1].startswith(f"hdx-{svc}:"), where
        assert not c["image"].endswith(":latest"), where
        assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, where
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, where
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"][kind].keys(), where
        assert quantity(c["resources"]["requests"]["memory"]) <= quantity(
            c["resources"]["limits"]["memory"]
        ), where
        psc, csc = pod["securityContext"], c["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert csc["readOnlyRootFilesystem"] is True, where
        assert csc["allowPrivilegeEscalation"] is False, where
        assert csc["capabilities"]["drop"] == ["ALL"], where
        assert pod["automountServiceAccountToken"] is False, where
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], where
        # Everything the container reads from must be in the rendered output.
        for src in c["envFrom"]:
            if "configMapRef" in src:
                assert src["configMapRef"]["name"] in config_maps, where
            else:
                assert src["secretRef"]["name"] == f"hdx-{svc}-env", where
                assert src["secretRef"]["name"] in secrets, where
        for vol in volumes.values():
            if "configMap" in vol:
                assert vol["configMap"]["name"] in config_maps, where
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HDX_SERVICE_NAME"] == svc and env["OTEL_SERVICE_NAME"] == f"hdx-{svc}"
        assert "replicas" not in dep["spec"], f"{where}: replicas belong to the HPA"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items()), (
            where
        )


@pytest.mark.parametrize("target", TARGETS)
def test_services_autoscalers_and_budgets(
    render: Render, find: Find, service_kafka_use: dict[str, Any], target: str
) -> None:
    objects = render(target)
    deps = hdx_deployments(objects)
    services, hpas = find(objects, "Service"), find(objects, "HorizontalPodAutoscaler")
    pdbs = find(objects, "PodDisruptionBudget")
    topics = {
        t["spec"]["topicName"]: t["spec"]["partitions"]
        for t in find(objects, "KafkaTopic").values()
    }
    for key, dep in deps.items():
        svc, name = service_of(key), f"hdx-{key}"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        if key == svc:  # a second Deployment of a service is reached through the first's
            service = services[name]
            assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
            assert service["spec"]["ports"][0]["targetPort"] == "http"
        hpa = hpas[name]["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
        # A replica beyond the partitions of what it consumes would idle.
        # Consents are read in full by every replica; the anchors are read point-wise; the
        # audit log is a side stage whose 3 partitions spread over the first replicas; the
        # ingress pattern also reads every publisher's topic, of as many partitions as
        # hdx.inbound (the exchange creates them so), and several of them in one group.
        reads = service_kafka_use[svc].reads  # derived from the service's code
        inputs = reads - {"hdx.consents", "hdx.audit", "hdx.audit.anchors", "hdx.inbound.*"}
        assert hpa["maxReplicas"] <= min(topics[t] for t in inputs), f"{target}: {svc}"
        pdb = pdbs[name]["spec"]
        assert all(labels.get(k) == v for k, v in pdb["selector"]["matchLabels"].items())
        assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") is not None


# ------------------------------------------------------------------ Kafka users and ACLs
# Which topics and groups each user may use is checked against the services' code in
# test_kafka_security.py; here: each service logs in as its own user.


@pytest.mark.parametrize("target", TARGETS)
def test_each_service_logs_in_as_its_own_kafka_user(
    render: Render, find: Find, target: str
) -> None:
    objects = render(target)
    users, secrets = find(objects, "KafkaUser"), find(objects, "Secret")
    for svc in HDX:
        user = users[f"hdx-{svc}"]
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        # The service logs in as this user, with the password the User Operator sets.
        secret = secrets[f"hdx-{svc}-env"]["stringData"]
        assert secret["HDX_KAFKA_USERNAME"] == f"hdx-{svc}"
        ref = user["spec"]["authentication"]["password"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (f"hdx-{svc}-env", "HDX_KAFKA_PASSWORD")
    for name, user in users.items():
        if not name.startswith("hdx-"):  # an external client: Strimzi makes its password
            assert "password" not in user["spec"]["authentication"], name
    config = _config(objects, find)
    assert config["HDX_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert config["HDX_KAFKA_SECURITY_PROTOCOL"].startswith("SASL_")


# ------------------------------------------------------------------ settings per overlay


def _config(objects: Objects, find: Find) -> dict[str, str]:
    (cm,) = [o for n, o in find(objects, "ConfigMap").items() if n.startswith("hdx-config")]
    return cm["data"]


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_and_databases(render: Render, find: Find, target: str) -> None:
    secrets = find(render(target), "Secret")
    for svc, db in HDX.items():
        data = secrets[f"hdx-{svc}-env"]["stringData"]
        assert re.fullmatch(
            rf"postgresql://[^:]+:[^@]+@[^/]+:5432/{db}", data["HDX_DATABASE_URL"]
        ), data["HDX_DATABASE_URL"]
        if target != "overlays/dev":
            # Placeholders only: real credentials never live in this repository.
            assert "REPLACE_ME" in data["HDX_KAFKA_PASSWORD"]
            assert "REPLACE_ME" in data["HDX_DATABASE_URL"]


def test_dev_postgres_creates_the_databases(render: Render, find: Find) -> None:
    sql = (ROOT / "deploy" / "postgres-init.sql").read_text()
    want = re.findall(r"CREATE DATABASE \w+;", sql)
    (init,) = find(render("overlays/dev"), "ConfigMap")["hdx-postgres-init"]["data"].values()
    assert re.findall(r"CREATE DATABASE \w+;", init) == want


def test_dev_overlay(render: Render, find: Find) -> None:
    objects = render("overlays/dev")
    cfg = _config(objects, find)
    assert cfg["HDX_ENVIRONMENT"] == "development"
    assert cfg["HDX_KAFKA_BOOTSTRAP_SERVERS"] == "hdx-kafka-kafka-bootstrap:9092"
    kafka = find(objects, "Kafka")["hdx-kafka"]
    ports = {lis["port"]: lis for lis in kafka["spec"]["kafka"]["listeners"]}
    assert ports[9092]["authentication"]["type"] == "scram-sha-512"
    pool = find(objects, "KafkaNodePool")["dual-role"]
    assert all(
        t["spec"]["replicas"] <= pool["spec"]["replicas"]
        for t in find(objects, "KafkaTopic").values()
    )
    assert "postgres" in find(objects, "Service")


def test_exchange_stages_apart(render: Render, find: Find) -> None:
    """Two exchange Deployments that between them run every stage once, each with its own
    pods, autoscaler and budget, sharing the exchange's settings, secret (its database and
    Kafka user) and production's sizing."""
    objects = render(STAGES_APART)
    deps = hdx_deployments(objects)
    assert set(deps) == {*HDX, "exchange-delivery"}
    stages = {
        key: {e["name"]: e.get("value") for e in container(deps[key])["env"]}.get(
            "HDX_EXCHANGE_STAGES"
        )
        for key in ("exchange", "exchange-delivery")
    }
    assert stages == {"exchange": "ingress,router", "exchange-delivery": "delivery,audit-log"}
    for key in ("patient-index", "consent"):
        assert "HDX_EXCHANGE_STAGES" not in {e["name"] for e in container(deps[key])["env"]}
    first, second = deps["exchange"], deps["exchange-delivery"]
    for one, other in ((first, second), (second, first)):
        selector = one["spec"]["selector"]["matchLabels"]
        theirs = other["spec"]["template"]["metadata"]["labels"]
        assert not all(theirs.get(k) == v for k, v in selector.items()), "selects the other's pods"
        (spread,) = one["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert spread["labelSelector"]["matchLabels"] == selector
    assert container(first)["envFrom"] == container(second)["envFrom"]
    assert container(first)["resources"] == container(second)["resources"]
    assert container(first)["image"] == container(second)["image"]
    assert "hdx-exchange-delivery" not in find(objects, "Service")
    hpas, pdbs = find(objects, "HorizontalPodAutoscaler"), find(objects, "PodDisruptionBudget")
    prod_hpa = find(render("overlays/production"), "HorizontalPodAutoscaler")["hdx-exchange"]
    for name in ("hdx-exchange", "hdx-exchange-delivery"):
        assert hpas[name]["spec"]["scaleTargetRef"]["name"] == name
        assert hpas[name]["spec"]["minReplicas"] == prod_hpa["spec"]["minReplicas"]
        assert name in pdbs
    # Apart from the exchange's stages, the same as production.
    same = {(o["kind"], o["metadata"]["name"]) for o in render("overlays/production")}
    assert same <= {(o["kind"], o["metadata"]["name"]) for o in objects}


def test_production_overlay(render: Render, find: Find) -> None:
    prod, dev = render("overlays/production"), render("overlays/dev")
    cfg = _config(prod, find)
    assert cfg["HDX_ENVIRONMENT"] == "production"
    assert cfg["HDX_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert cfg["HDX_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert cfg["HDX_KAFKA_IDEMPOTENCE"] == "true"
    assert cfg["HDX_KAFKA_BOOTSTRAP_SERVERS"].endswith(":9093")
    prod_hpa, dev_hpa = find(prod, "HorizontalPodAutoscaler"), find(dev, "HorizontalPodAutoscaler")
    prod_deps, dev_deps = hdx_deployments(prod), hdx_deployments(dev)
    for svc in HDX:
        name = f"hdx-{svc}"
        assert prod_hpa[name]["spec"]["minReplicas"] > dev_hpa[name]["spec"]["minReplicas"]
        assert prod_hpa[name]["spec"]["minReplicas"] >= 3
        p, d = container(prod_deps[svc]), container(dev_deps[svc])
        for res in ("cpu", "memory"):
            assert quantity(p["resources"]["limits"][res]) > quantity(
                d["resources"]["limits"][res]
            ), f"{svc} {res}"
        env = {e["name"]: e.get("value") for e in p["env"]}
        mounts = {m["mountPath"] for m in p["volumeMounts"]}
        assert Path(env["SSL_CERT_FILE"]).parent.as_posix() in mounts
        assert "/" in p["image"], "production pulls from a registry"
    assert not find(prod, "Kafka"), "production uses an existing Kafka cluster"
