"""Database plumbing: declarative base, engine and session factories, embedded server, migrations."""

from __future__ import annotations

import asyncio
import operator
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import structlog
from sqlalchemy import Column, LargeBinary, MetaData, Table, event, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, MissingGreenlet, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import PoolProxiedConnection, QueuePool
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util.concurrency import in_greenlet

from service.config import ConfigError

log = structlog.get_logger()

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Any constant works; it only has to be the same in every process sharing the database.
MIGRATION_LOCK_KEY = 0x5A5A_7EAC


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


SessionMaker = async_sessionmaker[AsyncSession]


def _unnamed_statement() -> str:
    return ""


def create_engine(database_url: str, *, pool_size: int, transaction_pooler: bool = False) -> AsyncEngine:
    """At most `pool_size` connections, never more (no overflow): the process's share of the server's
    max_connections is what its configuration says."""
    server_settings = {"application_name": "sunotrack"}
    connect_args: dict[str, Any] = {"server_settings": server_settings}
    if transaction_pooler:
        # PgBouncer in transaction mode hands each transaction to whichever server connection is free:
        # a named prepared statement may be missing there, or taken by another client's. Unnamed ones
        # live from Parse to Execute, inside one transaction. It also refuses startup parameters it
        # does not know (jit), so only the application name goes along.
        connect_args |= {
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": _unnamed_statement,
        }
    else:
        # JIT planning costs more than it saves on the short statements this service runs.
        server_settings["jit"] = "off"
    engine = create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=0,
        # No ping at checkout (three round trips with asyncpg): a connection Postgres dropped fails its
        # first statement instead, which invalidates the whole pool and answers 503 (docs/design.md,
        # "One connection per request").
        pool_pre_ping=False,
        connect_args=connect_args,
    )
    event.listen(engine.sync_engine, "do_connect", _connect_in_greenlet)
    return engine


def _connect_in_greenlet(*_: Any) -> None:
    """A connect outside a greenlet (RequestConnection's checkout of an idle connection that must
    reconnect first) stops before the dialect makes the driver's connect coroutine: the dialect's own
    MissingGreenlet comes after it, and that coroutine, never awaited, warns once collected."""
    if not in_greenlet():
        raise MissingGreenlet("a new connection needs greenlet_spawn")


def create_session_maker(engine: AsyncEngine) -> SessionMaker:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(sessions: SessionMaker) -> AsyncIterator[AsyncSession]:
    """The unit of work of an edge (request handler or job): commit once at the end, roll back on error."""
    async with sessions() as session, session.begin():
        yield session


class RequestConnection:
    """A request's one pooled connection: checked out at its first use (the token check's lookup, or the
    handler's session) and returned once the request's unit of work is over, so a request costs one
    checkout whatever it does (docs/design.md, "One connection per request"). A request that only runs
    driver statements (a GET of a task, a registration) holds the pool's connection alone, without
    SQLAlchemy's Connection around it ("Read figures"); a session's request gets that one wrapped."""

    __slots__ = ("_checkout", "_connection", "_engine", "_pooled")

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pooled: PoolProxiedConnection | None = None
        self._connection: AsyncConnection | None = None
        # Litestar resolves a route's independent dependencies concurrently (the session, the owner):
        # the first to ask checks out, the others wait for that one connection.
        self._checkout = asyncio.Lock()

    async def get(self) -> AsyncConnection:
        if self._connection is None:
            async with self._checkout:
                if self._connection is None:
                    pooled = self._pooled or await self._check_out()
                    self._connection = AsyncConnection(
                        self._engine, Connection(self._engine.sync_engine, pooled)
                    )
        return self._connection

    async def driver(self) -> asyncpg.Connection:
        """The connection's driver, for statements SQLAlchemy need not see (run outside any session)."""
        if self._connection is not None:
            return await _driver(self._connection)
        if self._pooled is None:
            async with self._checkout:
                if self._pooled is None:
                    self._pooled = await self._check_out()
        driver: asyncpg.Connection = self._pooled.driver_connection
        return driver

    async def _check_out(self) -> PoolProxiedConnection:
        pool = self._engine.pool
        if isinstance(pool, QueuePool) and pool.checkedin():
            try:
                # An idle connection needs no await, so no greenlet (what the async engine spawns for
                # each checkout and return).
                return pool.connect()
            except MissingGreenlet:
                pass  # it must reconnect first (Postgres restarted, or the pool was invalidated)
        pooled: PoolProxiedConnection = await greenlet_spawn(pool.connect)
        return pooled

    async def fetchrow(self, query: str, *args: Any) -> Any:
        """One statement on its own (autocommit), on the driver: before the request's transaction
        begins, and without SQLAlchemy on the way. A connection Postgres closed while it sat in the pool
        (a restart: nothing pings at checkout) is dropped and the statement tried on the next one; the
        pool replaces each with a new connection, which fails at once while Postgres is away."""
        return await self._retried("fetchrow", query, args)

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        """fetchrow's rows, all of them (the same autocommit and retry)."""
        rows: list[Any] = await self._retried("fetch", query, args)
        return rows

    async def _retried(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        pool = self._engine.pool
        tries = (pool.size() if isinstance(pool, QueuePool) else 0) + 1
        for tried in range(1, tries + 1):
            driver = await self.driver()
            try:
                return await getattr(driver, method)(query, *args)
            except _CONNECTION_ERRORS as exc:
                if tried == tries or not (driver.is_closed() or _ended_by_the_server(exc)):
                    raise
                driver.terminate()  # closed, so that release() drops it rather than pool it again
                await self.release()
        raise AssertionError("unreachable")

    async def release(self) -> None:
        connection, self._connection = self._connection, None
        pooled, self._pooled = self._pooled, None
        if connection is not None:
            # A connection whose socket went (seen by the driver, out of SQLAlchemy's sight) is not
            # pooled again.
            if not connection.invalidated and (await _driver(connection)).is_closed():
                await connection.invalidate()
            await connection.close()
        elif pooled is not None:
            driver = pooled.driver_connection
            if pooled.is_valid and driver is not None and not driver.is_closed():
                # Nothing to roll back: SQLAlchemy's adapter began no transaction on it, so no await.
                pooled.close()
            else:
                await greenlet_spawn(_discard, pooled)


# What a statement on a connection Postgres dropped raises: the driver's own errors, not Postgres's.
_CONNECTION_ERRORS = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


def _ended_by_the_server(exc: Exception) -> bool:
    """Postgres ended the session (a restart, pg_terminate_backend) and the driver has read its last
    message but not yet the end of the socket: that message, arriving while idle, left the protocol
    refusing every statement, each before anything is sent (so none ran)."""
    return isinstance(exc, asyncpg.exceptions.InternalClientError) and str(exc).startswith(
        "cannot switch to state"
    )


def _discard(pooled: PoolProxiedConnection) -> None:
    pooled.invalidate()
    pooled.close()


async def _driver(connection: AsyncConnection) -> asyncpg.Connection:
    sync = connection.sync_connection
    if sync is not None and not sync.closed and not sync.invalidated:
        # It holds its pooled connection: reaching it cannot reconnect, so it needs no greenlet (what
        # get_raw_connection() spawns for every call, twice a request).
        pooled = sync.connection
    else:
        pooled = await connection.get_raw_connection()
    driver: asyncpg.Connection = pooled.driver_connection
    return driver


async def database_now(session: AsyncSession) -> datetime:
    """The transaction's time on the database's clock: the one clock polls are scheduled by."""
    now: datetime = (await session.execute(text("SELECT now()"))).scalar_one()
    return now


async def check_connection(engine: AsyncEngine, variable: str) -> None:
    """Connect once, before anything else uses the engine: a database that cannot be reached stops
    start-up with a ConfigError naming `variable` and the cause instead of a driver traceback."""
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
    except (OSError, DBAPIError) as exc:  # asyncpg's own errors arrive wrapped in DBAPIError
        reason = connection_failure(exc, engine.url)
        password = engine.url.password
        if password:
            reason = reason.replace(password, "***")
        raise ConfigError(f"{variable}: {reason}") from None


# The server is gone, going or not there yet (SQLSTATE classes 08 and 53300, 57P01-57P03), as opposed to
# a statement it refused: a request that meets one answers 503 instead of 500.
_UNAVAILABLE = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    OSError,  # refused, reset, no socket file, timed out (TimeoutError is one)
)


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached now (rather than that a statement failed)."""
    if isinstance(exc, SQLAlchemyTimeout):  # every pooled connection busy past the pool's timeout
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        if exc.orig is not None:
            exc = exc.orig.__cause__ or exc.orig  # the driver's own error, under SQLAlchemy's wrappers
    if isinstance(exc, asyncpg.exceptions.InterfaceError):
        return "connection is closed" in str(exc)  # the socket went while the connection was pooled
    return isinstance(exc, _UNAVAILABLE)


def connection_failure(exc: BaseException, url: URL) -> str:
    """Why a connection failed, in one line, from the driver's error (which never holds the password)."""
    host = url.host or url.query.get("host") or "the default socket"
    where = f"{host}:{url.port or 5432}" if url.host else str(host)
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig.__cause__ or exc.orig  # the driver's own error, under SQLAlchemy's wrappers
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host {url.host!r} ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where} (is PostgreSQL listening there?)"
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} in time"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    message = " ".join(str(exc).split())
    return f"{where} refused the connection: {message}"


def start_embedded_postgres(data_dir: Path) -> tuple[str, Any]:
    """Start (or re-attach to) the embedded PostgreSQL kept under data_dir; returns (async URL, handle)."""
    try:
        runtime_dir = data_dir.resolve() / "run"
        runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        runtime_dir.chmod(0o700)
        # pgserver reads this at import time; without it it falls back to a shared /tmp directory.
        os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime_dir))
        import pgserver  # noqa: PLC0415  (import is slow and has side effects: only when the embedded server is used)

        pg_dir = data_dir.resolve() / "pg"
        pg_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(pg_dir, cleanup_mode="stop")
    except OSError as exc:
        raise ConfigError(f"SUNOTRACK_DATA_DIR: cannot keep the embedded PostgreSQL there: {exc}") from None
    uri: str = server.get_uri()
    log.info("db.embedded_started", data_dir=str(pg_dir))
    return uri.replace("postgresql://", "postgresql+asyncpg://", 1), server


def alembic_config(database_url: str) -> Any:
    from alembic.config import Config  # noqa: PLC0415  (keep alembic off the import path of the API)

    root = Path(__file__).resolve().parent.parent
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.attributes["database_url"] = database_url
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Upgrade to head; an advisory lock makes concurrent start-ups take turns instead of racing."""
    from alembic import command  # noqa: PLC0415

    config = alembic_config(engine.url.render_as_string(hide_password=False))

    def upgrade(connection: Any) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        await connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        await connection.run_sync(upgrade)
    log.info("db.migrated")


# --- rows read and written by name --------------------------------------------------------------------

_Shape = TypeVar("_Shape")


def rows_as(keys: Sequence[str], rows: Iterable[Sequence[Any]], shape: type[_Shape]) -> list[_Shape]:
    """Each row as `shape` (a NamedTuple of two fields or more), every field filled from the column of
    its name. The positions are looked up once per result, so this costs what `shape._make(row)` does,
    and a statement whose columns move or lose a name fails here instead of swapping data silently."""
    fields: tuple[str, ...] = shape._fields  # type: ignore[attr-defined]
    make: Callable[[Any], _Shape] = shape._make  # type: ignore[attr-defined]
    missing = [name for name in fields if name not in keys]
    if missing:
        raise LookupError(f"{shape.__name__}: the result has no column {', '.join(missing)}")
    pick = operator.itemgetter(*(list(keys).index(name) for name in fields))
    return [make(pick(row)) for row in rows]


def sql_type(column: Column[Any]) -> str:
    return str(column.type.compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]


def recordset(table: Table, names: Sequence[str]) -> str:
    """The column definitions of `json_to_recordset(...) AS x(...)` for these columns of `table`.
    bytea travels in JSON as base64 text (msgspec's encoding of bytes): see `recordset_value`."""
    return ", ".join(
        f"{name} text" if isinstance(table.c[name].type, LargeBinary) else f"{name} {sql_type(table.c[name])}"
        for name in names
    )


def recordset_value(table: Table, name: str, alias: str) -> str:
    """A recordset column as the table stores it."""
    if isinstance(table.c[name].type, LargeBinary):
        return f"decode({alias}.{name}, 'base64')"
    return f"{alias}.{name}"


# --- LISTEN on a connection of its own (the dispatcher's wake-ups, the event feed's) -------------------

LISTEN_HEARTBEAT_S = 10.0
LISTEN_RETRY_MAX_S = 5.0
# What a lost or refused database connection raises, through SQLAlchemy or straight from the driver.
DB_ERRORS = (
    SQLAlchemyError,
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def driver_dsn(engine: AsyncEngine) -> str:
    """The engine's database as a plain postgresql:// DSN for asyncpg (query options such as host kept)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


async def listen_forever(
    dsn: str,
    channel: str,
    on_notify: Callable[..., None],
    *,
    on_listening: Callable[[], None],
    application_name: str,
    logger: Any,
    events: str,
) -> None:
    """LISTEN on `channel` until cancelled, reconnecting with backoff. `on_listening` runs each time the
    listener is (again) in place: whatever was notified while it was not must be looked for then."""
    backoff = 0.1
    while True:
        try:
            connection = await asyncpg.connect(
                dsn, timeout=5, server_settings={"application_name": application_name}
            )
        except DB_ERRORS as exc:
            logger.warning(f"{events}.listen_connect_failed", error=str(exc), retry_in_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, LISTEN_RETRY_MAX_S)
            continue
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _, lost=lost: lost.set())
        try:
            await connection.add_listener(channel, on_notify)
            backoff = 0.1
            on_listening()
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), LISTEN_HEARTBEAT_S)
                except TimeoutError:
                    # A dead peer does not always close the socket: ask, and reconnect if no answer.
                    await connection.fetchval("SELECT 1", timeout=5)
            logger.warning(f"{events}.listen_lost")
        except DB_ERRORS as exc:
            logger.warning(f"{events}.listen_lost", error=str(exc))
        finally:
            connection.terminate()
