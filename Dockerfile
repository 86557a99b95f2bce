# syntax=docker/dockerfile:1
# gpt2-edge runtime images: the torch-free runtime, the CLI and the HTTP server. Three targets:
#
#   docker build -t gpt2-edge .                          cpu (the default): slim Python, onnxruntime
#   docker build --target gpu -t gpt2-edge:gpu .         x86-64 + NVIDIA GPU: TensorRT, onnxruntime-gpu
#   docker build --target jetson -t gpt2-edge:jetson .   Jetson (JetPack 6), built on the device
#
# Bundles are a volume (made on a workstation: `gpt2-edge export` / `quantize`), never baked in:
#
#   docker run -p 8000:8000 -v $PWD/out/bundle:/bundles/model gpt2-edge
#   docker run --gpus all -v $PWD/out/fp16:/bundles/model gpt2-edge:gpu build-engine /bundles/model
#   docker run --runtime nvidia -v ...:/bundles/model gpt2-edge:jetson build-engine /bundles/model \
#       --max-batch 2 --max-context 512 --workspace-mib 512
#
# The install steps live in scripts/docker-install.sh (CI runs the cpu one in a fresh venv).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# TensorRT 10.8, CUDA 12.8, Python 3.12 (NGC release 25.01); onnxruntime-gpu's CUDA 12 wheels match it.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3
# JetPack 6.1 (L4T R36.4): CUDA 12.6, TensorRT 10.3 and its Python bindings, Python 3.10.
ARG JETPACK_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0

# gpu ---------------------------------------------------------------------------------------------
FROM ${TENSORRT_IMAGE} AS gpu
# The image's Python (Ubuntu 24.04) is marked externally managed; this container is its only user.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /opt/gpt2-edge
COPY pyproject.toml README.md ./
COPY gpt2_edge ./gpt2_edge
COPY scripts/docker-install.sh ./scripts/
# The image's own tensorrt satisfies the `tensorrt` extra; pip adds onnxruntime-gpu and cuda-python.
RUN ./scripts/docker-install.sh gpu /opt/gpt2-edge \
    && groupadd --gid 10001 app \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin app \
    && mkdir -p /bundles && chown 10001:10001 /bundles
USER 10001:10001
VOLUME ["/bundles"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["gpt2-edge"]
CMD ["serve", "/bundles/model", "--host", "0.0.0.0", "--port", "8000", "--provider", "tensorrt"]

# jetson ------------------------------------------------------------------------------------------
FROM ${JETPACK_IMAGE} AS jetson
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Jetson wheels of onnxruntime-gpu (JetPack 6, CUDA 12.6); override for another JetPack.
ARG JETSON_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
# TensorRT's Python bindings come from JetPack (python3-libnvinfer), so the system Python is used.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip python3-libnvinfer \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/gpt2-edge
COPY pyproject.toml README.md ./
COPY gpt2_edge ./gpt2_edge
COPY scripts/docker-install.sh ./scripts/
RUN JETSON_INDEX="${JETSON_INDEX}" ./scripts/docker-install.sh jetson /opt/gpt2-edge \
    && groupadd --gid 10001 app \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin app \
    && mkdir -p /bundles && chown 10001:10001 /bundles
USER 10001:10001
VOLUME ["/bundles"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["gpt2-edge"]
CMD ["serve", "/bundles/model", "--host", "0.0.0.0", "--port", "8000", "--provider", "tensorrt"]

# cpu (the default target: keep it last) ------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /opt/gpt2-edge
COPY pyproject.toml README.md ./
COPY gpt2_edge ./gpt2_edge
COPY scripts/docker-install.sh ./scripts/
RUN python -m venv /opt/venv \
    && PYTHON=/opt/venv/bin/python ./scripts/docker-install.sh cpu /opt/gpt2-edge \
    && groupadd --gid 10001 app \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin app \
    && mkdir -p /bundles && chown 10001:10001 /bundles
USER 10001:10001
VOLUME ["/bundles"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["gpt2-edge"]
CMD ["serve", "/bundles/model", "--host", "0.0.0.0", "--port", "8000"]
