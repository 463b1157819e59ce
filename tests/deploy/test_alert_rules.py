"""deploy/prometheus-alerts.yml: well-formed rules, loaded by compose's Prometheus, and only
about metrics and labels the services really export — a renamed metric or label would
otherwise leave an alert that can never fire."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

# Importing these registers every metric the services export (the stages' shared ones, the
# HTTP layer's, consent's and the patient index's own).
import hdx_consent.gate
import hdx_patient_index.pipeline
import hdx_shared.http
import hdx_shared.messaging
from hdx_exchange.settings import STAGES as EXCHANGE_STAGES

ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = ROOT / "deploy" / "prometheus-alerts.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Every stage a process can run: the exchange's four and the other services' one each.
ALL_STAGES = {*EXCHANGE_STAGES, "patient-index", "consent-gate"}
SEVERITIES = {"critical", "warning", "info"}
# Series Prometheus makes itself, with their labels.
PROMETHEUS_OWN = {"up": {"job", "instance"}}
METRIC = re.compile(r"\b(hdx_[a-z_]+|up)\b")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"")
TEMPLATE_LABEL = re.compile(r"\$labels\.([a-z_]+)")
STAGE_MATCHER = re.compile(r'stage="([^"]+)"')

assert hdx_consent.gate and hdx_patient_index.pipeline and hdx_shared.http
assert hdx_shared.messaging


def exported() -> dict[str, set[str]]:
    """Every sample name the services' registry serves (`hdx_stage_messages_total`,
    `hdx_since_ingress_seconds_bucket`, …) with its labels."""
    out: dict[str, set[str]] = {}
    # prometheus_client keeps the sample names each collector serves only privately.
    for name, collector in REGISTRY._names_to_collectors.items():
        labels = set(getattr(collector, "_labelnames", ()))
        if name.endswith("_bucket"):
            labels.add("le")
        out[name] = labels
    return out


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_rule_is_complete() -> None:
    doc = yaml.safe_load(RULES_FILE.read_text())
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"
    alerts = [r["alert"] for r in rules()]
    assert len(alerts) == len(set(alerts)), "alert names must be unique"
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_a_rule_reads_only_metrics_and_labels_the_services_export(rule: dict[str, Any]) -> None:
    served = {**exported(), **PROMETHEUS_OWN}
    expr = rule["expr"]
    metrics = set(METRIC.findall(expr))
    assert metrics, f"{rule['alert']} reads no metric"
    unknown = metrics - set(served)
    assert not unknown, f"{rule['alert']}: no such series on /metrics: {sorted(unknown)}"
    labels = set().union(*(served[m] for m in metrics))
    used = {label.strip() for group in BY.findall(expr) for label in group.split(",")}
    used |= set(MATCHER.findall(expr))
    annotations = " ".join(rule["annotations"].values())
    used |= set(TEMPLATE_LABEL.findall(annotations))
    used.discard("")
    assert used <= labels, f"{rule['alert']}: labels the metrics lack: {sorted(used - labels)}"


def test_the_stages_named_are_the_stages_that_exist() -> None:
    """A stage the rules name must exist (or its alert would always fire), and the alert for
    a stage no process runs must name every stage there is."""
    for rule in rules():
        named = set(STAGE_MATCHER.findall(rule["expr"]))
        assert named <= ALL_STAGES, f"{rule['alert']}: unknown stages {sorted(named - ALL_STAGES)}"
    missing = next(r for r in rules() if r["alert"] == "HDXStageMissing")
    assert set(STAGE_MATCHER.findall(missing["expr"])) == ALL_STAGES


def test_compose_prometheus_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    mounts = {
        volume.split(":")[1]: volume.split(":")[0]
        for volume in compose["services"]["prometheus"]["volumes"]
        if volume.startswith("./")
    }
    loaded = config.get("rule_files", [])
    assert loaded, "deploy/prometheus.yml loads no rule file"
    for path in loaded:
        assert mounts.get(path) == "./deploy/prometheus-alerts.yml", (path, mounts)
    # Each alert's stage label comes from the scraped series: every HDX job is scraped.
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"hdx-exchange", "hdx-consent", "hdx-patient-index"} <= jobs
