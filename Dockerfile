# syntax=docker/dockerfile:1
# Conversational Core: `docker build -t conversational-core .`
#   API:    docker run -e JWT_SECRET=… -e REDIS_URL=redis://… -p 8000:8000 conversational-core
#   worker: docker run -e JWT_SECRET=… -e REDIS_URL=redis://… conversational-core python run.py worker
# docker-compose.yml runs both with Redis.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the pinned requirements in a venv -------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# Every dependency ships wheels for amd64 and arm64; the C toolchain is there for a platform
# where one does not (uvloop, httptools, hiredis build with it). The Rust-based ones (orjson,
# pydantic-core, cryptography, uuid-utils) are always taken as wheels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install -r /tmp/requirements.txt

# --- runtime: the venv and the code, nothing else -----------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# A fixed uid/gid, so volume ownership and Kubernetes' runAsNonRoot can rely on it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin app

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
COPY pyproject.toml run.py ./
COPY src/ ./src/
# Byte-code compiled now: the code is read-only for the app user at run time. It writes only to
# the data directory (the embedded store, used when REDIS_URL is unset) and the metrics
# directory (prometheus_client's per-process files; `run.py` empties it when serving, and the
# worker, which does not, needs it to exist).
RUN /opt/venv/bin/python -m compileall -q src \
    && mkdir -p /app/data /tmp/prometheus \
    && chown 10001:10001 /app/data /tmp/prometheus

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ENVIRONMENT=production \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/app/data \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus

VOLUME ["/app/data"]
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM

# No curl in the image: the standard library asks the liveness endpoint (any error or non-2xx
# status exits non-zero). The worker has no HTTP port: compose disables this check for it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('PORT', '8000'), timeout=4)"]

CMD ["python", "run.py"]
