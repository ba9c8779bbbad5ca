# syntax=docker/dockerfile:1
#
# qwen-serve images. Build targets:
#
#   router      slim Python image: grpc, redis, pydantic. No torch, no vLLM.
#   worker      the pinned ROCm vLLM image plus our wheel; vLLM loads the model card's
#               config fix from the wheel's `vllm.general_plugins` entry point.
#   worker-cpu  vLLM's CPU build and the tiny model, for the cpu-dev overlay (no GPU).
#
#   docker build --target router     -t REGISTRY/qwen-serve-router:TAG .
#   docker build --target worker     -t REGISTRY/qwen-serve-worker:TAG .
#   docker build --target worker-cpu -t REGISTRY/qwen-serve-worker-cpu:TAG .
#
# The gRPC/protobuf stubs are not in git: the `wheel` stage generates them (setup.py runs
# grpc_tools.protoc in build_py) and the build fails if the wheel lacks them or the plugin
# entry point. See docs/deploy.md.

# Pin by digest in your registry mirror (e.g. python:3.11.14-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# vLLM for ROCm (MI300X/MI250 class). Older vLLM/transformers pairs need the model card's
# config fix; the plugin probes for the bug at start and reports what it did.
ARG VLLM_ROCM_IMAGE=rocm/vllm:rocm7.14.0_cdna_ubuntu24.04_py3.14_pytorch_2.11.0_vllm_0.23.0

# ----------------------------------------------------------------------------- wheel
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
# The lock pins the build requirements (grpcio-tools) to the versions tested in CI.
ENV PIP_CONSTRAINT=/src/requirements/cpu-dev.lock \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY requirements/cpu-dev.lock ./requirements/
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY qwen_serve ./qwen_serve
COPY router ./router
COPY worker ./worker
COPY scripts/check_image.py /usr/local/bin/qs-check-image
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python /usr/local/bin/qs-check-image wheel /wheels

# ----------------------------------------------------------------------------- router
FROM ${PYTHON_IMAGE} AS router-venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements/cpu-dev.lock /tmp/constraints.txt
COPY --from=wheel /wheels /tmp/wheels
COPY --from=wheel /usr/local/bin/qs-check-image /usr/local/bin/qs-check-image
# Dependencies resolve within the CI lock; the image must not contain torch or vLLM.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --constraint /tmp/constraints.txt /tmp/wheels/qwen_serve-*.whl \
    && /opt/venv/bin/python /usr/local/bin/qs-check-image router-env

FROM ${PYTHON_IMAGE} AS router
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="qwen-serve-router" \
      org.opencontainers.image.description="qwen-serve gRPC router (grpc.aio -> Redis Streams)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="qwen-serve" \
      io.qwen-serve.component="router"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
       --shell /usr/sbin/nologin app
COPY --from=router-venv /opt/venv /opt/venv
COPY scripts/grpc_health_check.py /usr/local/bin/qs-grpc-health
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    QS_LISTEN="[::]:50051"
USER 10001:10001
WORKDIR /home/app
# gRPC; 8000 is the OpenAI-compatible HTTP API when QS_HTTP_LISTEN is set.
EXPOSE 50051 8000
# Kubernetes ignores HEALTHCHECK and uses its native gRPC probes (k8s/base/router.yaml).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/bin/qs-grpc-health", "--address", "127.0.0.1:50051", "--service", "liveness"]
ENTRYPOINT ["python", "-m", "router"]

# ----------------------------------------------------------------------------- worker (ROCm)
FROM ${VLLM_ROCM_IMAGE} AS worker
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG VLLM_ROCM_IMAGE
LABEL org.opencontainers.image.title="qwen-serve-worker" \
      org.opencontainers.image.description="qwen-serve worker: vLLM AsyncLLM on ROCm, TP 4" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="qwen-serve" \
      org.opencontainers.image.base.name="${VLLM_ROCM_IMAGE}" \
      io.qwen-serve.component="worker"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=wheel /wheels /tmp/wheels
# Freeze what the base image ships (vLLM, torch, transformers, protobuf...) and install our
# wheel within it: nothing of the base is upgraded; a conflict fails the build instead.
# `pip list --format=freeze` prints name==version even for packages installed from URLs.
COPY --from=wheel /usr/local/bin/qs-check-image /tmp/qs-check-image
RUN python3 -m pip list --format=freeze > /tmp/base-constraints.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
       --constraint /tmp/base-constraints.txt /tmp/wheels/qwen_serve-*.whl \
    && python3 /tmp/qs-check-image worker-env \
    && rm -rf /tmp/wheels /tmp/base-constraints.txt /tmp/qs-check-image
# Non-root. GPU device nodes (/dev/kfd, /dev/dri/renderD*) belong to the host's video and
# render groups: the pod adds those GIDs (supplementalGroups, see docs/deploy.md).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --groups video --home-dir /home/app \
       --create-home --shell /usr/sbin/nologin app
ENV PYTHONUNBUFFERED=1 \
    HOME=/home/app \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 10001:10001
WORKDIR /home/app
# Kubernetes uses exec probes with the same command (k8s/base/worker.yaml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=1800s --retries=4 \
    CMD ["python3", "-m", "worker.probe", "live"]
ENTRYPOINT ["python3", "-m", "worker"]
CMD ["--profile", "rocm-tp4"]

# ----------------------------------------------------------------------------- worker (CPU)
FROM ${PYTHON_IMAGE} AS worker-cpu
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="qwen-serve-worker-cpu" \
      org.opencontainers.image.description="qwen-serve worker on vLLM's CPU build (tiny model)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="qwen-serve" \
      io.qwen-serve.component="worker-cpu"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements/cpu-dev.lock /tmp/cpu-dev.lock
COPY --from=wheel /wheels /tmp/wheels
COPY --from=wheel /usr/local/bin/qs-check-image /tmp/qs-check-image
# The same environment as CI (scripts/bootstrap.sh): the lock, installed without resolving.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-deps -r /tmp/cpu-dev.lock \
    && /opt/venv/bin/pip install --no-deps /tmp/wheels/qwen_serve-*.whl \
    && /opt/venv/bin/python /tmp/qs-check-image worker-env \
    && rm -rf /tmp/wheels /tmp/cpu-dev.lock /tmp/qs-check-image
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
       --shell /usr/sbin/nologin app
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 10001:10001
WORKDIR /home/app
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=4 \
    CMD ["python", "-m", "worker.probe", "live"]
ENTRYPOINT ["python", "-m", "worker"]
CMD ["--profile", "cpu-tiny"]
