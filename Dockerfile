# The refit service image: BentoML serving the registry's current model, training in-process
# for retrain jobs. Build from the repository root: docker build -t refit .
FROM python:3.11-slim-bookworm

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
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY refit ./refit
COPY adapters ./adapters
COPY service ./service
COPY monitoring ./monitoring
COPY data/demo ./data/demo
COPY bentofile.yaml ./
RUN pip install .

RUN useradd --create-home --uid 10001 refit \
    && mkdir -p /data \
    && chown -R refit:refit /data
USER refit
VOLUME ["/data"]
EXPOSE 3000

HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=2).status == 200 else 1)"

# Build the default model into the volume on first start, then serve.
CMD ["sh", "-c", "python -c 'import sys; from adapters.registry import ModelRegistry; sys.exit(0 if ModelRegistry(\"/data/model_registry\").pointer() else 1)' || refit train --data data/demo/intents.jsonl; exec bentoml serve . --host 0.0.0.0 --port 3000"]
