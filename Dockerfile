# syntax=docker/dockerfile:1
# Minimal images; the deployment issue completes them (ROCm worker base, probes, labels).
# Build targets: router (slim, no torch or vLLM) and worker (adds vLLM from the base image).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VLLM_ROCM_IMAGE=rocm/vllm:latest

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY qwen_serve ./qwen_serve
COPY router ./router
COPY worker ./worker
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS router
RUN useradd --create-home --uid 10001 app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
EXPOSE 50051
ENTRYPOINT ["python", "-m", "router"]

FROM ${VLLM_ROCM_IMAGE} AS worker
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
RUN useradd --create-home --uid 10001 app
USER 10001
ENTRYPOINT ["python", "-m", "worker", "--profile", "rocm-tp4"]
