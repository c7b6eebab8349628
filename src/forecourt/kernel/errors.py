"""The root error type: every error Forecourt raises on purpose carries a stable code."""

from __future__ import annotations

from typing import Any


class ForecourtError(Exception):
    """An expected failure with a stable, documented ``code`` (e.g. ``sales.schema_invalid``).

    ``http_status`` is a hint for the one place that maps errors to HTTP; domain code never
    depends on it.
    """

    code: str = "forecourt.error"
    http_status: int = 400

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidValue(ForecourtError):
    code = "kernel.invalid_value"
    http_status = 422


class CurrencyMismatch(ForecourtError):
    code = "kernel.currency_mismatch"
    http_status = 422


class NotFound(ForecourtError):
    code = "kernel.not_found"
    http_status = 404


class Unauthorized(ForecourtError):
    code = "kernel.unauthorized"
    http_status = 401


class Forbidden(ForecourtError):
    code = "kernel.forbidden"
    http_status = 403


class TooManyRequests(ForecourtError):
    """Refused for now: too many failures from this source. ``retry_after_s`` in the details
    becomes the ``Retry-After`` header."""

    code = "kernel.too_many_requests"
    http_status = 429


class Conflict(ForecourtError):
    code = "kernel.conflict"
    http_status = 409
