"""The route table's description, and the OpenAPI 3.1 document generated from it.

``service/app.py`` declares every endpoint once, as an :class:`Operation` (path, method, handler,
wire types, errors, whether it needs the admin token); it builds its routes from that list and
:func:`openapi_document` builds ``/openapi.json`` from the same list, so the two cannot disagree.
Schemas come from the pydantic wire types (JSON Schema 2020-12, which OpenAPI 3.1 uses as is).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.schemas import ErrorResponse

REF_TEMPLATE = "#/components/schemas/{model}"
SECURITY_SCHEME = "adminToken"
FEEDBACK_SCHEME = "feedbackKey"

# What each error status means on this API (the body is always an ErrorResponse).
ERROR_MEANINGS: dict[int, str] = {
    400: "The body is not valid JSON, or the client disconnected while sending it.",
    401: "The role's key is missing or wrong (`Authorization: Bearer <REFIT_ADMIN_TOKEN>`, or "
    "`<REFIT_FEEDBACK_KEY>` for feedback).",
    403: "The role's key is not set on the service, and the client is not on its machine.",
    404: "Not found.",
    405: "Method not allowed on this path (the `Allow` header lists the allowed ones).",
    409: "Conflicts with the current state.",
    413: "The body exceeds REFIT_MAX_BODY_BYTES.",
    415: "The body is not `application/json`.",
    422: "The body does not match the schema, or breaks a limit; `field` names the culprit.",
    429: "Rate limit for this client exceeded; `Retry-After` says when to retry.",
    503: "No model is loaded yet, or the database is unreachable (`Retry-After`).",
}
BODY_ERRORS = (400, 413, 415, 422)
BINARY = {"type": "string", "format": "binary"}


@dataclass(frozen=True)
class Parameter:
    """A path, query or header parameter."""

    name: str
    location: Literal["path", "query", "header"]
    schema: dict[str, Any]
    description: str = ""
    required: bool = False
    example: Any = None


@dataclass(frozen=True)
class Operation:
    """One method on one path: what the app routes and what the document describes."""

    method: str
    path: str
    name: str
    summary: str
    handler: Callable[..., Any] | None
    """The app's handler; ``None`` for endpoints BentoML itself serves (the probes)."""
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    response_media_type: str = "application/json"
    status: int = 200
    errors: dict[int, str] = field(default_factory=dict)
    """Error statuses beyond the request-body ones, with what they mean here."""
    admin: bool = False
    feedback_role: bool = False
    """Needs the feedback key (or the admin token)."""
    rate_limited: bool = False
    example: dict[str, Any] | None = None
    """A request body the running service accepts (tests send every one)."""
    parameters: tuple[Parameter, ...] = ()
    query: type[BaseModel] | None = None
    """Query parameters, as a wire type: one parameter per field."""
    tag: str = "service"
    binary_media_type: str | None = None
    """Also takes and answers bodies of this media type (binary, beside the JSON ones)."""


def _response(description: str, media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": schema}}}


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def query_parameters(model: type[BaseModel]) -> list[Parameter]:
    """One query parameter per field of ``model``, with the field's JSON schema."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    required = set(schema.get("required", []))
    parameters = []
    for name, field_schema in schema["properties"].items():
        field_schema = dict(field_schema)
        description = field_schema.pop("description", "")
        field_schema.pop("title", None)
        parameters.append(
            Parameter(name, "query", field_schema, description, required=name in required)
        )
    return parameters


def openapi_document(
    operations: list[Operation], title: str, version: str, description: str
) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing ``operations``."""
    requests = {op.request for op in operations if op.request is not None}
    responses = {op.response for op in operations if op.response is not None} | {ErrorResponse}
    inputs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (model, "validation") for model in sorted(requests, key=lambda m: m.__name__)
    ]
    outputs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (model, "serialization") for model in sorted(responses, key=lambda m: m.__name__)
    ]
    refs, definitions = models_json_schema(inputs + outputs, ref_template=REF_TEMPLATE)
    schemas: dict[str, Any] = definitions.get("$defs", {})

    def ref_of(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return dict(refs[(model, mode)])  # type: ignore[index]

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {
            "operationId": op.name,
            "summary": op.summary,
            "tags": [op.tag],
        }
        parameters = list(op.parameters)
        if op.query is not None:
            parameters += query_parameters(op.query)
        if parameters:
            entry["parameters"] = [
                {
                    "name": p.name,
                    "in": p.location,
                    "required": p.required or p.location == "path",
                    "schema": p.schema, **({"description": p.description} if p.description else {}),
                    **({"example": p.example} if p.example is not None else {}),
                }
                for p in parameters
            ]
        if op.request is not None:
            media: dict[str, Any] = {"schema": ref_of(op.request, "validation")}
            if op.example is not None:
                media["examples"] = {"example": {"value": op.example}}
            entry["requestBody"] = {"required": True, "content": {"application/json": media}}
            if op.binary_media_type is not None:
                entry["requestBody"]["content"][op.binary_media_type] = {"schema": BINARY}
        ok_description = HTTPStatus(op.status).phrase
        ok: dict[str, Any]
        if op.status == HTTPStatus.NO_CONTENT:
            ok = {"description": ok_description}
        elif op.response is not None:
            ok = _response(ok_description, op.response_media_type,
                           ref_of(op.response, "serialization"))
        else:
            ok = _response(ok_description, op.response_media_type, {"type": "string"})
        if op.binary_media_type is not None:
            ok["content"][op.binary_media_type] = {"schema": BINARY}
        responses_doc: dict[str, Any] = {str(op.status): ok}
        error_statuses = dict(op.errors)
        if op.request is not None:
            for status in BODY_ERRORS:
                error_statuses.setdefault(status, ERROR_MEANINGS[status])
        if op.admin or op.feedback_role:
            error_statuses.setdefault(401, ERROR_MEANINGS[401])
            error_statuses.setdefault(403, ERROR_MEANINGS[403])
        if op.rate_limited:
            error_statuses.setdefault(429, ERROR_MEANINGS[429])
        for status in sorted(error_statuses):
            responses_doc[str(status)] = _response(
                error_statuses[status], "application/json", ref_of(ErrorResponse, "serialization")
            )
        entry["responses"] = responses_doc
        if op.admin:
            entry["security"] = [{SECURITY_SCHEME: []}]
        elif op.feedback_role:
            entry["security"] = [{FEEDBACK_SCHEME: []}, {SECURITY_SCHEME: []}]
        paths.setdefault(op.path, {})[op.method.lower()] = entry

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "REFIT_ADMIN_TOKEN. When it is unset, admin endpoints answer "
                    "only clients on the service's own machine.",
                },
                FEEDBACK_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "REFIT_FEEDBACK_KEY (the admin token works too). When it is "
                    "unset, feedback is taken only from clients on the service's own machine.",
                },
            },
        },
    }
