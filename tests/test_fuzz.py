"""Property-based fuzzing of the JSON bodies, headers and paths, against a real server.

Schemathesis (tests/test_openapi_fuzz.py) explores what the OpenAPI document describes; this
reaches what a schema cannot: bodies of any JSON shape, any bytes, wrong or missing content types,
huge numbers, deep nesting, odd headers and paths. The property is the same everywhere: the
service never answers 5xx (bar a documented 503), and every error is a JSON object with an
``error`` message.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import ServiceProcess

pytestmark = pytest.mark.server

ENDPOINTS = [("POST", "/predict"), ("POST", "/feedback"), ("POST", "/retrain"),
             ("POST", "/models/promote")]
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = (
    st.none() | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
# Values that land where the endpoints look, so that fuzzing goes past the first check.
field_names = st.sampled_from(
    ["texts", "items", "text", "label", "prediction_id", "version", "min_feedback", "seed",
     "force", "search", "unfreeze_layers"]
)
shaped = st.dictionaries(field_names, json_values | st.lists(
    st.dictionaries(field_names, json_values, max_size=3), max_size=3), max_size=4)


# The Open Inference Protocol's infer endpoint: a JSON header of any shape (with the names it
# reads), any bytes after it, any Inference-Header-Content-Length (often the true one), any
# Content-Encoding.
V2_INFER = "/v2/models/refit/infer"
v2_names = st.sampled_from(
    ["inputs", "outputs", "name", "shape", "datatype", "data", "parameters", "id",
     "binary_data_size", "binary_data_output", "binary_data", "classification"]
)
v2_values = json_values | st.sampled_from(["text", "BYTES", "label", "probabilities"])
v2_headers = st.dictionaries(v2_names, v2_values | st.lists(
    st.dictionaries(v2_names, v2_values | st.dictionaries(v2_names, v2_values, max_size=2),
                    max_size=5), max_size=2), max_size=4)
header_lengths = (
    st.none() | st.just("exact") | st.integers(min_value=-5, max_value=700).map(str)
    | st.text(alphabet=st.characters(codec="ascii", min_codepoint=32, max_codepoint=126),
              max_size=8)
)


@pytest.fixture(scope="module")
def server(trained_registry, tmp_path_factory):
    service = ServiceProcess(registry=trained_registry.root,
                             data_dir=tmp_path_factory.mktemp("fuzz"), workers=1).start()
    yield service
    service.stop()


def check(answer: httpx.Response) -> None:
    assert answer.status_code < 500 or answer.status_code == 503, (
        answer.status_code, answer.text[:500])
    if answer.status_code >= 400:
        body = answer.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str), answer.text[:500]


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), body=json_values | shaped)
def test_any_json_body(server, endpoint, body):
    method, path = endpoint
    with httpx.Client(base_url=server.url, timeout=60) as client:
        check(client.request(method, path, content=json.dumps(body),
                             headers={"content-type": "application/json"}))


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=300),
       content_type=st.sampled_from(["application/json", "application/json; charset=latin-1",
                                     "text/plain", "", "application/JSON", "multipart/form-data"]))
def test_any_bytes_and_content_type(server, endpoint, raw, content_type):
    method, path = endpoint
    headers = {"content-type": content_type} if content_type else {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        check(client.request(method, path, content=raw, headers=headers))


@FUZZ
@given(path=st.text(alphabet=st.characters(codec="ascii", exclude_characters="?#"), max_size=40),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
def test_any_path_and_method(server, path, method):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        try:
            answer = client.request(method, "/" + path.lstrip("/"))
        except httpx.InvalidURL:
            return
        assert answer.status_code < 500, (method, path, answer.status_code, answer.text[:300])


@FUZZ
@given(auth=st.text(max_size=80), extra=st.dictionaries(
    st.sampled_from(["content-length", "transfer-encoding", "accept", "x-forwarded-for",
                     "authorization"]), st.text(alphabet=st.characters(codec="ascii",
                     min_codepoint=32, max_codepoint=126), max_size=30), max_size=2))
def test_odd_headers(server, auth, extra):
    headers = {"content-type": "application/json", **extra}
    with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
        headers["authorization"] = auth.encode("latin-1").decode("ascii")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        try:
            answer = client.post("/predict", content=b'{"texts": ["hi"]}', headers=headers)
        except (httpx.LocalProtocolError, httpx.RemoteProtocolError, httpx.ReadTimeout):
            return  # the client refused to send it, or the server closed a broken request
        if answer.status_code == 400 and answer.text == "Invalid HTTP request received.":
            return  # uvicorn refused a malformed HTTP message (e.g. content-length: x) before
            # any code of ours ran; that is a 4xx and costs the worker nothing
        check(answer)


@FUZZ
@given(header=json_values | v2_headers, tail=st.binary(max_size=200), length=header_lengths,
       encoding=st.sampled_from([None, "identity", "gzip", "deflate", "br"]))
def test_v2_infer_any_framing(server, header, tail, length, encoding):
    head = json.dumps(header).encode()
    headers = {}
    if length is not None:
        headers["inference-header-content-length"] = str(len(head)) if length == "exact" else length
    if encoding is not None:
        headers["content-encoding"] = encoding
    with httpx.Client(base_url=server.url, timeout=60) as client:
        try:
            answer = client.post(V2_INFER, content=head + tail, headers=headers)
        except httpx.LocalProtocolError:
            return  # the client refused to send it (e.g. a header value of blanks)
        check(answer)
