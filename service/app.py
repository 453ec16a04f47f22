"""create_app(settings) -> Litestar. The lifespan builds every long-lived resource and disposes of it."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from litestar import Litestar, Request, Response, Router
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import Scope
from sqlalchemy.ext.asyncio import AsyncSession

from service.api import AppRuntime
from service.api.callbacks import CALLBACK_ROUTES
from service.api.deliveries import DELIVERY_ROUTES
from service.api.health import HEALTH_ROUTES
from service.api.tasks import TASK_ROUTES
from service.config import Settings
from service.db import transaction
from service.errors import ServiceError
from service.runtime import Runtime, open_runtime
from service.tracking.jobs import Poller, start_poller
from service.webhooks.jobs import Dispatcher, start_dispatcher

log = structlog.get_logger()

REQUEST_MAX_BODY_BYTES = 1024 * 1024


def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    expected = connection.app.state.runtime.settings.admin_token
    scheme, _sep, presented = connection.headers.get("authorization", "").partition(" ")
    if (
        expected is None
        or scheme.lower() != "bearer"
        or not hmac.compare_digest(presented.strip().encode(), expected.get_secret_value().encode())
    ):
        raise NotAuthorizedException("missing or invalid bearer token in the Authorization header")


def service_error_response(_: Request[Any, Any, Any], exc: ServiceError) -> Response[dict[str, Any]]:
    return Response(
        {"status_code": exc.status_code, "detail": exc.detail, "extra": {"code": exc.code, **exc.extra}},
        status_code=exc.status_code,
    )


def validation_error_response(
    _: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    """Litestar says only 'Validation failed'; the detail should name the offending field."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    named = [
        f"{problem.get('key') or problem.get('source')}: {problem.get('message')}" for problem in problems
    ]
    detail = "; ".join(named) if named else exc.detail
    return Response({"status_code": 400, "detail": detail, "extra": problems}, status_code=exc.status_code)


async def provide_session(runtime: AppRuntime) -> AsyncIterator[AsyncSession]:
    """The request owns the transaction: committed after the handler returns, rolled back if it raises."""
    async with transaction(runtime.sessions) as session:
        yield session


async def log_unhandled(exc: Exception, scope: Scope) -> None:
    if not isinstance(exc, ServiceError | HTTPException):
        log.error("http.unhandled_error", path=scope.get("path"), exc_info=exc)


def provide_runtime(request: Request[Any, Any, Any]) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def create_app(settings: Settings, *, run_jobs: bool = True) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_runtime(settings) as runtime:
            app.state.runtime = runtime
            stoppables: list[Poller | Dispatcher] = []
            try:
                if run_jobs:
                    if runtime.relay is None:
                        log.warning("poll.disabled", reason="SUNO_BASE_URL is not set")
                    else:
                        stoppables.append(await start_poller(runtime))
                    stoppables.append(await start_dispatcher(runtime))
                log.info("app.started", instance_id=runtime.instance_id, jobs=run_jobs)
                yield
            finally:
                # Jobs stop claiming and drain before the scheduler that ticks them and what they use go.
                for job in reversed(stoppables):
                    await job.stop()
                log.info("app.stopped")

    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    return Litestar(
        route_handlers=[
            *HEALTH_ROUTES,
            *CALLBACK_ROUTES,
            Router(path="/", route_handlers=[*TASK_ROUTES, *DELIVERY_ROUTES], guards=[require_admin]),
        ],
        lifespan=[lifespan],
        dependencies={
            "runtime": Provide(provide_runtime, sync_to_thread=False),
            "session": Provide(provide_session),
        },
        exception_handlers={
            ServiceError: service_error_response,
            ValidationException: validation_error_response,
        },
        request_max_body_size=REQUEST_MAX_BODY_BYTES,
        # Logging is configured once by the CLI (structlog); Litestar's own config would override it.
        logging_config=None,
        after_exception=[log_unhandled],
        openapi_config=OpenAPIConfig(
            title="sunotrack",
            version="0.1.0",
            path="/schema",
            components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}),
            security=[{"bearer": []}],
        ),
    )
