"""Errors that carry their HTTP form and their outcome: every error llmd produces is one
ApiError, rendered once by the app's middleware as OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``; every constructor lives here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec
from aiohttp import web

from .outcome import Outcome


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
        outcome: Outcome = Outcome.INVALID,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.outcome = outcome

    def body(self) -> bytes:
        try:
            return _encoder.encode(ErrorEnvelope(ErrorBody(self.message, self.type, self.param, self.code)))
        except UnicodeEncodeError:
            # The message quotes a header or path whose bytes were not UTF-8 (aiohttp keeps them
            # as lone surrogates, which JSON cannot carry): quote them escaped instead.
            message, param = (_printable(x) for x in (self.message, self.param))
            return _encoder.encode(ErrorEnvelope(ErrorBody(message or "", self.type, param, self.code)))

    def anthropic_body(self) -> bytes:
        """Anthropic's envelope, whose ``error.type`` its SDK and Claude Code read."""
        kind = ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return _encoder.encode({"type": "error", "error": {"type": kind, "message": self.message}})

    def response(self, style: str = "openai") -> web.Response:
        body = self.anthropic_body() if style == "anthropic" else self.body()
        return web.Response(status=self.status, body=body, content_type="application/json", headers=self.headers)


# Anthropic's error types by status (its API's own table; 529 is its overloaded, llmd says 503).
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _printable(text: str | None) -> str | None:
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if text is not None else None


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


def model_not_allowed(key_id: str, model: str) -> ApiError:
    return ApiError(
        403,
        f"Key '{key_id}' may not use model '{model}'.",
        type="permission_error",
        code="model_not_allowed",
        param="model",
    )


def tool_not_allowed(key_id: str, tool: str) -> ApiError:
    return ApiError(
        403,
        f"Key '{key_id}' may not use tool '{tool}'.",
        type="permission_error",
        code="tool_not_allowed",
        param="tools",
    )


def unknown_tool(tool: str) -> ApiError:
    return ApiError(
        404, f"No server tool named '{tool}' (GET /v1/tools lists them).", code="tool_not_found", param="tools"
    )


def route_not_served(model: str, backend: str, path: str) -> ApiError:
    return ApiError(
        404,
        f"Model '{model}' (backend {backend}) does not serve {path}.",
        code="route_not_supported",
        param="model",
    )


def invalid_key(message: str = "Incorrect API key provided.") -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def admin_required(message: str = "This route needs an admin key.") -> ApiError:
    return ApiError(403, message, type="permission_error", code="admin_required")


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"Request body too large: the limit is {limit} bytes (server.max_body_bytes).", code="request_too_large"
    )


def method_not_allowed(method: str, path: str) -> ApiError:
    return ApiError(405, f"Method {method} is not allowed on {path}.", code="method_not_allowed")


def cors_forbidden(origin: str) -> ApiError:
    return ApiError(403, f"Origin {origin} is not allowed (server.cors_origins).", code="cors_forbidden")


def internal_error() -> ApiError:
    return ApiError(500, "Internal error in llmd; see its log for this request id.", type="server_error")


def ledger_unavailable(detail: str) -> ApiError:
    return ApiError(503, f"The usage ledger cannot be read: {detail}", type="server_error")


def limits_unavailable(detail: str) -> ApiError:
    """limits.store: redis is unreachable and on_store_error is fail_closed."""
    return ApiError(
        503,
        f"Rate limits cannot be checked right now (the limit store is unreachable: {detail}). Retry shortly.",
        type="server_error",
        code="limits_unavailable",
        headers={"Retry-After": "1"},
    )


def upstream_unreachable(detail: str) -> ApiError:
    return ApiError(
        502,
        f"Upstream unreachable: {detail}",
        type="upstream_error",
        code="upstream_unreachable",
        outcome=Outcome.UPSTREAM_ERROR,
    )


def upstream_failed(status: int, detail: str) -> ApiError:
    return ApiError(status, detail, type="upstream_error", outcome=Outcome.UPSTREAM_ERROR)


def upstream_timeout(detail: str) -> ApiError:
    return ApiError(
        504, f"Upstream timed out: {detail}", type="upstream_error", code="upstream_timeout", outcome=Outcome.TIMEOUT
    )


def overloaded(message: str, retry_after_s: int) -> ApiError:
    return ApiError(
        503,
        message,
        type="server_overloaded",
        code="server_overloaded",
        headers={"Retry-After": str(max(1, retry_after_s))},
        outcome=Outcome.REJECTED_QUEUE,
    )


def no_room(message: str) -> ApiError:
    """A model that must start does not fit server.memory_budget and nothing can make room."""
    return ApiError(
        503,
        message,
        type="server_overloaded",
        code="insufficient_memory",
        headers={"Retry-After": "30"},
        outcome=Outcome.REJECTED_QUEUE,
    )


def conflict(message: str, code: str) -> ApiError:
    return ApiError(409, message, code=code)


class RateLimited(ApiError):
    """429 from a per-key window or max_concurrent; ``reason`` labels the metric."""

    def __init__(self, message: str, retry_after_s: float, reason: str) -> None:
        super().__init__(
            429,
            message,
            type="rate_limit_exceeded",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
            outcome=Outcome.REJECTED_RATE,
        )
        self.reason = reason


def quota_exhausted(message: str, retry_after_s: float) -> ApiError:
    return ApiError(
        429,
        message,
        type="insufficient_quota",
        code="insufficient_quota",
        # Until next month: the OpenAI and Anthropic SDKs honour x-should-retry and stop there.
        headers={"Retry-After": str(math.ceil(retry_after_s)), "x-should-retry": "false"},
        outcome=Outcome.REJECTED_QUOTA,
    )


def sse_error_event(err: ApiError) -> bytes:
    """An error told inside an SSE stream whose 200 headers already went out."""
    return b"data: " + err.body() + b"\n\n"
