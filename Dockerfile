# syntax=docker/dockerfile:1
# hessian-service image: `docker compose up` (see README.md, "Containers").
#
# Two stages. The builder installs the CPU build of torch and the service from the same
# requirements/*.txt files `make install` uses (tests/test_deploy.py checks that), and
# compiles the native extension hessian_service._C here, at image build time, never at
# first request. The runtime stage gets only the finished virtual environment and runs as
# an unprivileged user.
#
# GPU build (compose profile `gpu`): a CUDA base for both stages and torch's CUDA index,
#   docker build --build-arg BUILDER_BASE=nvidia/cuda:12.8.1-devel-ubuntu24.04 \
#                --build-arg RUNTIME_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
ARG BUILDER_BASE=python:3.11-slim-bookworm
ARG RUNTIME_BASE=python:3.11-slim-bookworm

FROM ${BUILDER_BASE} AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# 1: fail the build when hessian_service._C did not compile (0: ship the autograd fallback).
ARG REQUIRE_NATIVE=1
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A C++ compiler and ninja for the extension; Python itself on bases that lack it (CUDA).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
        $(command -v python3 >/dev/null || echo python3 python3-dev python3-venv) \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/torch.txt requirements/service.txt requirements/
RUN python -m pip install --upgrade pip wheel setuptools
RUN python -m pip install --index-url ${TORCH_INDEX_URL} -r requirements/torch.txt
RUN python -m pip install -r requirements/service.txt
COPY setup.py pyproject.toml ./
COPY csrc/ csrc/
COPY service/ service/
COPY client/ client/
RUN python -m pip install --no-build-isolation ./client \
    && python -m pip install --no-build-isolation .
RUN python -c "import os; from hessian_service.engine import native_status; \
ok, why = native_status(); print('native backend:', why); \
raise SystemExit(0 if ok or os.environ['REQUIRE_NATIVE'] == '0' else 1)"

FROM ${RUNTIME_BASE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# The venv's interpreter is the base image's python3; CUDA bases must install the same one.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --system --user-group --uid 10001 --create-home --home-dir /home/hessian \
        --shell /usr/sbin/nologin hessian \
    && mkdir -p /data \
    && chown hessian:hessian /data
COPY --from=builder /opt/venv /opt/venv
# Every server flag is also HESSIAN_<FLAG> (e.g. HESSIAN_MAX_PARAMS); these are the image's.
# The server listens beyond loopback only with bearer tokens: mount them (one per line) at
# /run/secrets/auth_token, as the compose secret does.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HESSIAN_ADDRESS=0.0.0.0:50051 \
    HESSIAN_DATA_DIR=/data \
    HESSIAN_AUTH_TOKEN_FILE=/run/secrets/auth_token \
    HESSIAN_BACKEND=auto \
    HESSIAN_METRICS_PORT=9464 \
    HESSIAN_LOG_LEVEL=INFO
USER hessian
WORKDIR /home/hessian
VOLUME ["/data"]
# gRPC, then Prometheus metrics.
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "hessian_service.healthprobe"]
# Exec form: the server is PID 1 and receives SIGTERM itself (it drains, then exits 0).
ENTRYPOINT ["python", "-m", "hessian_service.server"]
CMD []
