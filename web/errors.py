"""Errors in the one documented shape, registered as handlers on the app."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from shared.db import server_went_away

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        details: dict[str, Any] | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.details = details
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None):
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    response = jsonify({"error": body})
    response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        response = error_response(exc.status, exc.code, exc.message, exc.details)
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        message = {
            404: "no such resource",
            405: f"method {request.method} is not allowed here",
            413: "request body is too large",
        }.get(status, exc.description or exc.name)
        response = error_response(status, _CODES.get(status, "error"), message)
        allowed = getattr(exc, "valid_methods", None)  # a 405 says what is allowed (RFC 9110)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        from redis.exceptions import ConnectionError as RedisConnectionError
        from sqlalchemy.exc import OperationalError

        if isinstance(exc, (RedisConnectionError, OperationalError)) or server_went_away(exc):
            log.warning("dependency unavailable: %s", exc)
            return error_response(503, "unavailable", "a dependency (database or Redis) is unavailable")
        log.exception("unhandled error")  # the line carries the request's id
        return error_response(500, "internal_error", "unexpected error", {"request_id": g.get("request_id")})
