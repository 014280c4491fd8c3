"""Every error leaves as {"error": {"code", "message"}} with its status; no stack trace leaves."""

from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import GnosisError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def error_response(status: int, code: str, message: str, *, retry_after: int | None = None):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def register(app: Flask) -> None:
    from . import ctx

    @app.errorhandler(GnosisError)
    def _gnosis(exc: GnosisError):
        retry_after = exc.retry_after
        if retry_after is None and exc.status in (429, 503):
            retry_after = ctx().settings.retry_after
        return error_response(exc.status, exc.code, exc.message, retry_after=retry_after)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = exc.description or exc.name
        if status == 413:
            message = _too_large(exc)
        response = error_response(status, code, message)
        allow = dict(exc.get_headers()).get("Allow")
        if allow:
            response.headers["Allow"] = allow  # RFC 9110: a 405 lists what is allowed
        return response

    @app.errorhandler(redis.RedisError)
    def _redis(exc: redis.RedisError):
        log.warning("redis unavailable: %s", exc)
        return error_response(503, "queue_unavailable", "The job queue is unreachable; try again shortly.",
                              retry_after=ctx().settings.retry_after)

    @app.errorhandler(Exception)
    def _internal(exc: Exception):
        if _is_broker_error(exc):
            log.warning("broker unavailable: %s", exc)
            return error_response(503, "queue_unavailable", "The job queue is unreachable; try again shortly.",
                                  retry_after=ctx().settings.retry_after)
        log.exception("unhandled error")
        return error_response(500, "internal_error", "The server failed to handle the request.")


def _too_large(exc: HTTPException) -> str:
    """Which limit a 413 hit: the body, one form field, or the number of parts."""
    from flask import request

    from . import MAX_FORM_FIELD_BYTES, MAX_FORM_PARTS, ctx

    limit = ctx().settings.max_upload_bytes
    length = request.content_length
    if length is not None and length > limit:
        return f"The request body is {length} bytes; at most {limit} are accepted."
    # Werkzeug raises the same exception for all three; its multipart decoder says which it was.
    tb, decoder = exc.__traceback__, None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if hasattr(candidate, "_parts_decoded"):
            decoder = candidate
        tb = tb.tb_next
    if decoder is not None and decoder._parts_decoded > (decoder.max_parts or MAX_FORM_PARTS):
        return f"The form has more than {MAX_FORM_PARTS} parts."
    if decoder is not None or length is not None:
        return f"A form field other than the file is larger than {MAX_FORM_FIELD_BYTES} bytes."
    return f"The request body is larger than {limit} bytes."


def _is_broker_error(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError

    return isinstance(exc, (OperationalError, ConnectionError, TimeoutError))
