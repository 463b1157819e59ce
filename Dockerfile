# syntax=docker/dockerfile:1
#
# One image per HDX service, from one Dockerfile:
#   docker build --build-arg SERVICE=exchange -t hdx-exchange:0.1.0 .
# SERVICE is one of: patient-index | consent | exchange.
# The image runs `python -m hdx_<service>` as an unprivileged user and needs no writable
# root filesystem (only /tmp); docker-compose.yml and deploy/k8s build and run it that way.

ARG PYTHON_IMAGE=python:3.11-slim
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------- build: a venv, no sources
FROM ${PYTHON_IMAGE} AS build
ARG SERVICE
RUN case "${SERVICE}" in \
      patient-index|consent|exchange) ;; \
      *) echo "build arg SERVICE must be patient-index, consent or exchange (got '${SERVICE}')" >&2; \
         exit 1 ;; \
    esac
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src

# Third-party dependencies first, from the lock file alone: this layer is reused until
# uv.lock or a pyproject.toml changes.
COPY pyproject.toml uv.lock README.md* ./
COPY shared/pyproject.toml shared/pyproject.toml
COPY services/patient-index/pyproject.toml services/patient-index/pyproject.toml
COPY services/consent/pyproject.toml services/consent/pyproject.toml
COPY services/exchange/pyproject.toml services/exchange/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package "hdx-${SERVICE}"

# Then HDX itself, installed as wheels (not editable) so the runtime image needs no sources.
COPY shared/src shared/src
COPY services/patient-index/src services/patient-index/src
COPY services/consent/src services/consent/src
COPY services/exchange/src services/exchange/src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package "hdx-${SERVICE}"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE
LABEL org.opencontainers.image.title="hdx-${SERVICE}" \
      org.opencontainers.image.description="HDX ${SERVICE} service" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 hdx \
 && useradd --system --uid 10001 --gid hdx --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin hdx \
 && module="hdx_$(printf '%s' "${SERVICE}" | tr '-' '_')" \
 && printf '#!/bin/sh\n# Written at build time: start this image'"'"'s HDX service.\nexec python -m %s "$@"\n' \
      "${module}" > /usr/local/bin/hdx-service \
 && chmod 0755 /usr/local/bin/hdx-service

# Owned by root and read-only for the service user: the code cannot be changed at run time.
COPY --from=build /app/.venv /app/.venv

ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HDX_SERVICE_NAME="${SERVICE}" \
    HDX_HTTP_HOST=0.0.0.0 \
    HDX_HTTP_PORT=8000 \
    HDX_DATA_DIR=/tmp/hdx

WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Liveness only; compose and Kubernetes also ask /readyz before sending work.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# `hdx-service` is `exec python -m hdx_<service>` (hdx_patient_index, hdx_consent, hdx_exchange).
ENTRYPOINT ["hdx-service"]
