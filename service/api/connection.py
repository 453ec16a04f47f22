"""One pooled connection per request (docs/design.md, "One connection per request").

The token check's lookup (service.api.auth) and the handler's session share it, so a request checks out
once. It is returned when the handler's unit of work ends (service.app.provide_session), or, whatever
happened, when the request is over.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
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


class OneConnection(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        db = RequestConnection(scope_runtime(scope).engine)
        scope.setdefault("state", {})[_KEY] = db
        try:
            await next_app(scope, receive, send)
        finally:
            await db.release()


def request_connection(connection: ASGIConnection[Any, Any, Any, Any]) -> RequestConnection:
    return scope_connection(connection.scope)


def scope_connection(scope: Scope) -> RequestConnection:
    db: RequestConnection = scope["state"][_KEY]
    return db
