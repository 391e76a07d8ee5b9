"""The HTTP surface: a BentoML service. The only module that imports bentoml or starlette.

BentoML runs the worker processes, their lifecycle hooks and the ``/livez`` and ``/readyz``
probes. The API itself is a small Starlette app mounted into the service, so that every response,
error included, is ours: JSON bodies naming the field and the problem, the right 4xx status, a
413 for oversized bodies, and no framework layers on the hot path beyond what a request needs
(see BENCHMARKS.md for what that buys). Each handler parses the wire type, calls the data plane
and renders the result; :class:`~refit.errors.RefitError` maps to its status in one place.

Start it with ``bentoml serve .`` (or ``make serve``) from the repository root.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Awaitable, Callable, TypeVar

import bentoml
import orjson
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from monitoring.metrics import metrics, render_latest
from refit.errors import (
    BadRequestError,
    InvalidInputError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    RefitError,
    UnsupportedMediaTypeError,
)
from refit.logs import configure_logging
from refit.settings import load_settings
from service.dataplane import DataPlane
from service.schemas import FeedbackRequest, PredictRequest, PromoteRequest, RetrainRequest
from service.access import RateLimiter, RoleGuard
from service.security import SecurityHeadersMiddleware

log = logging.getLogger("refit.http")

# Workers share one listening socket. libuv (uvloop) otherwise accepts every pending connection
# in one go, so a burst of new keep-alive connections lands on whichever worker woke first; with
# this set it yields between accepts and the workers share them.
os.environ.setdefault("UV_TCP_SINGLE_ACCEPT", "1")

settings = load_settings()
configure_logging(settings)
plane = DataPlane(settings)

ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
Model = TypeVar("Model", bound=BaseModel)
Handler = Callable[[Request], Awaitable[Response]]


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_response(exc: RefitError) -> Response:
    response = json_response(exc.to_dict(), int(exc.status))
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        response.headers["retry-after"] = str(retry_after)
    return response


def _field_path(location: tuple[Any, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


async def read_json(request: Request, model: type[Model]) -> Model:
    """Parse the body as ``model``: 415 for another media type, 413 when too large, 400 for
    malformed JSON, 422 naming the field for anything the schema rejects."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"expected content-type application/json, got {media_type or 'none'!r}",
            field="content-type",
        )
    limit = settings.max_body_bytes
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
    body = b"".join(chunks)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise BadRequestError(f"body is not valid JSON: {errors[0]['msg']}", field="body") from None
        problems = [
            {"field": _field_path(tuple(e["loc"])), "problem": _problem(e)} for e in errors[:20]
        ]
        first = problems[0]
        raise InvalidInputError(
            f"{first['field']}: {first['problem']}", field=first["field"], errors=problems
        ) from None


def _problem(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    return str(error["msg"]).removeprefix("Value error, ")


_requests_per_connection: dict[tuple[str, int], int] = {}


def _count_connection_request(request: Request, response: Response) -> None:
    """Close a keep-alive connection after ``keepalive_requests`` requests (see settings)."""
    limit = settings.keepalive_requests
    client = request.client
    if not limit or client is None:
        return
    key = (client.host, client.port)
    served = _requests_per_connection.get(key, 0) + 1
    if served >= limit:
        _requests_per_connection.pop(key, None)
        response.headers["connection"] = "close"
    else:
        if len(_requests_per_connection) > 10_000:  # clients that left without a last request
            _requests_per_connection.clear()
        _requests_per_connection[key] = served


def route(path: str, name: str, handlers: dict[str, Handler]) -> Route:
    """A route that answers every method: unknown ones get a JSON 405, errors their status."""
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
            response = json_response({"error": "internal error; see the server log"}, 500)
        if handler is None:
            response.headers["allow"] = allowed
        _count_connection_request(request, response)
        m = metrics()
        status = str(response.status_code)
        m.http_requests.labels(endpoint=name, status=status).inc()
        m.http_duration.labels(endpoint=name, status=status).observe(time.perf_counter() - started)
        return response

    return Route(path, endpoint, methods=ALL_METHODS, name=name)


admin_guard = RoleGuard("admin", "REFIT_ADMIN_TOKEN", settings.admin_token)
feedback_guard = RoleGuard("feedback", "REFIT_FEEDBACK_KEY", settings.feedback_key,
                           settings.admin_token)
feedback_limit = RateLimiter(settings.feedback_rate_per_minute, 60, "feedback items")
retrain_limit = RateLimiter(settings.retrain_rate_per_hour, 3600, "retrain requests")


def _client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def guarded_by(guard: RoleGuard, handler: Handler) -> Handler:
    """Run ``handler`` only for callers ``guard`` admits (see service/access.py)."""

    async def guarded(request: Request) -> Response:
        guard.check(request.headers.get("authorization"), _client_host(request))
        return await handler(request)

    return guarded


def admin_only(handler: Handler) -> Handler:
    return guarded_by(admin_guard, handler)


# -- handlers ----------------------------------------------------------------------------------


async def predict(request: Request) -> Response:
    body = await read_json(request, PredictRequest)
    return json_response(await plane.predict(body.texts))


async def feedback(request: Request) -> Response:
    body = await read_json(request, FeedbackRequest)
    feedback_limit.take(_client_host(request), len(body.items))
    return json_response(await plane.feedback(body.items))


async def list_models(request: Request) -> Response:
    return json_response(plane.models())


async def promote(request: Request) -> Response:
    body = await read_json(request, PromoteRequest)
    return json_response(await plane.promote(body.version))


async def retrain(request: Request) -> Response:
    body = await read_json(request, RetrainRequest)
    retrain_limit.take(_client_host(request))
    job = await plane.retrain(body.model_dump())
    response = json_response(job, 202)
    response.headers["location"] = f"/retrain/{job['job_id']}"
    return response


async def retrain_status(request: Request) -> Response:
    return json_response(await plane.retrain_status(request.path_params["job_id"]))


async def retrain_jobs(request: Request) -> Response:
    return json_response(await plane.retrain_jobs())


async def drift(request: Request) -> Response:
    return json_response(plane.drift())


async def drift_report(request: Request) -> Response:
    body, policy = plane.drift_report()
    return Response(
        body, media_type="text/html; charset=utf-8",
        headers={"content-security-policy": policy, "cache-control": "no-store"},
    )


async def prometheus_metrics(request: Request) -> Response:
    return Response(render_latest(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def index(request: Request) -> Response:
    return json_response(
        {
            "service": "refit",
            "endpoints": {
                "POST /predict": '{"texts": ["..."]}',
                "POST /feedback": '{"items": [{"prediction_id" or "text": "...", "label": "..."}]}',
                "GET /models": "versions, metrics, and what this worker serves",
                "POST /models/promote": '{"version": "v3"} (admin)',
                "POST /retrain": '{"unfreeze_layers": 0, "search": "none", "min_feedback": 20, '
                '"force": false} (admin): starts a job',
                "GET /retrain/{job_id}": "phase, progress and outcome of a job (admin)",
                "GET /retrain": "recent jobs (admin)",
                "GET /drift": "latest drift result per signal (JSON)",
                "GET /drift/report": "Evidently's HTML report of the latest drift window",
                "GET /metrics": "Prometheus metrics",
                "GET /livez, /readyz": "probes",
            },
        }
    )


http_app = Starlette(
    routes=[
        route("/predict", "predict", {"POST": predict}),
        route("/feedback", "feedback", {"POST": guarded_by(feedback_guard, feedback)}),
        route("/models", "models", {"GET": list_models}),
        route("/models/promote", "promote", {"POST": admin_only(promote)}),
        route("/retrain", "retrain", {"POST": admin_only(retrain), "GET": admin_only(retrain_jobs)}),
        route("/retrain/{job_id}", "retrain_status", {"GET": admin_only(retrain_status)}),
        route("/drift", "drift", {"GET": drift}),
        route("/drift/report", "drift_report", {"GET": drift_report}),
        route("/metrics", "metrics", {"GET": prometheus_metrics}),
        route("/", "index", {"GET": index}),
    ],
    middleware=[Middleware(SecurityHeadersMiddleware)],
)


@bentoml.service(
    name="refit",
    workers=settings.workers,
    # Our handlers time and count requests themselves; BentoML's per-request metrics and
    # access log would add a large share to the CPU each request costs.
    traffic={"timeout": 120},
    metrics={"enabled": False},
    logging={"access": {"enabled": False}},
)
@bentoml.asgi_app(http_app, path="/")
class RefitService:
    """Serves the registry's current model version; see the module docstring."""

    @bentoml.on_startup
    async def start(self) -> None:
        for guard in (admin_guard, feedback_guard):
            if not guard.configured:
                log.warning(
                    "%s is not set: the %s endpoints answer only clients on this machine",
                    guard.setting, guard.role,
                )
        await plane.start()

    @bentoml.on_shutdown
    async def stop(self) -> None:
        await plane.stop()

    def __is_ready__(self) -> bool:
        return plane.ready
