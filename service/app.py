"""The HTTP surface: a BentoML service. The only module that imports bentoml or starlette.

BentoML runs the worker processes, their lifecycle hooks and the ``/livez`` and ``/readyz``
probes. The API itself is a small Starlette app, so that every response, error included, is ours:
JSON bodies naming the field and the problem, the right 4xx status, a 413 for oversized bodies, a
JSON 404 for any unknown path, and no framework layers on the hot path beyond what a request needs
(see BENCHMARKS.md for what that buys). Each handler parses the wire type, converts it to domain
types, calls the data plane and renders the result; :class:`~refit.errors.RefitError` maps to its
status in one place.

Every endpoint is declared once, in :func:`operations`: the app's routes and ``/openapi.json``
are both built from that list. ``GET /docs`` serves Swagger UI from the static files BentoML
ships, so it works offline.

Nothing is built at import time but the BentoML service: each worker loads the settings and
builds its data plane (:func:`service.composition.build_data_plane`) and its app
(:func:`create_app`) in its start-up hook, and the mounted :class:`LateApp` forwards to that app.

Start it with ``bentoml serve .`` (or ``make serve``) from the repository root.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import bentoml
import orjson
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from monitoring.metrics import metrics, render_latest
from refit import __version__
from refit.errors import (
    BadRequestError,
    InvalidInputError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    RefitError,
    UnsupportedMediaTypeError,
)
from refit.logs import configure_logging
from refit.settings import RefitSettings, load_settings
from service import inference_protocol
from service.access import RateLimiter, RoleGuard, admin_guard, feedback_guard
from service.composition import build_data_plane, freeze_heap
from service.dataplane import DataPlane
from service.inference_protocol import InferenceProtocol
from service.jobs import JOB_ID
from service.openapi import Operation, Parameter, openapi_document
from service.schemas import (
    MAX_ID,
    DriftResponse,
    ErrorResponse,
    EstimateResponse,
    FeedbackEntryInfo,
    FeedbackList,
    FeedbackListQuery,
    FeedbackRequest,
    FeedbackResponse,
    IndexResponse,
    LabelsResponse,
    MemoryResponse,
    ModelsResponse,
    PredictRequest,
    PredictResponse,
    PromoteRequest,
    PromoteResponse,
    RelabelRequest,
    RetrainJob,
    RetrainJobList,
    RetrainRequest,
    ReviewQuery,
    ReviewResponse,
)
from service.security import SecurityHeadersMiddleware, page_policy

log = logging.getLogger("refit.http")

# Workers share one listening socket. libuv (uvloop) otherwise accepts every pending connection
# in one go, so a burst of new keep-alive connections lands on whichever worker woke first; with
# this set it yields between accepts and the workers share them.
os.environ.setdefault("UV_TCP_SINGLE_ACCEPT", "1")

ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# Swagger UI as BentoML ships it (served by us under /docs/, so no CDN is needed).
SWAGGER_DIR = Path(bentoml.__file__).parent / "_internal" / "server" / "static_content"
SWAGGER_ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui-standalone-preset.js": "text/javascript; charset=utf-8",
    "favicon-light-32x32.png": "image/png",
}
DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8" />
  <title>refit API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css" />
  <link rel="icon" type="image/png" href="/docs/favicon-light-32x32.png" />
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "BaseLayout",
    });
  </script>
</body>
</html>
"""
# Swagger UI: its own scripts and styles from this origin, its one inline script by hash, and
# calls to this origin only (the "Try it out" button).
DOCS_POLICY = page_policy(DOCS_PAGE.encode())

API_DESCRIPTION = (
    "A text classifier that learns in production: predict, give feedback, retrain, promote. "
    "Every error is JSON: `{\"error\": ..., \"field\": ...}`."
)

Model = TypeVar("Model", bound=BaseModel)
Handler = Callable[[Request], Awaitable[Response]]


def json_response(body: BaseModel, status: int = 200) -> Response:
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


def error_response(exc: RefitError) -> Response:
    body = ErrorResponse.model_validate(exc.to_dict())
    response = Response(
        body.model_dump_json(exclude_none=True), status_code=int(exc.status),
        media_type="application/json",
    )
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        response.headers["retry-after"] = str(retry_after)
    return response


def _field_path(location: tuple[Any, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def _problem(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    return str(error["msg"]).removeprefix("Value error, ")


async def read_json(request: Request, model: type[Model], limit: int) -> Model:
    """Parse the body as ``model``: 415 for another media type, 413 when larger than ``limit``
    bytes, 400 for malformed JSON, 422 naming the field for anything the schema rejects."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"expected content-type application/json, got {media_type or 'none'!r}",
            field="content-type",
        )
    body = await read_body(request, limit)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise BadRequestError(
                f"body is not valid JSON: {errors[0]['msg']}", field="body"
            ) from None
        raise invalid_input(errors) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, of any media type: 413 when larger than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"body exceeds the {limit}-byte limit")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequestError("client disconnected while sending the body") from None
    return b"".join(chunks)


def read_query(request: Request, model: type[Model]) -> Model:
    """Parse the query string as ``model``: 422 naming the parameter for anything it rejects."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise invalid_input(
            exc.errors(include_url=False, include_input=False, include_context=False)
        ) from None


def path_id(request: Request, name: str) -> int:
    """A positive integer path parameter; 422 naming it otherwise."""
    value = request.path_params[name]
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_ID:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}", field=name)
    return int(value)


def invalid_input(errors: list[Any]) -> InvalidInputError:
    """A 422 naming the first field at fault and listing every problem (up to 20)."""
    problems = [
        {"field": _field_path(tuple(e["loc"])), "problem": _problem(e)} for e in errors[:20]
    ]
    first = problems[0]
    return InvalidInputError(
        f"{first['field']}: {first['problem']}", field=first["field"], errors=problems
    )


class ConnectionRotation:
    """Close a keep-alive connection after ``limit`` requests (see ``keepalive_requests``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._served: dict[tuple[str, int], int] = {}

    def count(self, request: Request, response: Response) -> None:
        client = request.client
        if not self.limit or client is None:
            return
        key = (client.host, client.port)
        served = self._served.get(key, 0) + 1
        if served >= self.limit:
            self._served.pop(key, None)
            response.headers["connection"] = "close"
        else:
            if len(self._served) > 10_000:  # clients that left without a last request
                self._served.clear()
            self._served[key] = served


class Api:
    """The handlers: parse the wire type, call the data plane, render its answer."""

    def __init__(self, plane: DataPlane, settings: RefitSettings) -> None:
        self.plane = plane
        self.settings = settings
        self.openapi: bytes = b"{}"  # set by create_app once the route table exists
        self.endpoints: dict[str, str] = {}
        self.feedback_limit = RateLimiter(settings.feedback_rate_per_minute, 60, "feedback items")
        self.retrain_limit = RateLimiter(settings.retrain_rate_per_hour, 3600, "retrain requests")
        self.v2 = InferenceProtocol(plane, settings)

    async def body(self, request: Request, model: type[Model]) -> Model:
        return await read_json(request, model, self.settings.max_body_bytes)

    async def predict(self, request: Request) -> Response:
        with self.plane.batcher.arriving():  # a batch about to start may wait for this request
            body = await self.body(request, PredictRequest)
            batch = await self.plane.predict(body.texts)
        return json_response(PredictResponse.from_batch(batch))

    async def feedback(self, request: Request) -> Response:
        body = await self.body(request, FeedbackRequest)
        self.feedback_limit.take(client_host(request), len(body.items))
        receipt = await self.plane.feedback([item.to_submission() for item in body.items])
        return json_response(FeedbackResponse.from_receipt(receipt))

    async def list_feedback(self, request: Request) -> Response:
        query = read_query(request, FeedbackListQuery)
        page = await self.plane.list_feedback(query.to_query())
        return json_response(FeedbackList.from_page(page))

    async def relabel_feedback(self, request: Request) -> Response:
        feedback_id = path_id(request, "feedback_id")
        body = await self.body(request, RelabelRequest)
        entry = await self.plane.relabel_feedback(feedback_id, body.label)
        return json_response(FeedbackEntryInfo.from_entry(entry))

    async def delete_feedback(self, request: Request) -> Response:
        await self.plane.delete_feedback(path_id(request, "feedback_id"))
        return Response(status_code=204)

    async def review(self, request: Request) -> Response:
        query = read_query(request, ReviewQuery)
        return json_response(
            ReviewResponse.from_queue(await self.plane.review(query.strategy, query.limit))
        )

    async def labels(self, request: Request) -> Response:
        return json_response(LabelsResponse.from_overview(await self.plane.labels()))

    async def memory(self, request: Request) -> Response:
        return json_response(MemoryResponse.from_state(self.plane.memory_state(), os.getpid()))

    async def models(self, request: Request) -> Response:
        return json_response(ModelsResponse.from_overview(self.plane.models()))

    async def promote(self, request: Request) -> Response:
        body = await self.body(request, PromoteRequest)
        pointer = await self.plane.promote(body.version)
        return json_response(
            PromoteResponse.from_pointer(pointer, self.settings.swap_poll_interval_s)
        )

    async def retrain(self, request: Request) -> Response:
        body = await self.body(request, RetrainRequest)
        self.retrain_limit.take(client_host(request))
        job = await self.plane.retrain(body.to_options(self.settings.retrain_min_feedback))
        response = json_response(RetrainJob.from_job(job), 202)
        response.headers["location"] = f"/retrain/{job.job_id}"
        return response

    async def retrain_status(self, request: Request) -> Response:
        job = await self.plane.retrain_status(request.path_params["job_id"])
        return json_response(RetrainJob.from_job(job))

    async def retrain_jobs(self, request: Request) -> Response:
        jobs = await self.plane.retrain_jobs()
        return json_response(RetrainJobList(jobs=[RetrainJob.from_job(job) for job in jobs]))

    async def drift(self, request: Request) -> Response:
        return json_response(DriftResponse.model_validate(await self.plane.drift()))

    async def estimate(self, request: Request) -> Response:
        return json_response(EstimateResponse.from_overview(await self.plane.estimate()))

    async def drift_report(self, request: Request) -> Response:
        body, policy = await self.plane.drift_report()
        return Response(body, media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": policy})

    async def metrics(self, request: Request) -> Response:
        return Response(render_latest(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def index(self, request: Request) -> Response:
        return json_response(
            IndexResponse(
                service="refit", docs="/docs", openapi="/openapi.json", endpoints=self.endpoints
            )
        )

    async def openapi_json(self, request: Request) -> Response:
        return Response(self.openapi, media_type="application/json")

    # -- the Open Inference Protocol (v2): service/inference_protocol.py --------------------------

    async def v2_server(self, request: Request) -> Response:
        return protocol_reply(self.v2.server_metadata())

    async def v2_live(self, request: Request) -> Response:
        return protocol_reply(self.v2.live())

    async def v2_ready(self, request: Request) -> Response:
        return protocol_reply(self.v2.ready())

    async def v2_model(self, request: Request) -> Response:
        path = request.path_params
        return protocol_reply(
            await self.v2.model_metadata(path["model_name"], path.get("model_version"))
        )

    async def v2_model_ready(self, request: Request) -> Response:
        path = request.path_params
        return protocol_reply(
            await self.v2.model_ready(path["model_name"], path.get("model_version"))
        )

    async def v2_infer(self, request: Request) -> Response:
        path = request.path_params
        headers = request.headers
        with self.plane.batcher.arriving():  # a batch about to start may wait for this request
            body = await read_body(request, self.settings.max_body_bytes)
            reply = await self.v2.infer(
                path["model_name"], path.get("model_version"), body,
                headers.get(inference_protocol.HEADER_LENGTH), headers.get("content-encoding"),
            )
        return protocol_reply(reply)

    async def docs(self, request: Request) -> Response:
        return Response(DOCS_PAGE, media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": DOCS_POLICY})

    async def docs_asset(self, request: Request) -> Response:
        name = request.path_params["asset"]
        media_type = SWAGGER_ASSETS.get(name)
        if media_type is None:  # a fixed list: no path from the request reaches the disk
            raise NotFoundError(f"no such documentation asset: {name!r}")
        return Response(
            (SWAGGER_DIR / name).read_bytes(), media_type=media_type,
            headers={"cache-control": "public, max-age=86400"},
        )


def protocol_reply(reply: inference_protocol.Reply) -> Response:
    return Response(reply.body, media_type=reply.media_type, headers=reply.headers)


def operations(api: Api | None) -> list[Operation]:
    """Every endpoint of the service, once. ``api=None`` gives the table without handlers (for
    the document alone)."""

    def h(name: str) -> Callable[..., Any] | None:
        return getattr(api, name) if api is not None else None

    not_ready = {503: "No model is loaded yet."}
    # Path parameters state their exact form: BentoML's own router answers a path holding a line
    # break with a plain-text 404 before our app sees it.
    job_id = Parameter("job_id", "path", {"type": "string", "pattern": f"^{JOB_ID.pattern}$"},
                       "A retrain job's id.",
                       example="job-20261123-180000-a1b2c3")
    feedback_id = Parameter(
        "feedback_id", "path", {"type": "integer", "minimum": 1, "maximum": MAX_ID},
        "A feedback item's id.",
        example=1,
    )
    return [
        Operation("POST", "/predict", "predict", "Classify texts", h("predict"),
                  PredictRequest, PredictResponse, errors=not_ready,
                  example={"texts": ["where is my parcel?", "I was charged twice"]}),
        Operation("POST", "/feedback", "feedback",
                  "Give true labels, by prediction id or by text (all or nothing)", h("feedback"),
                  FeedbackRequest, FeedbackResponse, feedback_role=True, rate_limited=True,
                  errors={404: "An unknown `prediction_id` (never issued or past retention).",
                          503: "The database is unreachable; retry after `Retry-After`."},
                  example={"items": [{"text": "do you deliver to Norway?",
                                      "label": "shipping_question"}]}),
        Operation("GET", "/feedback", "list_feedback",
                  "List feedback, newest first, with filters and pagination", h("list_feedback"),
                  response=FeedbackList, query=FeedbackListQuery, tag="feedback",
                  feedback_role=True,
                  errors={422: "A query parameter is invalid; `field` names it."}),
        Operation("PATCH", "/feedback/{feedback_id}", "relabel_feedback",
                  "Give a feedback item another label", h("relabel_feedback"),
                  RelabelRequest, FeedbackEntryInfo, admin=True, tag="feedback",
                  parameters=(feedback_id,), errors={404: "No such feedback item."},
                  example={"label": "shipping_question"}),
        Operation("DELETE", "/feedback/{feedback_id}", "delete_feedback",
                  "Delete a feedback item", h("delete_feedback"), status=204, admin=True,
                  tag="feedback", parameters=(feedback_id,),
                  errors={404: "No such feedback item.", 422: "`feedback_id` is not an id."}),
        Operation("GET", "/review", "review",
                  "The unlabelled predictions most worth labelling next (active learning)",
                  h("review"), response=ReviewResponse, query=ReviewQuery, tag="feedback",
                  feedback_role=True,
                  errors={422: "A query parameter is invalid; `field` names it.",
                          503: "No model is loaded yet, or the database is unreachable "
                               "(`Retry-After`)."}),
        Operation("GET", "/labels", "labels",
                  "Per label: status (active or pending), training examples, feedback, recall",
                  h("labels"), response=LabelsResponse, tag="feedback"),
        Operation("GET", "/memory", "memory",
                  "This worker's feedback memory: size, thresholds, calibration", h("memory"),
                  response=MemoryResponse, tag="feedback"),
        Operation("GET", "/models", "models",
                  "Versions, their metrics, and what this worker serves", h("models"),
                  response=ModelsResponse, tag="models"),
        Operation("POST", "/models/promote", "promote",
                  "Point the registry at a version; every worker follows", h("promote"),
                  PromoteRequest, PromoteResponse, admin=True, tag="models",
                  errors={404: "No such version."}, example={"version": "v1"}),
        Operation("POST", "/retrain", "retrain",
                  "Start a retrain job on the feedback so far", h("retrain"),
                  RetrainRequest, RetrainJob, status=202, admin=True, rate_limited=True,
                  tag="retraining",
                  errors={409: "Too little feedback, or a job is already running.",
                          **not_ready},
                  example={"min_feedback": 20, "search": "none", "force": False}),
        Operation("GET", "/retrain", "retrain_jobs", "Recent retrain jobs", h("retrain_jobs"),
                  response=RetrainJobList, admin=True, tag="retraining"),
        Operation("GET", "/retrain/{job_id}", "retrain_status",
                  "Phase, progress and outcome of a retrain job", h("retrain_status"),
                  response=RetrainJob, admin=True, tag="retraining", parameters=(job_id,),
                  errors={404: "No such job."}),
        Operation("GET", "/drift", "drift", "Latest drift result per signal",
                  h("drift"), response=DriftResponse, tag="monitoring"),
        Operation("GET", "/drift/report", "drift_report",
                  "Evidently's HTML report of the latest drift window", h("drift_report"),
                  response_media_type="text/html", tag="monitoring",
                  errors={404: "No report yet."}),
        Operation("GET", "/estimate", "estimate",
                  "Accuracy estimated without labels, from calibrated confidences",
                  h("estimate"), response=EstimateResponse, tag="monitoring",
                  errors={503: "No model is loaded yet, or the database is unreachable."}),
        Operation("GET", "/metrics", "metrics", "Prometheus metrics", h("metrics"),
                  response_media_type="text/plain", tag="monitoring"),
        *inference_protocol.operations(h),
        Operation("GET", "/livez", "livez", "Liveness probe (served by BentoML)", None,
                  response_media_type="text/plain", tag="probes"),
        Operation("GET", "/readyz", "readyz",
                  "Readiness probe: 200 once this worker serves a model (served by BentoML)",
                  None, response_media_type="text/plain", tag="probes",
                  errors={503: "Not ready."}),
        Operation("GET", "/", "index", "What this service offers", h("index"),
                  response=IndexResponse, tag="docs"),
        Operation("GET", "/openapi.json", "openapi", "This OpenAPI 3.1 document",
                  h("openapi_json"), tag="docs"),
        Operation("GET", "/docs", "docs", "Interactive documentation (Swagger UI, offline)",
                  h("docs"), response_media_type="text/html", tag="docs"),
        Operation("GET", "/docs/{asset}", "docs_asset", "Swagger UI's static files",
                  h("docs_asset"), response_media_type="application/octet-stream", tag="docs",
                  parameters=(Parameter("asset", "path",
                                        {"type": "string", "pattern": "^[^\n]+$"}),),
                  errors={404: "No such file."}),
    ]


def api_document(ops: list[Operation], settings: RefitSettings | None = None) -> dict[str, Any]:
    """The OpenAPI document; with ``settings``, the limits they set are stated in it too."""
    document = openapi_document(ops, "refit", __version__, API_DESCRIPTION)
    if settings is not None:
        schemas = document["components"]["schemas"]
        texts = schemas["PredictRequest"]["properties"]["texts"]
        texts["maxItems"] = settings.max_texts_per_request
        texts["items"]["maxLength"] = settings.max_text_chars
        schemas["FeedbackItem"]["properties"]["text"]["maxLength"] = settings.max_text_chars
        inference_protocol.state_limits(document, settings)
        for parameter in document["paths"]["/review"]["get"]["parameters"]:
            if parameter["name"] == "limit":
                for option in parameter["schema"].get("anyOf", [parameter["schema"]]):
                    if option.get("type") == "integer":
                        option["maximum"] = settings.review_max_limit
    return document


def create_app(plane: DataPlane, settings: RefitSettings) -> Starlette:
    """The HTTP app over ``plane``: one route per path of :func:`operations`, each answering
    every method (unknown ones get a JSON 405), and a JSON 404 for every other path."""
    api = Api(plane, settings)
    ops = operations(api)
    api.openapi = orjson.dumps(api_document(ops, settings))
    api.endpoints = {f"{op.method} {op.path}": op.summary for op in ops}
    rotation = ConnectionRotation(settings.keepalive_requests)
    admin = admin_guard(settings)
    feedback = feedback_guard(settings)

    def guarded_by(guard: RoleGuard, handler: Handler) -> Handler:
        """Run ``handler`` only for callers ``guard`` admits (see service/access.py)."""

        async def guarded(request: Request) -> Response:
            guard.check(request.headers.get("authorization"), client_host(request))
            return await handler(request)

        return guarded

    def route(path: str, name: str, handlers: dict[str, Handler]) -> Route:
        allowed = ", ".join(sorted(handlers))

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            handler = handlers.get(request.method)
            try:
                if handler is None:
                    raise MethodNotAllowedError(
                        f"{request.method} is not allowed on {path}; use {allowed}"
                    )
                response = await handler(request)
            except RefitError as exc:
                response = error_response(exc)
            except Exception:  # noqa: BLE001 - never leak internals; the log has the traceback
                log.exception("unhandled error on %s %s", request.method, path)
                response = error_response(RefitError("internal error; see the server log"))
            if handler is None:
                response.headers["allow"] = allowed
            rotation.count(request, response)
            m = metrics()
            status = str(response.status_code)
            m.http_requests.labels(endpoint=name, status=status).inc()
            m.http_duration.labels(endpoint=name, status=status).observe(
                time.perf_counter() - started
            )
            return response

        return Route(path, endpoint, methods=ALL_METHODS, name=name)

    by_path: dict[str, dict[str, Handler]] = {}
    names: dict[str, str] = {}
    for op in ops:
        if op.handler is None:
            continue
        handler: Handler = op.handler
        if op.admin:
            handler = guarded_by(admin, handler)
        elif op.feedback_role:
            handler = guarded_by(feedback, handler)
        by_path.setdefault(op.path, {})[op.method] = handler
        names.setdefault(op.path, op.name)

    async def not_found(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException) and exc.status_code != 404:
            return error_response(RefitError(str(exc.detail)))
        return error_response(
            NotFoundError(f"no such endpoint: {request.url.path} (see /docs for the API)")
        )

    return Starlette(
        routes=[route(path, names[path], handlers) for path, handlers in by_path.items()],
        exception_handlers={404: not_found},
        middleware=[Middleware(SecurityHeadersMiddleware)],
    )


def client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


class LateApp:
    """The ASGI app BentoML mounts at import time; it forwards to the app each worker builds in
    its start-up hook (503 until then)."""

    def __init__(self) -> None:
        self.app: Starlette | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] == "lifespan":  # nothing of ours to start here: the hook does it
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            return
        response = error_response(RefitError("starting up; retry shortly"))
        response.status_code = 503
        await response(scope, receive, send)


@bentoml.service(
    name="refit",
    workers=load_settings().workers,
    # Our handlers time and count requests themselves; BentoML's per-request metrics and
    # access log would add a large share to the CPU each request costs.
    traffic={"timeout": 120},
    metrics={"enabled": False},
    logging={"access": {"enabled": False}},
)
@bentoml.asgi_app(LateApp(), path="/")
class RefitService:
    """Serves the registry's current model version; see the module docstring."""

    def __init__(self) -> None:
        self.plane: DataPlane | None = None

    @bentoml.on_startup
    async def start(self) -> None:
        settings = load_settings()
        configure_logging(settings)
        for guard in (admin_guard(settings), feedback_guard(settings)):
            if not guard.configured:
                log.warning(
                    "%s is not set: the %s endpoints answer only clients on this machine",
                    guard.setting, guard.role,
                )
        plane = await asyncio.to_thread(build_data_plane, settings)
        await plane.start()
        self.plane = plane
        # The LateApp mounted by the decorator, as the service object recorded it.
        # (bentoml.service turns the class into a Service; its type hints keep the class.)
        for mounted, _path, _name in RefitService.mount_apps:  # type: ignore[attr-defined]
            if isinstance(mounted, LateApp):
                mounted.app = create_app(plane, settings)
        await asyncio.to_thread(freeze_heap)

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.plane is not None:
            await self.plane.stop()

    def __is_ready__(self) -> bool:
        return self.plane is not None and self.plane.ready
