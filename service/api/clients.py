"""Client management for the admin: create, list, revoke, rotate a token or a webhook secret."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import get, post
from litestar.params import JSONBody, PathParameter, QueryParameter

from service.api import AppCaller, AppRuntime, DbSession
from service.api.auth import require_admin
from service.api.schemas import ClientList, ClientOut, CreateClient, client_out
from service.clients import service
from service.clients.service import ClientIssued, SecretRotated, TokenRotated

ClientNamePath = Annotated[str, PathParameter(description="The client's name", max_length=64)]


@post("/api/v1/clients", status_code=201, summary="Create a client: its token is in this answer only")
async def create_client(
    data: JSONBody[CreateClient], session: DbSession, runtime: AppRuntime, caller: AppCaller
) -> ClientIssued:
    require_admin(caller)
    return await service.create_client(session, **msgspec.structs.asdict(data), settings=runtime.settings)


@get("/api/v1/clients", summary="Every client, by name (never a token or secret)")
async def list_clients(session: DbSession, caller: AppCaller) -> ClientList:
    require_admin(caller)
    return ClientList(
        items=[client_out(client, count) for client, count in await service.list_clients(session)]
    )


@get("/api/v1/clients/{name:str}", summary="One client")
async def read_client(name: ClientNamePath, session: DbSession, caller: AppCaller) -> ClientOut:
    require_admin(caller)
    client = await service.get_client(session, name)
    return client_out(client, await service.task_count(session, client))


@post(
    "/api/v1/clients/{name:str}/revoke",
    status_code=200,
    summary="Revoke a client's token; its tasks keep being tracked and delivered",
    description="The token stops working at once through this process, and within "
    "SUNOTRACK_TOKEN_CACHE_S (default 2 s) through every other.",
)
async def revoke_client(
    name: ClientNamePath, session: DbSession, runtime: AppRuntime, caller: AppCaller
) -> ClientOut:
    require_admin(caller)
    client = await service.revoke_client(session, name)
    runtime.tokens.clear()
    return client_out(client, await service.task_count(session, client))


@post(
    "/api/v1/clients/{name:str}/rotate-token",
    status_code=200,
    summary="A new token for a client (in this answer only); the old one stops working",
    description="The old token stops working at once through this process, and within "
    "SUNOTRACK_TOKEN_CACHE_S (default 2 s) through every other.",
)
async def rotate_token(
    name: ClientNamePath, session: DbSession, runtime: AppRuntime, caller: AppCaller
) -> TokenRotated:
    require_admin(caller)
    rotated = await service.rotate_token(session, name)
    runtime.tokens.clear()
    return rotated


@post(
    "/api/v1/clients/{name:str}/rotate-secret",
    status_code=200,
    summary="A new webhook secret; the old one keeps signing too for grace_s (default 24 h)",
)
async def rotate_secret(
    name: ClientNamePath,
    session: DbSession,
    caller: AppCaller,
    grace_s: Annotated[
        float,
        QueryParameter(
            ge=0, le=service.MAX_SECRET_GRACE_S, description="How long the old secret keeps signing"
        ),
    ] = service.DEFAULT_SECRET_GRACE_S,
) -> SecretRotated:
    require_admin(caller)
    return await service.rotate_secret(session, name, grace_s=grace_s)


CLIENT_ROUTES = [create_client, list_clients, read_client, revoke_client, rotate_token, rotate_secret]
