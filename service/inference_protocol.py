"""The Open Inference Protocol (KServe's and Triton's "v2" REST protocol): wire types and codec.

Clients written for KServe, Triton or MLServer (``tritonclient[http]`` among them) call refit's
classifier as a model named ``REFIT_INFERENCE_MODEL_NAME`` ("refit" by default) whose versions are
the registry's (``v1``, ``v2``, ...):

- input ``text``: a ``BYTES`` tensor of texts, shape ``[N]`` or ``[N, 1]``;
- outputs ``label`` (``BYTES`` ``[N]``, what ``/predict`` serves: the feedback memory's label where
  it answers), ``confidence`` (``FP32`` ``[N]``), ``probabilities``
  (``FP32`` ``[N, C]``, its columns named by the ``labels`` parameter of that output in the
  model's metadata) and ``prediction_id`` (``BYTES`` ``[N]``: give it to ``/feedback``).

Triton's binary tensor data extension is spoken both ways, because ``tritonclient`` uses it by
default: the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the
tensors' raw bytes, each input sized by its ``binary_data_size`` parameter; an output is sent
that way when its ``binary_data`` parameter (or the request's ``binary_data_output``) is true.
A ``BYTES`` element in binary form is a 4-byte little-endian length and then that many bytes.

Nothing here knows the web framework: ``service/app.py`` hands over the path's names, the body
and two headers, and sends back the :class:`Reply`; its route table takes the endpoints from
:func:`operations`. Every failure is a
:class:`~refit.errors.RefitError`, rendered as ``{"error": ...}`` with the protocol's status: 400
for a request it cannot run (the protocol has no 422), 404 for an unknown model or version, 413
for an oversized body, 503 when the model (or the version asked for) is not loaded.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from refit import __version__
from refit.errors import (
    BadRequestError,
    InvalidInputError,
    NotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from refit.settings import RefitSettings
from refit.text import TEXT_PATTERN
from service.dataplane import Classification, DataPlane
from service.openapi import Operation, Parameter

INPUT_NAME = "text"
OUTPUT_TYPES = {"label": "BYTES", "confidence": "FP32", "probabilities": "FP32",
                "prediction_id": "BYTES"}
"""Every output, in the order a request that names none gets them."""
HEADER_LENGTH = "inference-header-content-length"
JSON_MEDIA_TYPE = "application/json"
BINARY_MEDIA_TYPE = "application/octet-stream"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "refit_onnxruntime"
_VERSION = re.compile(r"v[0-9]{1,9}")
_MAX_DIMS = 8
_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
               dict: "an object", list: "an array"}


# -- wire types ------------------------------------------------------------------------------------
# Requests ignore fields they do not know: the protocol lets clients add their own.


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


# The document states what the code checks (and the code's messages are clearer than a schema's);
# one rule it cannot state: ``data`` (or the binary data) holds as many texts as ``shape`` says.
class RequestInput(_Wire):
    name: StrictStr = Field(description=f"The input's name: `{INPUT_NAME}`.",
                            json_schema_extra={"enum": [INPUT_NAME]})
    shape: list[StrictInt] = Field(
        max_length=_MAX_DIMS, description="`[N]` or `[N, 1]`.",
        json_schema_extra={"minItems": 1, "maxItems": 2, "prefixItems": [
            {"type": "integer", "minimum": 1}, {"type": "integer", "enum": [1]}]},
    )
    datatype: StrictStr = Field(description="`BYTES`.", json_schema_extra={"enum": ["BYTES"]})
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size`: the tensor's bytes after the JSON header."
    )
    data: list[Any] | None = Field(
        None, description="The texts (flat, or nested as `[[text], ...]` for shape `[N, 1]`); "
        "absent when the tensor comes as binary data.",
        json_schema_extra={"items": {"type": "string", "pattern": TEXT_PATTERN}},
    )


class RequestOutput(_Wire):
    name: StrictStr = Field(description="One of `label`, `confidence`, `probabilities`, "
                            "`prediction_id`.", json_schema_extra={"enum": list(OUTPUT_TYPES)})
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data`: send this output as binary data."
    )


class InferenceRequest(_Wire):
    id: StrictStr | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_output`: send every output as binary data by default."
    )
    inputs: list[RequestInput] = Field(max_length=16, description="One input: `text`.",
                                       json_schema_extra={"minItems": 1, "maxItems": 1})
    outputs: list[RequestOutput] | None = Field(
        None, max_length=16, description="The outputs wanted (default: all four).",
    )


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size` when the tensor follows the JSON header."
    )
    data: list[Any] | None = Field(None, description="Row-major, flattened.")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="The version that made every prediction here.")
    id: str | None = Field(None, description="The request's `id`, when it gave one.")
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size.")
    parameters: dict[str, Any] | None = Field(
        None, description="For `probabilities`: `labels`, the label of each column."
    )


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str] = Field(description="Every version in the registry; infer runs only on "
                                "the one loaded (`parameters.serving_version`).")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(
        description="`version`: the version described; `serving_version`: the one loaded."
    )


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLiveResponse(BaseModel):
    live: bool


class ServerReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    version: str
    ready: bool


EXAMPLE_REQUEST = {
    "id": "request-1",
    "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [2],
                "data": ["where is my parcel?", "I was charged twice"]}],
    "outputs": [{"name": "label"}, {"name": "confidence"}, {"name": "prediction_id"}],
}


# -- codec -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What to send back: a body, its media type, and extra headers."""

    body: bytes
    media_type: str = JSON_MEDIA_TYPE
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(body: BaseModel) -> Reply:
    return Reply(body.model_dump_json(exclude_none=True).encode())


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding`` (gzip or deflate), at most ``limit`` bytes."""
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding[:40]!r} is not supported (gzip, deflate or none)",
            field="content-encoding",
        )
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise BadRequestError(f"the body is not valid {encoding} data",
                              field="content-encoding") from None
    if len(plain) > limit:
        raise PayloadTooLargeError(f"the body inflates past the {limit}-byte limit")
    if not inflater.eof:
        raise BadRequestError(f"the {encoding} body is truncated", field="content-encoding")
    return plain


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary data after it (``Inference-Header-Content-Length``)."""
    if header_length is None:
        return body, memoryview(b"")
    value = header_length.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 12):
        raise BadRequestError(
            f"Inference-Header-Content-Length must be a byte count, got {value[:40]!r}",
            field="Inference-Header-Content-Length",
        )
    length = int(value)
    if not 0 < length <= len(body):
        raise BadRequestError(
            f"Inference-Header-Content-Length is {length}, but the body has {len(body)} bytes",
            field="Inference-Header-Content-Length",
        )
    return body[:length], memoryview(body)[length:]


def parse_request(header: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise BadRequestError(
                f"the JSON header is not valid JSON: {first['msg']}", field="body"
            ) from None
        problems = [{"field": field_path(e["loc"]), "problem": e["msg"]} for e in errors[:20]]
        raise BadRequestError(
            f"{problems[0]['field']}: {problems[0]['problem']}", field=problems[0]["field"],
            errors=problems,
        ) from None


def field_path(location: tuple[Any, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def binary_size(parameters: dict[str, Any] | None, field: str) -> int | None:
    value = (parameters or {}).get("binary_data_size")
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise BadRequestError(f"binary_data_size must be a byte count, got {json_type(value)}",
                              field=field)
    return value


def flag(parameters: dict[str, Any] | None, name: str, field: str, default: bool) -> bool:
    value = (parameters or {}).get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequestError(f"{name} must be true or false, got {json_type(value)}",
                              field=field)
    return value


def text_count(shape: list[int], limit: int) -> int:
    """N, from a shape ``[N]`` or ``[N, 1]`` of at most ``limit`` texts."""
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise BadRequestError(f"shape must be [N] or [N, 1], got {shape}",
                              field="inputs[0].shape")
    count = shape[0]
    if count == 0:
        raise BadRequestError("shape [0]: no texts to classify", field="inputs[0].shape")
    if count > limit:
        raise BadRequestError(f"{count} texts in one request; at most {limit} are allowed",
                              field="inputs[0].shape")
    return count


def json_texts(data: list[Any], count: int) -> list[str]:
    """Texts from a JSON tensor: flat, or one level nested (``[[text], ...]`` for ``[N, 1]``)."""
    if len(data) != count:
        raise BadRequestError(f"the shape says {count} texts, but data holds {len(data)}",
                              field="inputs[0].data")
    texts: list[str] = []
    for index, item in enumerate(data):
        if type(item) is list and len(item) == 1:
            item = item[0]
        if type(item) is not str:
            raise BadRequestError(
                f"a BYTES element in JSON is a string, got {json_type(item)}",
                field=f"inputs[0].data[{index}]",
            )
        texts.append(item)
    return texts


def binary_texts(buffer: memoryview, count: int) -> list[str]:
    """Texts from a binary BYTES tensor: each a 4-byte little-endian length, then UTF-8."""
    texts: list[str] = []
    offset, end = 0, len(buffer)
    while offset < end:
        index = len(texts)
        if index == count:
            raise BadRequestError(
                f"the binary data holds more than the {count} elements the shape declares",
                field="inputs[0].parameters.binary_data_size",
            )
        if end - offset < 4:
            raise BadRequestError(
                f"the binary data ends inside element {index}'s 4-byte length",
                field=f"inputs[0].data[{index}]",
            )
        length = int.from_bytes(buffer[offset:offset + 4], "little")
        offset += 4
        if length > end - offset:
            raise BadRequestError(
                f"element {index} declares {length} bytes, but only {end - offset} remain",
                field=f"inputs[0].data[{index}]",
            )
        try:
            texts.append(str(buffer[offset:offset + length], "utf-8"))
        except UnicodeDecodeError:
            raise BadRequestError(f"element {index} is not UTF-8 text",
                                  field=f"inputs[0].data[{index}]") from None
        offset += length
    if len(texts) != count:
        raise BadRequestError(
            f"the shape says {count} texts, but the binary data holds {len(texts)}",
            field="inputs[0].parameters.binary_data_size",
        )
    return texts


def wanted_outputs(request: InferenceRequest) -> list[tuple[str, bool]]:
    """(name, as binary) for each output asked for, in the request's order."""
    default = flag(request.parameters, "binary_data_output", "parameters.binary_data_output",
                   False)
    if not request.outputs:
        return [(name, default) for name in OUTPUT_TYPES]
    wanted: list[tuple[str, bool]] = []
    for index, output in enumerate(request.outputs):
        where = f"outputs[{index}]"
        if output.name not in OUTPUT_TYPES:
            raise BadRequestError(
                f"unknown output {output.name[:64]!r}; the outputs are "
                + ", ".join(OUTPUT_TYPES), field=f"{where}.name",
            )
        if any(name == output.name for name, _ in wanted):
            raise BadRequestError(f"output {output.name!r} is asked for twice",
                                  field=f"{where}.name")
        if (output.parameters or {}).get("classification"):
            raise BadRequestError(
                "the classification extension is not supported: ask for `label` and "
                "`probabilities`", field=f"{where}.parameters.classification",
            )
        wanted.append((output.name, flag(output.parameters, "binary_data",
                                         f"{where}.parameters.binary_data", default)))
    return wanted


def tensor_json(name: str, result: Classification) -> Any:
    if name == "label":
        return result.served
    if name == "prediction_id":
        return result.prediction_ids
    if name == "confidence":
        return np.ascontiguousarray(result.confidence, dtype=np.float32)
    return np.ascontiguousarray(result.probabilities, dtype=np.float32).ravel()


def tensor_bytes(name: str, result: Classification) -> bytes:
    if name in ("label", "prediction_id"):
        parts: list[bytes] = []
        for text in result.served if name == "label" else result.prediction_ids:
            encoded = text.encode()
            parts.append(len(encoded).to_bytes(4, "little"))
            parts.append(encoded)
        return b"".join(parts)
    values = result.confidence if name == "confidence" else result.probabilities
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


def encode_response(
    model_name: str, result: Classification, request_id: str | None,
    outputs: list[tuple[str, bool]],
) -> Reply:
    count, classes = len(result.prediction_ids), len(result.labels)
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in outputs:
        tensor: dict[str, Any] = {
            "name": name, "datatype": OUTPUT_TYPES[name],
            "shape": [count, classes] if name == "probabilities" else [count],
        }
        if binary:
            raw = tensor_bytes(name, result)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = tensor_json(name, result)
        tensors.append(tensor)
    header: dict[str, Any] = {"model_name": model_name, "model_version": result.model_version}
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = tensors
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Reply(head)
    return Reply(head + b"".join(chunks), BINARY_MEDIA_TYPE, {HEADER_LENGTH: str(len(head))})


class InferenceProtocol:
    """The protocol's operations over the data plane (the same one ``/predict`` uses)."""

    def __init__(self, plane: DataPlane, settings: RefitSettings) -> None:
        self.plane = plane
        self.name = settings.inference_model_name
        self.max_texts = settings.max_texts_per_request
        self.max_body_bytes = settings.max_body_bytes

    # -- server ----------------------------------------------------------------------------------

    def server_metadata(self) -> Reply:
        return json_reply(ServerMetadataResponse(name="refit", version=__version__,
                                                 extensions=EXTENSIONS))

    def live(self) -> Reply:
        return json_reply(ServerLiveResponse(live=True))

    def ready(self) -> Reply:
        if not self.plane.ready:  # the protocol answers "not ready" with a 4xx
            raise BadRequestError("not ready: no model is loaded yet, or the store is "
                                  "unreachable")
        return json_reply(ServerReadyResponse(ready=True))

    # -- model -----------------------------------------------------------------------------------

    def check_model(self, name: str, version: str | None) -> None:
        if name != self.name:
            raise NotFoundError(f"unknown model {name[:64]!r}; this server serves {self.name!r}",
                                field="model_name")
        if version is not None and not _VERSION.fullmatch(version):
            raise NotFoundError(
                f"unknown version {version[:64]!r} of model {self.name!r} (versions are v1, "
                "v2, ...)", field="model_version",
            )

    async def model_metadata(self, name: str, version: str | None) -> Reply:
        self.check_model(name, version)
        return await asyncio.to_thread(self._metadata, version)

    def _metadata(self, version: str | None) -> Reply:
        overview = self.plane.models()
        serving = overview.serving.version
        model = self.plane.holder.model
        if version is None or (model is not None and version == model.version):
            if model is None:
                raise NotReadyError("no model is loaded yet")
            described, labels = model.version, list(model.labels)
        else:
            described, labels = version, self.plane.registry.get(version).labels
        outputs = [
            TensorMetadata(name=name, datatype=datatype,
                           shape=[-1, len(labels)] if name == "probabilities" else [-1],
                           parameters={"labels": labels} if name == "probabilities" else None)
            for name, datatype in OUTPUT_TYPES.items()
        ]
        return json_reply(ModelMetadataResponse(
            name=self.name, versions=[v.name for v in overview.versions], platform=PLATFORM,
            inputs=[TensorMetadata(name=INPUT_NAME, datatype="BYTES", shape=[-1])],
            outputs=outputs, parameters={"version": described, "serving_version": serving},
        ))

    async def model_ready(self, name: str, version: str | None) -> Reply:
        self.check_model(name, version)
        model = self.plane.holder.model
        if model is None:
            raise BadRequestError(f"model {self.name!r} is not ready: no model is loaded yet")
        if version is not None and version != model.version:
            await asyncio.to_thread(self.plane.registry.get, version)  # 404 when unknown
            raise BadRequestError(
                f"version {version!r} of model {self.name!r} is not ready: it is not loaded "
                f"(this worker serves {model.version!r})", field="model_version",
            )
        return json_reply(ModelReadyResponse(name=self.name, version=model.version, ready=True))

    # -- inference -------------------------------------------------------------------------------

    async def infer(
        self, name: str, version: str | None, body: bytes, header_length: str | None,
        content_encoding: str | None = None,
    ) -> Reply:
        self.check_model(name, version)
        body = decompress(body, content_encoding, self.max_body_bytes)
        header, binary = split_body(body, header_length)
        request = parse_request(header)
        texts = self.texts(request, binary, header_length is not None)
        outputs = wanted_outputs(request)
        try:
            result = await self.plane.classify(texts, version, field="inputs[0].data")
        except InvalidInputError as exc:  # the protocol's status for a bad input is 400
            raise BadRequestError(exc.message, field=exc.field, **exc.details) from None
        return encode_response(self.name, result, request.id, outputs)

    def texts(self, request: InferenceRequest, binary: memoryview, framed: bool) -> list[str]:
        """The texts of the request's one input, from JSON data or binary data."""
        if len(request.inputs) != 1:
            raise BadRequestError(
                f"{len(request.inputs)} inputs; this model takes one, {INPUT_NAME!r}",
                field="inputs",
            )
        tensor = request.inputs[0]
        if tensor.name != INPUT_NAME:
            raise BadRequestError(
                f"unknown input {tensor.name[:64]!r}; this model takes one, {INPUT_NAME!r}",
                field="inputs[0].name",
            )
        if tensor.datatype != "BYTES":
            raise BadRequestError(
                f"input {INPUT_NAME!r} is BYTES (texts), got {tensor.datatype[:32]!r}",
                field="inputs[0].datatype",
            )
        count = text_count(tensor.shape, self.max_texts)
        size = binary_size(tensor.parameters, "inputs[0].parameters.binary_data_size")
        if size is None:
            if len(binary):
                raise BadRequestError(
                    f"{len(binary)} bytes follow the JSON header, but no input has a "
                    "binary_data_size", field="Inference-Header-Content-Length",
                )
            if tensor.data is None:
                raise BadRequestError(
                    "no data: give `data`, or binary data with `parameters.binary_data_size`",
                    field="inputs[0].data",
                )
            return json_texts(tensor.data, count)
        if tensor.data is not None:
            raise BadRequestError("give `data` or binary data (binary_data_size), not both",
                                  field="inputs[0].data")
        if not framed:
            raise BadRequestError(
                "binary_data_size needs the Inference-Header-Content-Length header",
                field="Inference-Header-Content-Length",
            )
        if size != len(binary):
            raise BadRequestError(
                f"binary_data_size is {size}, but {len(binary)} bytes follow the JSON header",
                field="inputs[0].parameters.binary_data_size",
            )
        return binary_texts(binary, count)


# -- the endpoints, for the route table and the OpenAPI document -----------------------------------


def operations(h: Callable[[str], Callable[..., Any] | None]) -> list[Operation]:
    """The protocol's endpoints, for the route table (``service.app.operations``); ``h`` gives
    the app's handler of a name."""
    model = Parameter("model_name", "path", {"type": "string"},
                      "The model's name (REFIT_INFERENCE_MODEL_NAME).", example="refit")
    version = Parameter("model_version", "path", {"type": "string", "pattern": "^v[0-9]{1,9}$"},
                        "A registry version; only the one loaded answers.", example="v1")
    header_length = Parameter(
        "Inference-Header-Content-Length", "header", {"type": "string", "pattern": "^[0-9]+$"},
        "With binary tensor data: the length of the JSON header that starts the body.",
    )
    unknown = {404: "No such model or version."}
    not_ready = {400: "Not ready (the protocol's answer is a 4xx).", **unknown}
    infer_errors = {400: "The request cannot run: malformed JSON or binary data, a wrong name, "
                    "datatype or shape, or a bad text; `field` names the culprit.",
                    **unknown, 503: "No model is loaded, or not the version asked for."}
    operations = [
        Operation("GET", "/v2", "v2_server_metadata", "Open Inference Protocol: server metadata",
                  h("v2_server"), response=ServerMetadataResponse, tag="inference-v2"),
        Operation("GET", "/v2/health/live", "v2_live", "Open Inference Protocol: liveness",
                  h("v2_live"), response=ServerLiveResponse, tag="inference-v2"),
        Operation("GET", "/v2/health/ready", "v2_ready", "Open Inference Protocol: readiness",
                  h("v2_ready"), response=ServerReadyResponse, tag="inference-v2",
                  errors={400: "Not ready (the protocol's answer is a 4xx)."}),
    ]
    for prefix, parameters, suffix in (
        ("/v2/models/{model_name}", (model,), ""),
        ("/v2/models/{model_name}/versions/{model_version}", (model, version), "_version"),
    ):
        what = " of a version" if suffix else ""
        operations += [
            Operation("GET", prefix, f"v2_model_metadata{suffix}",
                      f"Open Inference Protocol: model metadata{what} (inputs, outputs, labels)",
                      h("v2_model"), response=ModelMetadataResponse, tag="inference-v2",
                      parameters=parameters,
                      errors={**unknown, 503: "No model is loaded yet."}),
            Operation("GET", prefix + "/ready", f"v2_model_ready{suffix}",
                      f"Open Inference Protocol: model readiness{what}", h("v2_model_ready"),
                      response=ModelReadyResponse, tag="inference-v2", parameters=parameters,
                      errors=not_ready),
            Operation("POST", prefix + "/infer", f"v2_infer{suffix}",
                      f"Open Inference Protocol: classify texts{what} (JSON or binary tensors)",
                      h("v2_infer"), InferenceRequest, InferenceResponse,
                      tag="inference-v2", parameters=(*parameters, header_length),
                      binary_media_type=BINARY_MEDIA_TYPE, errors=infer_errors,
                      example=EXAMPLE_REQUEST),
        ]
    return operations


def state_limits(document: dict[str, Any], settings: RefitSettings) -> None:
    """State in ``document`` the limits and the model name that ``settings`` set."""
    properties = document["components"]["schemas"]["RequestInput"]["properties"]
    properties["shape"]["prefixItems"][0]["maximum"] = settings.max_texts_per_request
    properties["data"]["items"]["maxLength"] = settings.max_text_chars
    for entries in document["paths"].values():
        for entry in entries.values():
            for parameter in entry.get("parameters", []):
                if parameter["name"] == "model_name":
                    parameter["schema"] = {**parameter["schema"],
                                           "enum": [settings.inference_model_name]}
                    parameter["example"] = settings.inference_model_name
