"""Domain errors carry their HTTP meaning; app.py turns them into Litestar-shaped JSON in one place."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(
        self, detail: str, *, extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}
        self.headers = headers or {}


class InvalidInput(ServiceError):
    status_code = 400
    code = "invalid_input"


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class RateLimited(ServiceError):
    status_code = 429
    code = "rate_limited"


class UpstreamUnavailable(ServiceError):
    status_code = 502
    code = "upstream_unavailable"


class DatabaseUnavailable(ServiceError):
    status_code = 503
    code = "database_unavailable"


# What a 503 for an unreachable or stopping database tells the client to wait: a restart takes seconds.
DATABASE_RETRY_AFTER_S = 2


def retry_shortly(detail: str) -> DatabaseUnavailable:
    """A 503 whose client should retry after DATABASE_RETRY_AFTER_S."""
    return DatabaseUnavailable(detail, headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})
