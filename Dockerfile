# The refit service image: BentoML serving the registry's current model, training in-process
# for retrain jobs. Build from the repository root:   docker build -t refit .
# Or the whole stack with Prometheus and Grafana:    docker compose -f monitoring/docker-compose.yml up --build
# Lint: hadolint Dockerfile (tests/test_monitoring_config.py runs it when hadolint is installed).
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="refit" \
      org.opencontainers.image.description="Text classification that learns in production: ONNX serving through BentoML, feedback, retraining, drift monitoring" \
      org.opencontainers.image.licenses="Apache-2.0"

# TOKENIZERS_PARALLELISM is a switch of the tokenizers library, not a secret (DL3064 matches
# "TOKEN" in the name).
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    REFIT_REGISTRY_PATH=/data/model_registry \
    REFIT_DATA_DIR=/data/var \
    BENTOML_HOME=/data/bentoml

WORKDIR /app

# torch's CPU build comes from PyTorch's own index; PyPI's build of the same version is CUDA.
# Its own layer: ~200 MB that changes only with the pin.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Dependencies in a layer of their own that depends only on pyproject.toml (and the README it
# names), so editing code does not reinstall them: with no package folders copied yet, `pip
# install .` builds an empty distribution, installs every dependency, and the empty
# distribution is removed again.
COPY pyproject.toml README.md ./
RUN pip install . \
    && pip uninstall --yes refit \
    && rm -rf build ./*.egg-info

COPY bentofile.yaml ./
COPY data/demo ./data/demo
COPY refit ./refit
COPY adapters ./adapters
COPY service ./service
COPY monitoring ./monitoring
COPY deploy/entrypoint.sh ./deploy/entrypoint.sh
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info

# Code stays root-owned and read-only to the service; it writes only to /data. /data is
# created and owned before VOLUME, so a new named volume starts with these owner and mode.
RUN useradd --no-log-init --create-home --uid 10001 --user-group refit \
    && mkdir -p /data \
    && chown 10001:10001 /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 3000

# Ready once a worker has loaded a model. The first start trains the default model (about a
# minute on 2 cores) before serving, hence the long start period. No curl in the slim image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4).status == 200 else 1)"]

# deploy/entrypoint.sh builds the default model into the volume on first start (an existing
# registry is left alone) and stops with a non-zero exit and one line saying why when it can
# neither find nor train a model, instead of serving 503 forever. Then it `exec`s bentoml, so
# PID 1 receives SIGTERM and flushes the prediction log on `docker stop`; compose runs it under
# an init (init: true) that reaps orphans. The Kubernetes manifests run the same script.
CMD ["sh", "/app/deploy/entrypoint.sh", "serve"]
