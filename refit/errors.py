"""One error hierarchy for the whole system.

Every error carries the HTTP status it maps to, as an ``http.HTTPStatus``, so code far from the web
layer can raise the right kind of failure without importing the web framework. The service maps
them to responses in one place; the command line maps them to exit codes.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class RefitError(Exception):
    """Base class: a failure with a message meant for the user of the API or CLI."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.details)
        return body


class InvalidInputError(RefitError):
    """The caller sent something we cannot accept (422)."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY


class BadRequestError(RefitError):
    """The request itself is malformed: bad JSON, wrong content type (400)."""

    status = HTTPStatus.BAD_REQUEST


class PayloadTooLargeError(RefitError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaTypeError(RefitError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class MethodNotAllowedError(RefitError):
    status = HTTPStatus.METHOD_NOT_ALLOWED


class UnauthorizedError(RefitError):
    status = HTTPStatus.UNAUTHORIZED


class ForbiddenError(RefitError):
    """The caller may not do this here, whatever it sends (403)."""

    status = HTTPStatus.FORBIDDEN


class TooManyRequestsError(RefitError):
    """A client exceeded its rate limit (429 with ``Retry-After``)."""

    status = HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, message: str, *, retry_after_s: int, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class NotFoundError(RefitError):
    status = HTTPStatus.NOT_FOUND


class ConflictError(RefitError):
    """The request conflicts with the current state, e.g. a retrain is already running (409)."""

    status = HTTPStatus.CONFLICT


class NotReadyError(RefitError):
    """No model is loaded yet (503)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class StoreUnavailableError(RefitError):
    """The database cannot be reached; the caller should retry (503 with ``Retry-After``)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    retry_after_s = 5


class DatasetError(InvalidInputError):
    """A training or evaluation file is unusable; the message names the file and line."""


class RegistryError(RefitError):
    """The model registry is missing, corrupt or asked for something it does not hold."""


class VersionNotFoundError(NotFoundError):
    pass


class ExportParityError(RefitError):
    """The exported ONNX model does not reproduce the PyTorch model closely enough."""
