"""Kubernetes API errors as the client sees them, shaped by the `Status` object the server sends.

    ApiError (code, reason, message, status dict)
    ├── NotFound 404        ├── Conflict 409 (resourceVersion)   ├── AlreadyExists 409
    ├── Invalid 422         ├── Forbidden 403                    ├── Unauthorized 401
    ├── Gone 410 (watch or continue token too old: relist)
    ├── TooManyRequests 429 (retried, Retry-After honoured)
    └── ServerError 5xx and connection failures (retried)

`retryable` tells the retry policy what to do; nothing else decides that.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    retryable = False

    def __init__(self, code: int, reason: str, message: str, status: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.status = status or {}

    def __str__(self) -> str:
        return self.message


class NotFound(ApiError):
    pass


class AlreadyExists(ApiError):
    pass


class Conflict(ApiError):
    pass


class Invalid(ApiError):
    pass


class Forbidden(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Gone(ApiError):
    pass


class TooManyRequests(ApiError):
    retryable = True

    def __init__(self, *args: Any, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


class ServerError(ApiError):
    retryable = True


def error_from_status(code: int, body: Any, *, retry_after: float | None = None) -> ApiError:
    """Build the right error from an HTTP status and the (maybe) Status body."""
    status = body if isinstance(body, dict) and body.get("kind") == "Status" else {}
    reason = str(status.get("reason") or "")
    message = str(
        status.get("message") or (body if isinstance(body, str) else "") or f"HTTP {code}"
    )
    if code == 404:
        return NotFound(code, reason or "NotFound", message, status)
    if code == 409:
        cls = AlreadyExists if reason == "AlreadyExists" else Conflict
        return cls(code, reason or "Conflict", message, status)
    if code == 422:
        return Invalid(code, reason or "Invalid", message, status)
    if code == 403:
        return Forbidden(code, reason or "Forbidden", message, status)
    if code == 401:
        return Unauthorized(code, reason or "Unauthorized", message, status)
    if code == 410:
        return Gone(code, reason or "Expired", message, status)
    if code == 429:
        return TooManyRequests(
            code, reason or "TooManyRequests", message, status, retry_after=retry_after
        )
    if code >= 500:
        return ServerError(code, reason or "InternalError", message, status)
    return ApiError(code, reason or "BadRequest", message, status)
