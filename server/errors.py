"""Domain errors of the server core, and the one place they become HTTP answers.

Every error body is ``{"error": {"type", "message", "param", "code"}}`` (the OpenAI shape); no traceback ever
reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store.errors import (
    AdapterError,
    AdapterIncompatible,
    AdapterInvalid,
    AdapterNotFound,
    AdapterTooLarge,
)

from .api.disconnect import ClientGone
from .engine.requests import Overloaded
from .engine.slots import NoSlotFree

log = logging.getLogger(__name__)


class ServerError(Exception):
    """Base of the server's own domain errors; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class PromptTooLong(ServerError):
    """Prompt plus requested tokens exceed the context length."""


class UnknownTokenIds(ServerError):
    """Token ids outside the model's vocabulary (in a prompt, ``logit_bias`` or ``stop_token_ids``)."""


class NotStreamable(ServerError):
    """A request asks for something a stream cannot carry."""


class RouteRejected(ServerError):
    """The router was not confident enough and the server is configured to reject."""


class NotReady(ServerError):
    """The model is still loading."""


class AdminDisabled(ServerError):
    """No admin token is configured."""


class Unauthorized(ServerError):
    """Missing or wrong admin token."""


class GenerationFailed(ServerError):
    """The engine could not finish the request."""


_STATUS: list[tuple[type[Exception], int, str]] = [  # first match wins
    (AdapterNotFound, 404, "not_found_error"),
    (AdapterTooLarge, 413, "request_too_large"),
    (AdapterIncompatible, 400, "invalid_request_error"),
    (AdapterInvalid, 400, "invalid_request_error"),
    (AdapterError, 400, "invalid_request_error"),
    (PromptTooLong, 400, "invalid_request_error"),
    (UnknownTokenIds, 400, "invalid_request_error"),
    (RouteRejected, 422, "routing_error"),
    (NotStreamable, 422, "invalid_request_error"),
    (NotReady, 503, "service_unavailable"),
    (Overloaded, 503, "overloaded_error"),
    (NoSlotFree, 409, "conflict_error"),
    (AdminDisabled, 403, "permission_error"),
    (Unauthorized, 401, "authentication_error"),
    (GenerationFailed, 500, "server_error"),
    (ClientGone, 499, "client_closed_request"),
]


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception maps to (for metrics); 499 for a client that went away mid-stream."""
    if not isinstance(exc, Exception):
        return 499
    return next((status for cls, status, _ in _STATUS if isinstance(exc, cls)), 500)


def error_body(kind: str, message: str, param: str | None = None, code: int | str | None = None) -> dict:
    return {"error": {"type": kind, "message": message, "param": param, "code": code}}


# TGI's and LoRAX's routes (api/tgi.py): their clients read errors as {"error": message, "error_type": kind}
TGI_PATHS = frozenset({"/", "/generate", "/generate_stream"})
_TGI_TYPES = {400: "validation", 413: "validation", 422: "validation", 404: "not_found", 503: "overloaded",
              500: "generation"}


def _render(path: str, status: int, kind: str, message: str, param: str | None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    if path in TGI_PATHS:
        body = {"error": message, "error_type": _TGI_TYPES.get(status, kind), "param": param}
    else:
        body = error_body(kind, message, param, status)
    return JSONResponse(body, status, headers)


def error_response(exc: Exception, path: str = "") -> JSONResponse:
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            headers = {}
            if isinstance(exc, Overloaded):
                headers["Retry-After"] = str(exc.retry_after_s)
            if isinstance(exc, Unauthorized):
                headers["WWW-Authenticate"] = "Bearer"
            message = getattr(exc, "message", None) or str(exc)
            return _render(path, status, kind, message, getattr(exc, "param", None), headers)
    log.exception("unhandled error", exc_info=exc)
    return _render(path, 500, "server_error", "internal server error", None)


def install_error_handlers(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, request.url.path)

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems, params = [], []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
            field = ".".join(loc) or "body"
            params.append(field)
            problems.append(f"{field}: {err.get('msg')}")
        message = "invalid request: " + "; ".join(problems)
        return _render(request.url.path, 422, "invalid_request_error", message, params[0] if params else None)

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _render(request.url.path, exc.status_code, kind, str(exc.detail), None, getattr(exc, "headers", None))

    for cls in (AdapterError, ServerError, Overloaded, NoSlotFree, ClientGone):
        app.add_exception_handler(cls, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, domain)
