"""create_app(settings) -> Litestar. The lifespan builds every long-lived resource and disposes of it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from litestar import Litestar, Request, Response, Router
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from sqlalchemy.ext.asyncio import AsyncSession

from service.api import AppRuntime
from service.api.auth import RequireToken, provide_caller, provide_owner
from service.api.callbacks import CALLBACK_ROUTES
from service.api.clients import CLIENT_ROUTES
from service.api.connection import AUTOCOMMIT, OneConnection, request_connection, scope_runtime
from service.api.contract import allow_every_method, document_contract
from service.api.dashboard import DASHBOARD_ROUTES
from service.api.deliveries import DELIVERY_ROUTES
from service.api.events import EVENT_ROUTES
from service.api.health import HEALTH_ROUTES
from service.api.relay_front import RELAY_FRONT_ROUTES
from service.api.schemas import check_json, too_deep
from service.api.stats import STATS_ROUTES
from service.api.tasks import TASK_ROUTES
from service.config import Role, Settings
from service.db import database_unavailable, driver_dsn
from service.errors import ServiceError, retry_shortly
from service.feed.sequencer import Sequencer
from service.feed.watcher import FeedWatcher
from service.redact import mask_credentials, mask_json
from service.runtime import JOB_ROLES, Runtime, check_role, open_runtime
from service.tracking.jobs import Poller, start_pollers
from service.vocabulary import DEFAULT_RELAY
from service.webhooks.jobs import Dispatcher, start_dispatcher

log = structlog.get_logger()

REQUEST_MAX_BODY_BYTES = 1024 * 1024
RELAY_FRONT_PREFIX = "/suno/"


def error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """The one place an exception becomes a response: `{"status_code", "detail", "extra"}` always."""
    headers: dict[str, str] = {}
    extra: Any
    if database_unavailable(exc):
        # Says which error without its message: a connection error may quote the host and user.
        log.warning("http.database_unavailable", path=request.scope.get("path"), error=type(exc).__name__)
        exc = retry_shortly("the database is unavailable: retry shortly")
    if isinstance(exc, ServiceError):
        status, detail, extra = exc.status_code, exc.detail, {"code": exc.code, **exc.extra}
        headers.update(exc.headers)
    elif isinstance(exc, ValidationException):
        # Litestar says only 'Validation failed'; the detail names each offending field.
        extra = exc.extra if isinstance(exc.extra, list) else []
        named = [f"{p.get('key') or p.get('source')}: {p.get('message')}" for p in extra]
        detail = "; ".join(named) if named else exc.detail
        # A path segment out of its parameter's domain names nothing that can exist.
        status = 404 if extra and all(p.get("source") == "path" for p in extra) else 400
    elif isinstance(exc, HTTPException):
        status, detail, extra = exc.status_code, exc.detail, exc.extra if exc.extra is not None else {}
        headers.update(exc.headers or {})
    else:
        log.error("http.unhandled_error", path=request.scope.get("path"), exc_info=exc)
        status, detail, extra = 500, "Internal Server Error", {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="sunotrack"'
    # A detail may quote a notify_hook (a yarl error, a refusal): never with its password.
    body = {"status_code": status, "detail": mask_credentials(detail), "extra": mask_json(extra)}
    if str(request.scope.get("path", "")).startswith(RELAY_FRONT_PREFIX):
        # The relay's own error keys too, for clients written against the relay.
        code = extra.get("code") if isinstance(extra, dict) else None
        body |= {"code": code or f"http_{status}", "message": body["detail"], "data": None}
    return Response(body, status_code=status, headers=headers)


class CheckedRequest(Request[Any, Any, Any]):
    """Every JSON body is checked (depth, NUL) before a handler sees any of it."""

    async def json(self) -> Any:
        try:
            value = await super().json()
        except RecursionError:
            raise too_deep(await self.body()) from None
        check_json(value)
        return value


async def provide_session(
    request: Request[Any, Any, Any], runtime: AppRuntime
) -> AsyncIterator[AsyncSession]:
    """The request owns the transaction: committed after the handler returns, rolled back if it raises.
    A route marked AUTOCOMMIT runs each statement on its own (service.api.connection)."""
    db = request_connection(request)
    connection = await db.get()
    if request.route_handler.opt.get(AUTOCOMMIT):
        await connection.execution_options(isolation_level="AUTOCOMMIT")
    session = runtime.sessions(bind=connection)
    try:
        yield session
        await session.commit()
    except BaseException:
        await session.rollback()
        raise
    finally:
        await session.close()
        await db.release()


def provide_runtime(request: Request[Any, Any, Any]) -> Runtime:
    return scope_runtime(request.scope)


def provide_dispatcher(request: Request[Any, Any, Any]) -> Dispatcher | None:
    dispatcher: Dispatcher | None = request.app.state.dispatcher
    return dispatcher


def create_app(settings: Settings, *, role: Role = "all") -> Litestar:
    """The `api` role answers every route and runs no jobs; `worker` runs the jobs and answers only
    the health routes; `all` does both. Raises ConfigError for a role the settings cannot run."""
    check_role(settings, role)
    run_jobs = role in JOB_ROLES
    serves_api = role != "worker"  # a worker answers only the health routes, so no OpenAPI document

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_runtime(settings, role=role) as runtime:
            app.state.runtime = runtime
            app.state.dispatcher = None
            # The feed is part of serving the API (GET /events), not a job: it runs with or without them.
            sequencer = Sequencer(runtime.engine, tick_s=settings.feed_tick_s)
            app.state.feed_watcher = watcher = FeedWatcher(driver_dsn(runtime.engine))
            stoppables: list[Poller | Dispatcher | Sequencer | FeedWatcher] = [watcher, sequencer]
            sequencer.start()
            if settings.db_transaction_pooler:
                # A transaction pooler cannot carry LISTEN: streams wake on the feed's last id instead.
                watcher.start_polling(runtime.engine, settings.feed_tick_s)
            else:
                watcher.start()
            try:
                if run_jobs:
                    if runtime.relay is None:
                        log.warning("poll.disabled", relay=DEFAULT_RELAY, reason="SUNO_BASE_URL is not set")
                    stoppables.extend(await start_pollers(runtime))
                    app.state.dispatcher = await start_dispatcher(runtime)
                    stoppables.append(app.state.dispatcher)
                log.info("app.started", instance_id=runtime.instance_id, role=role)
                yield
            finally:
                # Jobs stop claiming and drain before the scheduler that ticks them and what they use go.
                for job in reversed(stoppables):
                    await job.stop()
                log.info("app.stopped")

    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    routes: list[Any] = [*HEALTH_ROUTES]
    if serves_api:
        routes += [
            *CALLBACK_ROUTES,
            *DASHBOARD_ROUTES,
            Router(
                path="/",
                route_handlers=[
                    *TASK_ROUTES,
                    *EVENT_ROUTES,
                    *DELIVERY_ROUTES,
                    *STATS_ROUTES,
                    *CLIENT_ROUTES,
                    *RELAY_FRONT_ROUTES,
                ],
                middleware=[RequireToken],
                dependencies={
                    "caller": Provide(provide_caller, sync_to_thread=False),
                    "owner": Provide(provide_owner),
                },
            ),
        ]
    app = Litestar(
        route_handlers=routes,
        lifespan=[lifespan],
        dependencies={
            "runtime": Provide(provide_runtime, sync_to_thread=False),
            "dispatcher": Provide(provide_dispatcher, sync_to_thread=False),
            "session": Provide(provide_session),
        },
        exception_handlers={Exception: error_response},
        request_class=CheckedRequest,
        middleware=[OneConnection],
        before_send=[allow_every_method],
        request_max_body_size=REQUEST_MAX_BODY_BYTES,
        # Logging is configured once by the CLI (structlog); Litestar's own config would override it.
        logging_config=None,
        openapi_config=OpenAPIConfig(
            title="sunotrack",
            version="0.1.0",
            path="/schema",
            components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}),
            security=[{"bearer": []}],
        )
        if serves_api
        else None,
    )
    if serves_api:
        document_contract(app, relays=list(settings.relays))
    return app
