"""The Open Inference Protocol's codec without a server, checked against tritonclient's own
encoder and decoder (service/inference_protocol.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton

from refit.errors import BadRequestError
from refit.settings import load_settings
from service.dataplane import Classification
from service.inference_protocol import (
    InferenceProtocol,
    encode_response,
    parse_request,
    split_body,
    wanted_outputs,
)

TEXTS = ["plain", "ünïcode ✓", "with\nnewline and \x00 nul"]


def texts_of(body: bytes, header_length: int | None) -> list[str]:
    protocol = InferenceProtocol(plane=None, settings=load_settings())  # type: ignore[arg-type]
    header, binary = split_body(body, None if header_length is None else str(header_length))
    return protocol.texts(parse_request(header), binary, header_length is not None)


@pytest.mark.parametrize("binary", [True, False])
def test_texts_come_out_as_tritonclient_put_them_in(binary):
    tensor = triton.InferInput("text", [len(TEXTS)], "BYTES")
    tensor.set_data_from_numpy(np.array(TEXTS, dtype=object), binary_data=binary)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    assert (header_length is not None) == binary
    assert texts_of(body, header_length) == TEXTS


def test_a_shape_beyond_the_limit_is_refused_before_reading_data():
    tensor = triton.InferInput("text", [65], "BYTES")
    tensor.set_data_from_numpy(np.array(["a"] * 65, dtype=object))
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    with pytest.raises(BadRequestError, match="at most 64"):
        texts_of(body, header_length)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_reads_what_the_codec_writes(binary):
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    result = Classification("v3", ("a", "b", "ç"), ["id-1", "id-2"], ["a", "ç"],
                            probabilities.max(axis=1), probabilities)
    request = parse_request(b'{"inputs": [], "parameters": {"binary_data_output": %s}}'
                            % (b"true" if binary else b"false"))
    reply = encode_response("refit", result, "r-1", wanted_outputs(request))
    header_length = reply.headers.get("inference-header-content-length")
    assert (header_length is not None) == binary
    decoded = triton.InferResult.from_response_body(reply.body, header_length=header_length)
    assert decoded.get_response()["id"] == "r-1"
    assert decoded.as_numpy("label").tolist() in (["a", "ç"], [b"a", "ç".encode()])
    assert np.array_equal(decoded.as_numpy("probabilities"), probabilities)
    assert np.array_equal(decoded.as_numpy("confidence"), probabilities.max(axis=1))
    assert [x if isinstance(x, str) else x.decode()
            for x in decoded.as_numpy("prediction_id").tolist()] == ["id-1", "id-2"]
