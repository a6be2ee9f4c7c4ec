"""Failures under the facade, in AUTOMATIC1111's shape: ``{error, detail, body, errors}``.

``error`` names the kind of failure, ``detail`` and ``errors`` carry the message. The status is
the one DAN's error table gives (400 for a refused value, 404, 409 for a cancelled task, 429,
503, 504 ...), except that a body that does not validate answers 422, as A1111 (FastAPI) does,
and a missing or refused key answers 401 with ``WWW-Authenticate: Basic``, which is what makes
A1111 clients and browsers send credentials.
"""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from dan.errors import DanError, InvalidArgument, PermissionDenied

log = logging.getLogger(__name__)

VALIDATION_STATUS = 422
BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="DAN", charset="UTF-8"'}


def invalid(field: str, message: str) -> InvalidArgument:
    """A refused value, named by its A1111 field: ``Invalid <field>: <message>``."""
    return InvalidArgument(f"Invalid {field}: {message}")


def a1111_error(error: str, detail: str, status: int, **headers: str) -> JSONResponse:
    body = {"error": error, "detail": detail, "body": "", "errors": detail}
    return JSONResponse(body, status_code=status, headers=headers or None)


def from_dan_error(exc: DanError) -> JSONResponse:
    if isinstance(exc, PermissionDenied):
        return a1111_error(type(exc).__name__, exc.message, 401, **BASIC_CHALLENGE)
    return a1111_error(type(exc).__name__, exc.message, exc.http_status)


def from_validation_error(message: str) -> JSONResponse:
    return a1111_error(RequestValidationError.__name__, message, VALIDATION_STATUS)


def from_http_error(exc: HTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    return a1111_error(type(exc).__name__, str(exc.detail), exc.status_code, **headers)


def from_unexpected(exc: Exception) -> JSONResponse:
    return a1111_error(type(exc).__name__, "internal server error", 500)
