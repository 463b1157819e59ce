"""The Dockerfile: multi-stage, non-root, uv-built from the lock, one image per service."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HDX = {"patient-index": "hdx_patient_index", "consent": "hdx_consent", "exchange": "hdx_exchange"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` (or a folder above it) from the build context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    hit = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.removeprefix("!")
        for prefix in prefixes:
            candidates = [prefix]
            if pat.startswith("**/"):
                pat_tail = pat[3:]
                segs = prefix.split("/")
                candidates = ["/".join(segs[i:]) for i in range(len(segs))]
                if any(fnmatch.fnmatchcase(c, pat_tail) for c in candidates):
                    hit = not negate
            elif fnmatch.fnmatchcase(prefix, pat):
                hit = not negate
    return hit


def test_base_image_and_stages() -> None:
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    st = stages()
    assert len(st) >= 3  # uv, build, runtime
    froms = [s[0][1] for s in st]
    assert froms[-1].startswith("${PYTHON_IMAGE}") and froms[-2].startswith("${PYTHON_IMAGE}")


def test_runtime_stage_is_small_and_non_root() -> None:
    runtime = stages()[-1]
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0
    copies = [a for i, a in runtime if i == "COPY"]
    assert copies and all(a.startswith("--from=") for a in copies), (
        "the runtime stage copies only the built venv, no sources or tools"
    )
    assert not [a for i, a in runtime if i == "RUN" and ("uv " in a or "pip " in a)]
    entry = [a for i, a in runtime if i == "ENTRYPOINT"]
    assert entry == ['["hdx-service"]']
    run = " ".join(a for i, a in runtime if i == "RUN")
    # hdx-service is `exec python -m hdx_<service>`, the service's dash turned underscore.
    assert "exec python -m %s" in run and "tr '-' '_'" in run
    for service, module in HDX.items():
        assert "hdx_" + service.replace("-", "_") == module
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "HDX_HTTP_HOST=0.0.0.0" in env and "HDX_HTTP_PORT=8000" in env
    assert [a for i, a in runtime if i == "EXPOSE"] == ["8000"]


def test_build_uses_uv_from_the_lock() -> None:
    build = stages()[-2]
    runs = [a for i, a in build if i == "RUN"]
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs
    for r in syncs:
        assert "--frozen" in r and "--no-dev" in r and '--package "hdx-${SERVICE}"' in r
    case = next(r for r in runs if r.startswith("case"))
    assert re.search(r"\bpatient-index\|consent\|exchange\)", case)
    copied = " ".join(a for i, a in build if i == "COPY" and not a.startswith("--from"))
    for path in ("pyproject.toml", "uv.lock", "shared/pyproject.toml", "shared/src"):
        assert path in copied
    lock = (ROOT / "uv.lock").read_text()
    for service in HDX:
        assert f"services/{service}/pyproject.toml" in copied
        assert f"services/{service}/src" in copied
        assert f'name = "hdx-{service}"' in lock


@pytest.mark.parametrize("service", list(HDX))
def test_each_service_is_a_package_the_image_can_run(service: str) -> None:
    project = ROOT / "services" / service
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    assert meta["name"] == f"hdx-{service}"
    assert (project / "src" / HDX[service] / "__init__.py").is_file()
    assert meta["scripts"][f"hdx-{service}"].startswith(f"{HDX[service]}.__main__")


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    copied = []
    for ins, args in stages()[-2]:
        if ins == "COPY" and not args.startswith("--from"):
            copied += [w.rstrip("*") for w in args.split()[:-1] if not w.startswith("--")]
    needed = [
        *copied,
        "shared/src/hdx_shared/settings.py",
        "services/exchange/src/hdx_exchange/__init__.py",
    ]
    kept_out = [p for p in needed if ignored(p, patterns)]
    assert not kept_out, f".dockerignore drops {kept_out}"
    for junk in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_dockerfile.py",
        "shared/src/hdx_shared/__pycache__/x.pyc",
        "docs/operations.md",
    ):
        assert ignored(junk, patterns), junk
