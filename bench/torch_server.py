"""What a user would build instead: the same model in PyTorch eager behind a minimal HTTP server.

Starlette on uvicorn, one request at a time per worker (no batching), same request and response
shape as refit's /predict, no logging. The model is the registry version named by
REFIT_BENCH_VERSION_DIR, loaded from its PyTorch weights (encoder and head).

    REFIT_BENCH_VERSION_DIR=... .venv/bin/uvicorn bench.torch_server:app --workers 2 --port 3100
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from adapters.serving.registry import ModelVersion
from adapters.serving.tokenization import TextTokenizer
from adapters.training.pipeline import version_encoder, version_head

torch.set_num_threads(int(os.environ.get("REFIT_BENCH_TORCH_THREADS", "1")))
_dir = Path(os.environ["REFIT_BENCH_VERSION_DIR"])
_version = ModelVersion(_dir.name, _dir)
_encoder = version_encoder(_version).eval()
_head = version_head(_version).eval()
_labels = _version.labels
_tokenizer = TextTokenizer(_dir / "tokenizer.json", _version.manifest["encoder"]["max_seq_length"])


async def predict(request: Request) -> JSONResponse:
    texts = (await request.json())["texts"]
    ids, mask = _tokenizer.encode(texts)
    with torch.inference_mode():
        probabilities = torch.softmax(
            _head(_encoder(torch.from_numpy(ids), torch.from_numpy(mask))), -1
        )
    predictions = []
    for row in probabilities.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        predictions.append({
            "prediction_id": uuid.uuid4().hex, "label": _labels[best], "confidence": row[best],
            "scores": dict(zip(_labels, row, strict=True)),
        })
    return JSONResponse({"model_version": _version.name, "predictions": predictions})


async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"ready": True, "at": time.time()})


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", ready)])
