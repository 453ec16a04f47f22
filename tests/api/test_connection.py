"""The request's one pooled connection (service.api.connection, service.db.RequestConnection) after
Postgres closed the pool's connections while they sat idle."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import struct
import termios
from collections.abc import AsyncIterator
from types import TracebackType

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import RequestConnection, create_engine
from tests.conftest import _driver_url, auth_headers, wait_until

# This process's own connections to the test's database: the app's pool (its application_name) only.
_OURS = "datname = current_database() AND application_name = 'sunotrack' AND pid <> pg_backend_pid()"


async def test_the_hot_paths_answer_on_new_connections_once_postgres_closed_the_pooled_ones(
    api: httpx.AsyncClient, database_url: str
) -> None:
    """The token check, a GET of a task and a registration each meet a pooled connection Postgres closed
    and go on, on a new one. The pool reconnects a connection it has invalidated at its next checkout;
    that checkout must not leave the driver's connect coroutine unawaited (a RuntimeWarning, an error in
    this suite, raised where nothing catches it: collected at the end)."""
    issued = (await api.post("/api/v1/clients", json={"name": "shop"})).json()
    client = auth_headers(issued["token"])
    assert (await api.post("/api/v1/tasks", json={"task_id": "t-1"}, headers=client)).status_code == 201
    # Several at once, so that the pool holds several connections.
    reads = await asyncio.gather(*(api.get("/api/v1/tasks/t-1", headers=client) for _ in range(4)))
    assert [read.status_code for read in reads] == [200] * 4

    admin = await asyncpg.connect(_driver_url(database_url))
    try:
        kill = f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {_OURS}"
        killed = await admin.fetchval(kill)
        assert killed >= 1

        async def gone() -> bool:
            return await admin.fetchval(f"SELECT count(*) FROM pg_stat_activity WHERE {_OURS}") == 0

        await wait_until(gone, what="the app's connections to leave pg_stat_activity")
    finally:
        await admin.close()

    for _ in range(killed + 1):
        read = await api.get("/api/v1/tasks/t-1", headers=client)
        assert read.status_code == 200, read.text
    registered = await api.post("/api/v1/tasks", json={"task_id": "t-2"}, headers=client)
    assert registered.status_code == 201, registered.text
    gc.collect()


class HeldEnd:
    """A loopback TCP proxy to the test's Postgres that passes every byte on but holds back the end of
    a session Postgres closed, until `release` is set: the driver reads the server's last message and
    not yet the end of the socket, as it does for one turn of the event loop after a restart."""

    def __init__(self, database_url: str) -> None:
        target = make_url(database_url)
        self._socket_dir = target.query.get("host")
        self._host, self._port = target.host or "127.0.0.1", target.port or 5432
        self._target = target
        self.ended = asyncio.Event()
        self.release = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> HeldEnd:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = self._target.set(host="127.0.0.1", port=port, query={}).render_as_string(
            hide_password=False
        )
        return self

    async def __aexit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release.set()
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        if isinstance(self._socket_dir, str):
            reader, server = await asyncio.open_unix_connection(f"{self._socket_dir}/.s.PGSQL.{self._port}")
        else:
            reader, server = await asyncio.open_connection(self._host, self._port)
        self._writers += [client, server]
        for pipe in (self._pipe(client_reader, server, hold=False), self._pipe(reader, client, hold=True)):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, hold: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            if hold:
                self.ended.set()
                await self.release.wait()
            sink.close()


def unread_bytes(driver: asyncpg.Connection) -> int:
    """What the kernel holds for the driver that it has not read yet (the transport is asyncpg's own)."""
    sock = driver._transport.get_extra_info("socket")
    count: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    return count


@pytest.fixture
async def ended_session(database_url: str) -> AsyncIterator[tuple[AsyncEngine, asyncpg.Connection, int]]:
    """An engine whose one pooled connection's session Postgres ended: the driver has read the
    server's last message, not yet the end of the socket (HeldEnd holds it). Yields the engine, that
    driver connection and the ended session's pid."""
    async with HeldEnd(database_url) as proxy:
        engine = create_engine(proxy.url, pool_size=2)
        try:
            first = RequestConnection(engine)
            pid: int = (await first.fetchrow("SELECT pg_backend_pid() AS pid"))["pid"]
            pooled = await first.driver()
            await first.release()
            admin = await asyncpg.connect(_driver_url(database_url))
            try:
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            finally:
                await admin.close()

            async def last_message_read() -> bool:
                return proxy.ended.is_set() and unread_bytes(pooled) == 0

            await wait_until(last_message_read, what="the driver to read the session's last message")
            assert not pooled.is_closed()
            yield engine, pooled, pid
        finally:
            proxy.release.set()  # closing the pool waits for each session's end
            await engine.dispose()


async def test_a_statement_after_postgres_ended_the_idle_session_runs_on_a_new_connection(
    ended_session: tuple[AsyncEngine, asyncpg.Connection, int],
) -> None:
    """The driver refuses any statement on such a connection ('cannot switch to state'; it was an
    InternalClientError, a 500). The token check's, a GET's or a registration's statement goes to a new
    connection instead. (A session's statement is not tried again: SQLAlchemy invalidates the
    connection, and the API answers 503 with Retry-After, as for any connection Postgres dropped.)"""
    engine, pooled, pid = ended_session
    second = RequestConnection(engine)
    try:
        row = await second.fetchrow("SELECT pg_backend_pid() AS pid")
    finally:
        await second.release()

    assert row["pid"] != pid
    assert pooled.is_closed()  # dropped, not pooled again
