"""The peer: a refit version served by MLServer through a small custom runtime.

MLServer (SeldonIO) runs this class in its inference worker processes; it is loaded by
``bench/peer_mlserver.py`` from a model folder whose ``model-settings.json`` names
``bench.mlserver_runtime.RefitOnnxRuntime`` and points ``parameters.uri`` at a registry version.

The compute is refit's own (``adapters.serving.runtime.OnnxClassifier``: the same
``tokenizer.json`` through ``tokenizers``, the same ONNX graph, one intra-op thread, the same
length-aware runs inside a batch), so the comparison measures the serving stack around the model:
MLServer's REST server, its adaptive batching (merging single-text requests into one tensor) and
its dispatch to parallel workers, against refit's.

Only numpy, onnxruntime, tokenizers and mlserver are imported: this module runs in MLServer's own
virtualenv (``/work/venv-mlserver``), never in refit's, because their dependencies clash.
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse

from adapters.serving.runtime import OnnxClassifier


class RefitOnnxRuntime(MLModel):
    """Text in (``BYTES [N]``), ``label`` (BYTES), ``confidence`` (FP32) and ``probabilities``
    (FP32 ``[N, C]``) out: the outputs refit's ``/v2`` infer returns, without its prediction id
    (MLServer keeps no prediction log)."""

    async def load(self) -> bool:
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if not uri:
            raise ValueError("model-settings.json: parameters.uri must name a version folder")
        self._classifier = OnnxClassifier(uri, intra_op_threads=1)
        self._classifier.warm_up()
        self._labels = np.array(self._classifier.labels, dtype=object)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        texts = StringCodec.decode_input(payload.inputs[0])
        probabilities = self._classifier.predict(texts).probabilities
        best = probabilities.argmax(axis=1)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                StringCodec.encode_output("label", list(self._labels[best])),
                NumpyCodec.encode_output(
                    "confidence", probabilities[np.arange(len(best)), best]
                ),
                NumpyCodec.encode_output("probabilities", probabilities),
            ],
        )
