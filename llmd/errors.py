"""Errors that carry their HTTP form: every error llmd produces is one ApiError,
rendered once by the app's middleware as OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from aiohttp import web


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """An error with its HTTP status, OpenAI type/code and extra headers (e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return _encoder.encode(ErrorEnvelope(ErrorBody(self.message, self.type, self.param, self.code)))

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body(), content_type="application/json", headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found_route(path: str) -> ApiError:
    return ApiError(404, f"Unknown route: {path}", code="unknown_url")


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def upstream_unreachable(detail: str) -> ApiError:
    return ApiError(502, f"Upstream unreachable: {detail}", type="upstream_error", code="upstream_unreachable")


def upstream_timeout(detail: str) -> ApiError:
    return ApiError(504, f"Upstream timed out: {detail}", type="upstream_error", code="upstream_timeout")


def overloaded(message: str, retry_after_s: int) -> ApiError:
    return ApiError(
        503,
        message,
        type="server_overloaded",
        code="server_overloaded",
        headers={"Retry-After": str(max(1, retry_after_s))},
    )


def sse_error_event(err: ApiError) -> bytes:
    """An error told inside an SSE stream whose 200 headers already went out."""
    return b"data: " + err.body() + b"\n\n"
