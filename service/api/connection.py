"""One pooled connection per request (docs/design.md, "One connection per request").

The token check's lookup (service.api.auth) and the handler's session share it, so a request checks out
once. It is returned when the handler's unit of work ends (service.app.provide_session), or, whatever
happened, when the request is over.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from service.db import RequestConnection
from service.runtime import Runtime

_KEY = "sunotrack_connection"
# Route handlers with this in their `opt` run each statement on its own, without BEGIN and COMMIT (two
# round trips fewer): reads (read committed gives each statement its own snapshot inside a transaction
# too).
AUTOCOMMIT = "autocommit"


def scope_runtime(scope: Scope) -> Runtime:
    """The app's runtime, built in its lifespan (service.app), from a request's scope: for the edge's
    hot paths, which read it without a dependency (each costs a request a resolution step)."""
    runtime: Runtime = scope["litestar_app"].state.runtime
    return runtime


class OneConnection:
    """Every HTTP request's connection, returned when the request is over. A plain ASGI middleware
    (Litestar's `ASGIMiddleware` base adds a wrapper and its bypass checks to every request: docs/design.md,
    "The layers of a request")."""

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        db = RequestConnection(scope_runtime(scope).engine)
        scope["state"][_KEY] = db
        try:
            await self.app(scope, receive, send)
        finally:
            await db.release()


def request_connection(connection: ASGIConnection[Any, Any, Any, Any]) -> RequestConnection:
    return scope_connection(connection.scope)


def scope_connection(scope: Scope) -> RequestConnection:
    db: RequestConnection = scope["state"][_KEY]
    return db
