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

from service.config import Settings
from service.db import (
    SessionMaker,
    check_connection,
    create_engine,
    create_session_maker,
    migrate,
    start_embedded_postgres,
)
from service.upstream.client import RelayClient
from service.vocabulary import DEFAULT_RELAY

# A callback's poll holds a connection of the pool (10 + 10 overflow by default, shared with the
# poller and the API) while it asks the relay: a burst of callbacks may take this many.
CALLBACK_POLLS = 4


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
    # Relay callbacks' polls in flight in this process (api.callbacks): each holds a pooled connection.
    callback_polls: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CALLBACK_POLLS))

    @property
    def relay(self) -> RelayClient | None:
        """The `default` relay's client (None when SUNO_BASE_URL is unset)."""
        return self.relays.get(DEFAULT_RELAY)


@asynccontextmanager
async def open_runtime(settings: Settings, *, pool_size: int = 10) -> AsyncIterator[Runtime]:
    """Connect (starting the embedded database when DATABASE_URL is unset), migrate, and build the
    shared HTTP session, relay client and started scheduler; dispose of all of it on exit."""
    embedded = None
    database_url = settings.database_url
    if database_url is None:
        database_url, embedded = start_embedded_postgres(settings.data_dir)
    engine = create_engine(database_url, pool_size=pool_size)
    # A connection pool of its own for each relay: a slow one cannot hold another's connections.
    https: list[aiohttp.ClientSession] = []
    scheduler = AsyncIOScheduler(timezone="UTC")
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
        yield Runtime(
            settings=settings,
            engine=engine,
            sessions=create_session_maker(engine),
            relays=relays,
            scheduler=scheduler,
            instance_id=f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}",
        )
    finally:
        if scheduler.running:
            scheduler.shutdown(wait=False)
        for http in https:
            await http.close()
        await engine.dispose()
        if embedded is not None:
            embedded.cleanup()
