"""Who is asking, and whose tasks a request may see.

The token check (RequireToken) runs before anything else a route does (its body is not even read
yet): a request without a valid token is a 401 whatever else is wrong with it. The admin token is
compared in memory; a client's is looked up in one autocommit statement on the request's connection,
before its transaction begins, which on a registration also takes from the client's rate-limit
bucket, so a refused registration costs nothing more and the bucket's row lock is held for that
statement only. Other calls may find the token in the process's cache instead
(SUNOTRACK_TOKEN_CACHE_S: docs/design.md, "The token cache").
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Request
from litestar.di import NamedDependency
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException
from litestar.params import QueryParameter
from litestar.types import ASGIApp, Receive, Scope, Send

from service.api.connection import request_connection, scope_connection, scope_runtime
from service.clients.service import ADMIN, Caller, authenticate, client_ref
from service.errors import Forbidden, InvalidInput, RateLimited

# Route handlers with this in their `opt` take one registration from the client's bucket.
REGISTERS = "registers"
# Where RequireToken leaves the caller in the request's state.
CALLER = "caller"


class RequireToken:
    """The token check of every route under the API's router, before anything else the route does.

    A middleware rather than a Litestar guard: Litestar copies the route handler for every guard call,
    and that copy and the guard's connection object were about 5 % of a GET's CPU (docs/design.md,
    "Read figures"); a plain ASGI one, as OneConnection. Errors it raises become responses as every
    other (service.app.error_response).
    """

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            scope["state"][CALLER] = await identify(scope)
        await self.app(scope, receive, send)


async def identify(scope: Scope) -> Caller:
    runtime = scope_runtime(scope)
    # The first Authorization header, as Litestar's `headers.get` reads it (names arrive lower-cased).
    header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
    scheme, _sep, presented = header.decode("latin-1").partition(" ")
    token = presented.strip()
    if scheme.lower() != "bearer" or not token:
        raise NotAuthorizedException("missing bearer token in the Authorization header")
    admin = runtime.settings.admin_token
    if admin is not None and hmac.compare_digest(token.encode(), admin.get_secret_value().encode()):
        return ADMIN
    registers = bool(scope["route_handler"].opt.get(REGISTERS))
    found = await authenticate(
        scope_connection(scope),
        token,
        take=1 if registers else 0,
        default_rate=runtime.settings.client_rate,
        cache=runtime.tokens,
    )
    if found is None:
        raise NotAuthorizedException("invalid bearer token in the Authorization header")
    caller, wait_s = found
    if wait_s is not None:
        raise rate_limited(caller, wait_s)
    return caller


def rate_limited(caller: Caller, wait_s: float) -> RateLimited:
    return RateLimited(
        f"client {caller.name!r} is over its registration rate: retry in {wait_s:.2f} s",
        extra={"client": caller.name, "retry_after_s": round(wait_s, 3)},
        headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
    )


def provide_caller(request: Request[Any, Any, Any]) -> Caller:
    """Who is asking: set by RequireToken before the route's handler and dependencies run."""
    caller: Caller = request.scope["state"][CALLER]
    return caller


def require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise Forbidden("only the admin token (SUNOTRACK_ADMIN_TOKEN) may do this")


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose tasks a request addresses. A task route's task is `client_id`'s (None: the admin's own);
    a listing shows `client_id`'s, or every client's when `every_client` (the admin without ?client)."""

    caller: Caller
    client_id: int | None
    every_client: bool
    # Where client_id's tasks are polled unless a registration names another relay.
    relay: str

    @property
    def shows_client(self) -> bool:
        """Whether task JSON names the task's client (only the admin sees that)."""
        return self.caller.is_admin


ClientQuery = Annotated[
    str | None,
    QueryParameter(
        name="client",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Admin token only: the client whose task this is (lists: filter by client)",
    ),
]


async def provide_owner(
    request: Request[Any, Any, Any], caller: NamedDependency[Caller], client: ClientQuery = None
) -> Owner:
    """Without a session (a read that needs none makes none): the admin's ?client= by the driver."""
    if client is None or client == caller.name:
        return Owner(caller, caller.client_id, every_client=caller.is_admin, relay=caller.relay)
    if not caller.is_admin:
        raise InvalidInput("client: only the admin token addresses another client's tasks")
    client_id, relay = await client_ref(request_connection(request), client)
    return Owner(caller, client_id, every_client=False, relay=relay)


async def request_owner(request: Request[Any, Any, Any], client: str | None) -> Owner:
    """provide_owner without Litestar's dependency injection (two dependencies resolved per request),
    for a hot route that declares `client: ClientQuery` itself, so its OpenAPI document is the same."""
    return await provide_owner(request, provide_caller(request), client)
