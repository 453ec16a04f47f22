"""The long-lived resources the lifespan builds once and every edge and job shares."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

# Real imports, not TYPE_CHECKING ones: Litestar resolves these annotations when it injects a Runtime.
import aiohttp
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.ext.asyncio import AsyncEngine

from service.clients.service import TokenCache
from service.config import ConfigError, Role, Settings
from service.db import (
    SessionMaker,
    check_connection,
    create_engine,
    create_session_maker,
    migrate,
    start_embedded_postgres,
)
from service.tracking.service import Registrar
from service.upstream.client import RelayClient
from service.vocabulary import DEFAULT_RELAY

# A callback's poll holds a connection of the pool (shared with the poller and the API) while it asks
# the relay: a burst of callbacks may take this many.
CALLBACK_POLLS = 4

JOB_ROLES = frozenset({"all", "worker"})
# Connections of their own, outside the engine's pool: the webhook dispatcher's (claims, results,
# LISTEN), in the roles that run jobs; the event feed's LISTEN, in every role (not through a
# transaction pooler, which cannot carry it).
DISPATCHER_CONNECTIONS = 3
FEED_CONNECTIONS = 1


def own_connections(settings: Settings, role: Role) -> int:
    feed = 0 if settings.db_transaction_pooler else FEED_CONNECTIONS
    return feed + (DISPATCHER_CONNECTIONS if role in JOB_ROLES else 0)


def engine_pool_size(settings: Settings, role: Role) -> int:
    """The engine's share of SUNOTRACK_DB_POOL_SIZE: what the connections of their own leave."""
    return settings.db_pool_size - own_connections(settings, role)


def check_role(settings: Settings, role: Role) -> None:
    """Refuse, naming the variable, what this role cannot run with."""
    jobs = role in JOB_ROLES
    if jobs and settings.db_transaction_pooler:
        raise ConfigError(
            f"SUNOTRACK_DB_TRANSACTION_POOLER=true needs --role api (not {role}): the poller holds row "
            "locks across a page and the dispatcher LISTENs, which a transaction pooler cannot carry; "
            "point the workers' DATABASE_URL at Postgres itself"
        )
    # Of the engine's pool, one connection for each relay's poller and one for the rest (requests,
    # the feed's numbering, the dispatcher's sweep, /readyz).
    pollers = max(1, sum(relay.base_url is not None for relay in settings.relays.values())) if jobs else 0
    own = own_connections(settings, role)
    needed = own + pollers + 1
    if settings.db_pool_size < needed:
        parts = [f"{DISPATCHER_CONNECTIONS} for the webhook dispatcher"] if jobs else []
        if not settings.db_transaction_pooler:
            parts.append("one for the event feed's LISTEN")
        if pollers:
            parts.append("one for each relay's poller" if pollers > 1 else "one for the poller")
        parts.append("one for the rest")
        raise ConfigError(
            f"SUNOTRACK_DB_POOL_SIZE={settings.db_pool_size} is too small for --role {role}: it needs at "
            f"least {needed} ({', '.join(parts)})"
        )


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: SessionMaker
    # The relays this process polls, by name (`default` is missing when SUNO_BASE_URL is unset).
    relays: dict[str, RelayClient]
    scheduler: AsyncIOScheduler
    # Identifies this process in logs and leases (host:pid:random).
    instance_id: str
    # Clients' tokens looked up lately, for calls that take nothing from a bucket (api.auth).
    tokens: TokenCache
    # Single registrations grouped into one statement per client (api.tasks).
    registrar: Registrar
    # Relay callbacks' polls in flight in this process (api.callbacks): each holds a pooled connection.
    callback_polls: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CALLBACK_POLLS))

    @property
    def relay(self) -> RelayClient | None:
        """The `default` relay's client (None when SUNO_BASE_URL is unset)."""
        return self.relays.get(DEFAULT_RELAY)


@asynccontextmanager
async def open_runtime(settings: Settings, *, role: Role = "all") -> AsyncIterator[Runtime]:
    """Connect (starting the embedded database when DATABASE_URL is unset), migrate, and build the
    shared HTTP session, relay client and started scheduler; dispose of all of it on exit."""
    embedded = None
    database_url = settings.database_url
    if database_url is None:
        database_url, embedded = start_embedded_postgres(settings.data_dir)
    engine = create_engine(
        database_url,
        pool_size=engine_pool_size(settings, role),
        transaction_pooler=settings.db_transaction_pooler,
    )
    # A connection pool of its own for each relay: a slow one cannot hold another's connections.
    https: list[aiohttp.ClientSession] = []
    scheduler = AsyncIOScheduler(timezone="UTC")
    registrar = None
    try:
        await check_connection(engine, "DATABASE_URL" if embedded is None else "SUNOTRACK_DATA_DIR")
        await migrate(engine)
        relays = {}
        for relay in settings.relays.values():
            if relay.base_url is None:
                continue
            concurrency = relay.concurrency or settings.upstream_concurrency
            http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=concurrency * 2, ttl_dns_cache=60),
                raise_for_status=False,
            )
            https.append(http)
            relays[relay.name] = RelayClient(
                http,
                base_url=relay.base_url,
                api_key=relay.api_key.get_secret_value() if relay.api_key else None,
                batch_size=settings.poll_batch_size,
                max_in_flight=concurrency,
                timeout_s=settings.upstream_timeout_s,
                dialect=relay.dialect,
                name=relay.name,
            )
        scheduler.start()
        registrar = Registrar(engine, settings)
        yield Runtime(
            settings=settings,
            engine=engine,
            sessions=create_session_maker(engine),
            relays=relays,
            scheduler=scheduler,
            instance_id=f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}",
            tokens=TokenCache(settings.token_cache_s),
            registrar=registrar,
        )
    finally:
        if registrar is not None:
            await registrar.stop()
        if scheduler.running:
            scheduler.shutdown(wait=False)
        for http in https:
            await http.close()
        await engine.dispose()
        if embedded is not None:
            embedded.cleanup()
