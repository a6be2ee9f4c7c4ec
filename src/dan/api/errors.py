"""The one table from errors to responses: the DAN envelope, the v0 format under /v0, or
AUTOMATIC1111's shape under the facade's paths (see dan.api.a1111.errors)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from dan.api.a1111 import errors as a1111
from dan.api.a1111 import is_facade_path
from dan.errors import DanError, InvalidArgument
from dan.nodes.protocol import Reason, reason_of

log = logging.getLogger(__name__)

V0_PREFIX = "/v0"
NODE_PREFIX = "/api/node/"


def is_v0(request: Request) -> bool:
    return request.url.path.startswith(V0_PREFIX + "/")


def error_response(
    request: Request, status: int, code: int, message: str, data: Any = None
) -> JSONResponse:
    """Failure as the reference says: ``{code, message}`` (+ ``data`` when it helps), or v0's
    ``{"msg"}`` (``{"detail"}`` for interrogate)."""
    if is_v0(request):
        key = "detail" if request.url.path.rstrip("/").endswith("/interrogate") else "msg"
        return JSONResponse({key: message}, status_code=status)
    body: dict[str, Any] = {"code": code, "message": message}
    if data:
        body["data"] = data
    return JSONResponse(body, status_code=status)


def node_data(request: Request, reason: Reason, data: Any = None) -> Any:
    """``data`` with the protocol's refusal ``reason`` for a node's request (see
    dan.nodes.protocol: the node client raises by it); other requests keep ``data``."""
    if not request.url.path.startswith(NODE_PREFIX):
        return data
    return {**(data or {}), "reason": reason.value}


def describe_validation_error(exc: RequestValidationError) -> str:
    """One sentence naming the first bad field and what is valid, e.g.
    ``Invalid height: must be a multiple of 8 between 64 and 2048, got 500``."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON"
    message = str(first.get("msg", "invalid value"))
    if not loc and kind == "dan_invalid":  # a check across fields names them itself
        return f"Invalid {message}"
    if not loc:
        return "the request body must be a JSON object"
    if kind == "missing":
        message = "is required"
    elif kind in ("model_attributes_type", "model_type", "dict_type"):
        message = "must be a JSON object"
    return f"Invalid {'.'.join(loc)}: {message}"


def install_error_handlers(app: FastAPI) -> None:
    async def dan_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DanError)
        if is_facade_path(request.url.path):
            return a1111.from_dan_error(exc)
        data = node_data(request, reason_of(exc), exc.data)
        return error_response(request, exc.http_status, exc.code, exc.message, data)

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message = describe_validation_error(exc)
        if is_facade_path(request.url.path):
            return a1111.from_validation_error(message)
        data = node_data(request, Reason.INVALID)
        return error_response(request, 400, InvalidArgument.code, message, data)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if is_facade_path(request.url.path):
            return a1111.from_http_error(exc)
        code = InvalidArgument.code if exc.status_code < 500 else DanError.code
        data = node_data(request, Reason.ERROR)
        return error_response(request, exc.status_code, code, str(exc.detail), data)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        if is_facade_path(request.url.path):
            return a1111.from_unexpected(exc)
        data = node_data(request, Reason.ERROR)
        return error_response(request, 500, DanError.code, "internal server error", data)

    app.add_exception_handler(DanError, dan_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
