"""The Open Inference Protocol (v2) against a real server, through ``tritonclient[http]`` as an
unmodified third-party client, and through raw HTTP for hostile input.

The server's registry holds two versions, ``v1`` and the current ``v2`` (a copy), so a version
that exists but is not loaded can be asked for. It runs the defaults a user gets (two workers).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.servers import ServiceProcess, copy_registry, wait_for

pytestmark = pytest.mark.server

MODEL = "refit"
TEXTS = ["where is my parcel?", "I want to cancel my order", "the app keeps crashing"]
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def server(trained_registry, tmp_path_factory):
    from adapters.serving.registry import ModelRegistry

    root = tmp_path_factory.mktemp("oip")
    registry = ModelRegistry(copy_registry(trained_registry.root, root / "registry"))
    v2 = registry.versions_dir / "v2"
    shutil.copytree(registry.versions_dir / "v1", v2)
    manifest = json.loads((v2 / "manifest.json").read_text())
    (v2 / "manifest.json").write_text(json.dumps({**manifest, "version": "v2"}))
    registry.promote("v2")
    service = ServiceProcess(registry=registry.root, data_dir=root / "var").start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def http(server):
    with server.client() as session:
        yield session


@pytest.fixture(scope="module")
def labels(http):
    return http.get("/models").json()["versions"][-1]["labels"]


def text_input(texts, binary=True, shape=None):
    tensor = triton.InferInput("text", shape or [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(shape or [len(texts)]),
                               binary_data=binary)
    return tensor


def decoded(array) -> list[str]:
    return [item.decode() if isinstance(item, bytes) else item for item in array.tolist()]


# -- tritonclient --------------------------------------------------------------------------------


def test_server_is_live_and_ready_and_names_its_extensions(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "refit" and "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_describes_inputs_outputs_labels_and_versions(client, labels):
    metadata = client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL and metadata["versions"] == ["v1", "v2"]
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    outputs = {o["name"]: o for o in metadata["outputs"]}
    assert {name: (o["datatype"], o["shape"]) for name, o in outputs.items()} == {
        "label": ("BYTES", [-1]), "confidence": ("FP32", [-1]),
        "probabilities": ("FP32", [-1, len(labels)]), "prediction_id": ("BYTES", [-1]),
    }
    assert outputs["probabilities"]["parameters"]["labels"] == labels
    assert metadata["parameters"] == {"version": "v2", "serving_version": "v2"}
    # A version that exists but is not loaded still has metadata.
    assert client.get_model_metadata(MODEL, "v1")["parameters"]["version"] == "v1"
    for name, version in (("other", ""), (MODEL, "v7"), (MODEL, "latest")):
        with pytest.raises(InferenceServerException) as error:
            client.get_model_metadata(name, version)
        assert error.value.status() == "404"


def test_model_readiness_by_version(client):
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "v2")
    assert not client.is_model_ready(MODEL, "v1")  # exists, not loaded
    assert not client.is_model_ready(MODEL, "v9")
    assert not client.is_model_ready("other")


def test_infer_with_binary_tensors_both_ways_matches_predict(client, http, labels):
    """tritonclient's defaults: binary input, and (no outputs named) binary outputs."""
    result = client.infer(MODEL, [text_input(TEXTS)], request_id="req-42")
    response = result.get_response()
    assert response["id"] == "req-42" and response["model_version"] == "v2"
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    label = decoded(result.as_numpy("label"))
    confidence = result.as_numpy("confidence")
    probabilities = result.as_numpy("probabilities")
    ids = decoded(result.as_numpy("prediction_id"))
    assert confidence.dtype == np.float32 and confidence.shape == (3,)
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, len(labels))
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert label == [labels[i] for i in probabilities.argmax(axis=1)]
    assert np.allclose(confidence, probabilities.max(axis=1))
    assert len(set(ids)) == 3 and all(re.fullmatch(r"[0-9a-f]{28}", i) for i in ids)
    predicted = http.post("/predict", json={"texts": TEXTS}).json()["predictions"]
    assert label == [p["label"] for p in predicted]
    assert np.allclose(probabilities, [[p["scores"][name] for name in labels] for p in predicted],
                       atol=1e-5)


def test_infer_with_json_tensors_and_shape_n_by_1(client, labels):
    outputs = [triton.InferRequestedOutput(name, binary_data=False)
               for name in ("label", "confidence", "probabilities", "prediction_id")]
    result = client.infer(MODEL, [text_input(TEXTS, binary=False, shape=[3, 1])],
                          outputs=outputs)
    response = result.get_response()
    assert all("data" in o and "parameters" not in o for o in response["outputs"])
    assert result.as_numpy("probabilities").shape == (3, len(labels))
    assert len(decoded(result.as_numpy("label"))) == 3
    binary = client.infer(MODEL, [text_input(TEXTS)])
    assert decoded(binary.as_numpy("label")) == decoded(result.as_numpy("label"))
    assert np.allclose(binary.as_numpy("probabilities"), result.as_numpy("probabilities"))


def test_only_the_outputs_asked_for_come_back_in_their_order(client):
    outputs = [triton.InferRequestedOutput("prediction_id"),
               triton.InferRequestedOutput("label", binary_data=False)]
    result = client.infer(MODEL, [text_input(TEXTS[:1])], outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["prediction_id", "label"]
    assert result.as_numpy("confidence") is None and result.as_numpy("probabilities") is None
    assert len(decoded(result.as_numpy("label"))) == 1


def test_a_version_is_served_only_while_loaded(client):
    result = client.infer(MODEL, [text_input(TEXTS[:1])], model_version="v2")
    assert result.get_response()["model_version"] == "v2"
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [text_input(TEXTS[:1])], model_version="v1")
    assert error.value.status() == "503"
    assert "'v1' exists but is not loaded" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [text_input(TEXTS[:1])], model_version="v3")
    assert error.value.status() == "404" and "not in the registry" in error.value.message()


def test_a_bad_request_is_a_400_the_client_surfaces(client):
    wrong_name = triton.InferInput("texts", [1], "BYTES")
    wrong_name.set_data_from_numpy(np.array(["hello"], dtype=object))
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [wrong_name])
    assert error.value.status() == "400" and "'text'" in error.value.message()
    numbers = triton.InferInput("text", [2], "INT32")
    numbers.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [numbers])
    assert error.value.status() == "400" and "BYTES" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [text_input(["   "])])
    assert error.value.status() == "400" and "empty" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [text_input(TEXTS)], outputs=[triton.InferRequestedOutput("logits")])
    assert error.value.status() == "400" and "logits" in error.value.message()


def test_compressed_requests_are_accepted(client):
    for algorithm in ("gzip", "deflate"):
        result = client.infer(MODEL, [text_input(TEXTS)],
                              request_compression_algorithm=algorithm)
        assert len(result.as_numpy("label")) == 3


def test_feedback_on_a_v2_prediction_id(client, http):
    result = client.infer(MODEL, [text_input(["my parcel never arrived"])])
    prediction_id = decoded(result.as_numpy("prediction_id"))[0]
    answer = http.post("/feedback", json={"items": [
        {"prediction_id": prediction_id, "label": "order_status"}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 1
    listed = http.get("/feedback", params={"limit": 5}).json()["items"]
    entry = next(e for e in listed if e["prediction_id"] == prediction_id)
    assert entry["text"] == "my parcel never arrived"
    assert entry["predicted_label"] == decoded(result.as_numpy("label"))[0]
    assert entry["model_version"] == "v2" and entry["source"] == "prediction_id"


def test_v2_calls_are_counted_in_the_same_metrics(client, http):
    client.infer(MODEL, [text_input(TEXTS)])
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [text_input(TEXTS)], model_version="v1")

    def counted() -> bool:
        text = http.get("/metrics").text
        return ('refit_http_requests_total{endpoint="v2_infer",status="200"}' in text
                and 'refit_http_requests_total{endpoint="v2_infer_version",status="503"}' in text
                and "refit_predictions_total" in text)

    wait_for(counted, timeout=10, what="v2 requests in /metrics")


# -- raw HTTP: hostile input ---------------------------------------------------------------------


def framed(header: dict, binary: bytes = b"", length: str | None = None):
    head = json.dumps(header).encode()
    return head + binary, {HEADER: length if length is not None else str(len(head))}


def elements(*items: bytes) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def binary_input(size: int, shape=(1,), **extra) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": list(shape),
                        "parameters": {"binary_data_size": size}, **extra}]}


def json_input(data, shape=None, datatype="BYTES", name="text") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype,
                        "shape": shape if shape is not None else [len(data)], "data": data}]}


ONE = elements(b"where is my parcel?")
HOSTILE = {
    "not json": (b"{inputs: nope", {}, 400, "body"),
    "json array": (b"[1, 2]", {}, 400, "body"),
    "no inputs": (b"{}", {}, 400, "inputs"),
    "not utf-8 json": (b"\xff\xfe{}", {}, 400, "body"),
    "two inputs": (json.dumps({"inputs": json_input(["a"])["inputs"] * 2}).encode(), {}, 400,
                   "inputs"),
    "wrong datatype": (json.dumps(json_input([1.5], datatype="FP32")).encode(), {}, 400,
                       "inputs[0].datatype"),
    "shape n by 2": (json.dumps(json_input(["a", "b"], shape=[1, 2])).encode(), {}, 400,
                     "inputs[0].shape"),
    "shape empty": (json.dumps(json_input([], shape=[])).encode(), {}, 400, "inputs[0].shape"),
    "shape zero": (json.dumps(json_input([], shape=[0])).encode(), {}, 400, "inputs[0].shape"),
    "negative shape": (json.dumps(json_input(["a"], shape=[-1])).encode(), {}, 400,
                       "inputs[0].shape"),
    "huge n": (json.dumps(json_input(["a"], shape=[10**12])).encode(), {}, 400,
               "inputs[0].shape"),
    "shape as string": (json.dumps(json_input(["a"], shape="1")).encode(), {}, 400,
                        "inputs[0].shape"),
    "fewer data than shape": (json.dumps(json_input(["a"], shape=[2])).encode(), {}, 400,
                              "inputs[0].data"),
    "number in data": (json.dumps(json_input(["a", 7])).encode(), {}, 400, "inputs[0].data[1]"),
    "nested too deep": (json.dumps(json_input([[["a"]]])).encode(), {}, 400,
                        "inputs[0].data[0]"),
    "too long a text": (json.dumps(json_input(["x" * 5000])).encode(), {}, 400,
                        "inputs[0].data[0]"),
    "unknown output": (json.dumps({**json_input(["a"]), "outputs": [{"name": "x"}]}).encode(),
                       {}, 400, "outputs[0].name"),
    "output twice": (json.dumps({**json_input(["a"]), "outputs": [{"name": "label"}] * 2})
                     .encode(), {}, 400, "outputs[1].name"),
    "binary_data not a bool": (json.dumps({**json_input(["a"]), "outputs": [
        {"name": "label", "parameters": {"binary_data": "yes"}}]}).encode(), {}, 400,
        "outputs[0].parameters.binary_data"),
    "classification asked": (json.dumps({**json_input(["a"]), "outputs": [
        {"name": "label", "parameters": {"classification": 3}}]}).encode(), {}, 400,
        "outputs[0].parameters.classification"),
    "id not a string": (json.dumps({**json_input(["a"]), "id": 5}).encode(), {}, 400, "id"),
    "header length not a number": (*framed(binary_input(len(ONE)), ONE, "ten"), 400, HEADER),
    "header length negative": (*framed(binary_input(len(ONE)), ONE, "-5"), 400, HEADER),
    "header length zero": (*framed(binary_input(len(ONE)), ONE, "0"), 400, HEADER),
    "header length past the body": (*framed(binary_input(len(ONE)), ONE, "100000"), 400,
                                    HEADER),
    "header length enormous": (*framed(binary_input(len(ONE)), ONE, "9" * 5000), 400, HEADER),
    "header length cuts the json": (*framed(binary_input(len(ONE)), ONE, "10"), 400, "body"),
    "binary size without header": (json.dumps(binary_input(len(ONE))).encode() + ONE, {}, 400,
                                   "body"),
    "binary size mismatch": (*framed(binary_input(len(ONE) + 3), ONE), 400,
                             "inputs[0].parameters.binary_data_size"),
    "binary size negative": (*framed(binary_input(-1), ONE), 400,
                             "inputs[0].parameters.binary_data_size"),
    "binary size a bool": (*framed(binary_input(True), ONE), 400,
                           "inputs[0].parameters.binary_data_size"),
    "binary and json data": (*framed(binary_input(len(ONE), data=["a"]), ONE), 400,
                             "inputs[0].data"),
    "bytes after header, none declared": (*framed(json_input(["a"]), ONE), 400, HEADER),
    "element length overruns": (*framed(binary_input(8), b"\xff\xff\xff\x7fabcd"), 400,
                                "inputs[0].data[0]"),
    "prefix cut short": (*framed(binary_input(len(ONE) + 2, shape=[2]), ONE + b"\x01\x00"), 400,
                         "inputs[0].data[1]"),
    "more elements than shape": (*framed(binary_input(len(ONE) * 2), ONE * 2), 400,
                                 "inputs[0].parameters.binary_data_size"),
    "fewer elements than shape": (*framed(binary_input(len(ONE), shape=[2]), ONE), 400,
                                  "inputs[0].parameters.binary_data_size"),
    "element not utf-8": (*framed(binary_input(6), elements(b"\xc3\x28")), 400,
                          "inputs[0].data[0]"),
    "blank element": (*framed(binary_input(5), elements(b" ")), 400, "inputs[0].data[0]"),
    "unknown encoding": (b"{}", {"content-encoding": "br"}, 415, "content-encoding"),
    "gzip that is not": (b"plainly not gzip", {"content-encoding": "gzip"}, 400,
                         "content-encoding"),
    "gzip bomb": (gzip.compress(b" " * 3_000_000), {"content-encoding": "gzip"}, 413, None),
    "body too large": (b"x" * 2_000_000, {}, 413, None),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_input_is_a_clear_4xx(http, case):
    body, headers, status, field = HOSTILE[case]
    response = http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert isinstance(error["error"], str) and error["error"]
    if field is not None:
        assert error["field"] == field, error


def test_random_bytes_never_break_the_server(http):
    generator = np.random.default_rng(0)
    for _ in range(60):
        body = generator.bytes(int(generator.integers(0, 400)))
        headers = {}
        if generator.random() < 0.5:
            headers[HEADER] = str(int(generator.integers(0, 500)))
        response = http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
        assert response.status_code == 400 and "error" in response.json(), response.text
    assert http.get("/v2/health/ready").status_code == 200


def test_raw_binary_answer_is_framed_as_the_extension_says(http, labels):
    body, headers = framed({**binary_input(len(ONE)), "parameters": {"binary_data_output": True},
                            "outputs": [{"name": "confidence"},
                                        {"name": "label", "parameters": {"binary_data": False}},
                                        {"name": "probabilities"}]}, ONE)
    response = http.post(f"/v2/models/{MODEL}/versions/v2/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers[HEADER])
    header = json.loads(response.content[:length])
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in header["outputs"]]
    assert sizes == [4, None, 4 * len(labels)]
    assert len(response.content) == length + 4 + 4 * len(labels)
    probabilities = np.frombuffer(response.content[length + 4:], dtype="<f4")
    assert header["outputs"][1]["data"] == [labels[int(probabilities.argmax())]]


def test_paths_and_methods(http):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get(f"/v2/models/{MODEL}/ready").json() == {
        "name": MODEL, "version": "v2", "ready": True}
    assert http.get(f"/v2/models/{MODEL}/versions/v1/ready").status_code == 400
    assert http.get(f"/v2/models/{MODEL}/infer").status_code == 405
    assert http.post("/v2/models/other/infer", json=json_input(["a"])).status_code == 404
    long_version = http.post(f"/v2/models/{MODEL}/versions/{'v' * 3000}/infer",
                             json=json_input(["a"]))
    assert long_version.status_code == 404 and len(long_version.text) < 500


def test_the_readme_example_runs_as_written(server, labels):
    from tests.readme_walkthrough import ROOT, section

    text = section((ROOT / "README.md").read_text(), "Open Inference Protocol")
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    namespace: dict = {}
    exec(code.replace("localhost:3000", server.url.removeprefix("http://")), namespace)
    assert namespace["labels"] == labels
    assert namespace["result"].as_numpy("probabilities").shape == (2, len(labels))
    assert decoded(namespace["result"].as_numpy("label"))[1] == "cancel_order"


def test_the_openapi_document_describes_what_v2_answers(http):
    """The nine v2 operations are in /openapi.json, and real answers match their schemas."""
    from jsonschema import Draft202012Validator

    document = http.get("/openapi.json").json()
    operations = {(method.upper(), path) for path, entries in document["paths"].items()
                  for method in entries if path.startswith("/v2")}
    prefixes = ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}")
    assert operations == {("GET", "/v2"), ("GET", "/v2/health/live"),
                          ("GET", "/v2/health/ready")} | {
        (method, prefix + suffix) for prefix in prefixes
        for method, suffix in (("GET", ""), ("GET", "/ready"), ("POST", "/infer"))}
    infer = document["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert set(infer["responses"]["200"]["content"]) == {"application/json",
                                                         "application/octet-stream"}

    def valid(schema_name: str, body: object) -> None:
        schema = {**document, "$ref": f"#/components/schemas/{schema_name}"}
        Draft202012Validator(schema).validate(body)

    valid("ServerMetadataResponse", http.get("/v2").json())
    valid("ModelMetadataResponse", http.get(f"/v2/models/{MODEL}").json())
    valid("ModelReadyResponse", http.get(f"/v2/models/{MODEL}/ready").json())
    example = infer["requestBody"]["content"]["application/json"]["examples"]["example"]["value"]
    valid("InferenceRequest", example)
    answer = http.post(f"/v2/models/{MODEL}/infer", json=example)
    assert answer.status_code == 200, answer.text
    valid("InferenceResponse", answer.json())
    assert answer.json()["id"] == example["id"]
    error = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": []})
    valid("ErrorResponse", error.json())
