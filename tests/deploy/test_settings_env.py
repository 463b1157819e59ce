"""Every HDX_* variable that the Dockerfile, docker-compose.yml or the Kubernetes manifests set
is a field of the settings the service reads — and the values parse.

The settings are hdx_shared.settings.HdxSettings, plus — for one service — the fields of the
settings classes in hdx_<service>.settings where that module exists (a service may add its own,
e.g. the exchange's HDX_PUBLIC_BASE_URL). Variables shared by all services (Dockerfile ENV, the
hdx-config ConfigMap) must be HdxSettings fields.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from hdx_shared.settings import HdxSettings

ROOT = Path(__file__).resolve().parents[2]
HDX = {"patient-index": "hdx_patient_index", "consent": "hdx_consent", "exchange": "hdx_exchange"}
TARGETS = ("base", "overlays/dev", "overlays/production", "overlays/production-stages-apart")


def env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    return {prefix + name.upper() for name in cls.model_fields}


def service_settings(service: str) -> list[type[BaseSettings]]:
    """Settings classes of hdx_<service>.settings, or [] while the service has none."""
    module_name = f"{HDX[service]}.settings"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name in (module_name, HDX[service]):
            return []
        pytest.fail(f"{module_name} exists but does not import: {e!r}", pytrace=False)
    except Exception as e:  # a broken settings module is a finding, not a skip
        pytest.fail(f"{module_name} exists but does not import: {e!r}", pytrace=False)
    return [
        c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, BaseSettings) and c.__module__ == module.__name__
    ]


def allowed(service: str | None) -> set[str]:
    names = env_names(HdxSettings)
    if service is not None:
        for cls in service_settings(service):
            names |= env_names(cls)
    return names


def settings_class(service: str) -> type[BaseSettings]:
    own = [c for c in service_settings(service) if issubclass(c, HdxSettings)]
    return own[-1] if own else HdxSettings


def check_names(where: str, names: set[str], service: str | None) -> None:
    hdx = {n for n in names if n.startswith("HDX_")}
    unknown = hdx - allowed(service)
    assert not unknown, (
        f"{where} sets {sorted(unknown)}, which no settings field of "
        f"{service or 'every service'} reads"
    )


def check_values(
    where: str, env: dict[str, str], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's settings load from exactly this environment."""
    for name in list(os.environ):
        if name.startswith("HDX_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("HDX_"):
            monkeypatch.setenv(name, value)
    try:
        settings_class(service)(_env_file=None)  # type: ignore[call-arg]
    except Exception as e:
        pytest.fail(f"{where}: {service}'s settings reject its environment: {e}")


# ------------------------------------------------------------------ the checks


def test_the_check_can_fail() -> None:
    with pytest.raises(AssertionError):
        check_names("test", {"HDX_NO_SUCH_SETTING"}, "exchange")


def test_dockerfile_env() -> None:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    names = set()
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            names |= set(re.findall(r"\b(HDX_[A-Z0-9_]+)=", line))
    assert {"HDX_HTTP_HOST", "HDX_HTTP_PORT"} <= names
    check_names("Dockerfile", names, None)


@pytest.mark.parametrize("service", list(HDX))
def test_compose_env(
    service: str,
    compose_model: dict[str, Any],
    compose_model_kafka3: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for model in (compose_model, compose_model_kafka3):
        env = model["services"][service]["environment"]
        check_names(f"docker-compose.yml ({service})", set(env), service)
        check_values(f"docker-compose.yml ({service})", env, service, monkeypatch)


def test_compose_env_file_names(compose_env: dict[str, str]) -> None:
    check_names("deploy/compose.env", set(compose_env), "exchange")


@pytest.mark.parametrize("target", TARGETS)
def test_kubernetes_env(
    target: str,
    render: Callable[[str], list[dict[str, Any]]],
    find: Callable[..., dict[str, dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = render(target)
    config_maps, secrets = find(objects, "ConfigMap"), find(objects, "Secret")
    (shared_name,) = [n for n in config_maps if n.startswith("hdx-config")]
    shared = config_maps[shared_name]["data"]
    check_names(f"{target} ConfigMap hdx-config", set(shared), None)
    deployments = {
        name: d
        for name, d in find(objects, "Deployment").items()
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "hdx"
    }
    assert {f"hdx-{s}" for s in HDX} <= set(deployments)
    for name, deployment in deployments.items():
        # hdx-exchange-delivery: the exchange's second Deployment (its stages apart).
        service = next(s for s in HDX if name == f"hdx-{s}" or name.startswith(f"hdx-{s}-"))
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        env: dict[str, str] = {}
        for src in c["envFrom"]:
            if "configMapRef" in src:
                env.update(config_maps[src["configMapRef"]["name"]]["data"])
            else:
                secret = secrets[src["secretRef"]["name"]]
                check_names(
                    f"{target} Secret {secret['metadata']['name']}",
                    set(secret["stringData"]),
                    service,
                )
                env.update(secret["stringData"])
        own = {e["name"]: e.get("value", "") for e in c["env"]}
        check_names(f"{target} Deployment {name}", set(own), service)
        env.update(own)
        check_values(f"{target} {name}", env, service, monkeypatch)
