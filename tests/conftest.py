"""Real PostgreSQL for every test: the embedded server by default, TEST_DATABASE_URL when set.

The schema is migrated once into a template database; each test that asks for `database_url` gets a
fresh copy (CREATE DATABASE ... TEMPLATE), so tests can commit for real, run pollers and several
processes, and never see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from service.config import Role, Settings
from service.db import create_engine, migrate, start_embedded_postgres
from service.upstream.fake import FakeRelay

if TYPE_CHECKING:
    from tests.webhooks.conftest import Receiver

TEST_ADMIN_TOKEN = "test-admin-token"
TEST_WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
RELAY_KEY = "test-relay-key"


def _driver_url(url: str, database: str | None = None) -> str:
    """asyncpg wants a plain postgresql:// URL; SQLAlchemy gets the +asyncpg one."""
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def _async_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield _driver_url(configured)
        return
    # Short path: the server's unix socket lives in this directory and socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="st-pg-", dir="/tmp"))
    url, server = start_embedded_postgres(root)
    try:
        yield _driver_url(url)
    finally:
        # A postgres left running would hold CI's output open and keep the run from finishing.
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@asynccontextmanager
async def scratch_database(server_url: str, *, template: str | None = None) -> AsyncIterator[str]:
    """Create a uniquely named database (a copy of `template` if given); yield its name; drop it."""
    name = f"st_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        copy = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{copy}')
        yield name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def template_database(postgres_server_url: str) -> AsyncIterator[str]:
    async with scratch_database(postgres_server_url) as name:
        engine = create_engine(_async_url(_driver_url(postgres_server_url, name)), pool_size=1)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()
        yield name


@pytest.fixture
async def database_url(postgres_server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated, empty database for this test (postgresql+asyncpg:// URL)."""
    async with scratch_database(postgres_server_url, template=template_database) as name:
        yield _async_url(_driver_url(postgres_server_url, name))


@pytest.fixture
def make_settings(database_url: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings with fast intervals and loopback everything; keyword overrides use the env var names."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "DATABASE_URL": database_url,
            "SUNOTRACK_DATA_DIR": str(tmp_path / "data"),
            "SUNO_BASE_URL": "http://127.0.0.1:9",
            "SUNO_API_KEY": "test-relay-key",
            "SUNOTRACK_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
            "SUNOTRACK_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
            "SUNOTRACK_ALLOW_PRIVATE_HOOKS": "true",
            "SUNOTRACK_POLL_MIN_INTERVAL_S": "0.05",
            "SUNOTRACK_POLL_MAX_INTERVAL_S": "0.2",
            "SUNOTRACK_POLL_TICK_S": "0.05",
            "SUNOTRACK_LEASE_S": "2",
            "SUNOTRACK_NOT_FOUND_GRACE_S": "0",
            "SUNOTRACK_WEBHOOK_RETRY_SCHEDULE": "0.05,0.1",
            "SUNOTRACK_WEBHOOK_SWEEP_S": "0.2",
        }
        values.update(overrides)
        return Settings.from_env(**values)

    return build


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


PGBOUNCER_INI = """\
[databases]
* = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 10
"""


@pytest.fixture(scope="session")
def pgbouncer(postgres_server_url: str) -> Iterator[str]:
    """Debian's pgbouncer on a loopback port in transaction pooling mode, in front of the test server:
    yields its URL (postgresql://, database `postgres`); any database name is passed through."""
    executable = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if executable is None:
        pytest.fail("pgbouncer is not installed (apt-get install -y pgbouncer; .ci/run does it)")
    server = make_url(postgres_server_url)
    host = str(server.query.get("host") or server.host or "127.0.0.1")
    target = f"host={host} port={server.port or 5432} user={server.username or 'postgres'}"
    if server.password:
        target += f" password={server.password}"
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="st-pgb-", dir="/tmp"))
    root.chmod(0o755)
    config = root / "pgbouncer.ini"
    config.write_text(PGBOUNCER_INI.format(target=target, port=port))
    config.chmod(0o644)
    command = [executable, "--quiet", str(config)]
    if os.geteuid() == 0:
        # It refuses to run as root: run it as the owner of the server's socket directory (pgserver's
        # own user), who can reach the socket; for a TCP server anyone will do.
        owner = pwd.getpwuid(Path(host).stat().st_uid).pw_name if host.startswith("/") else "nobody"
        command[1:1] = ["--user", owner]
    log = (root / "pgbouncer.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {(root / 'pgbouncer.log').read_text()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("pgbouncer did not start listening within 10 s")
            time.sleep(0.05)
        user = server.username or "postgres"
        yield f"postgresql://{user}@127.0.0.1:{port}/postgres"
    finally:
        process.terminate()
        process.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def db_access(request: pytest.FixtureRequest) -> str:
    """How `api`-role live servers reach the database: `direct`, or `pgbouncer` (transaction pooling).
    The API test modules run every test both ways (ALSO_THROUGH_PGBOUNCER)."""
    return str(getattr(request, "param", "direct"))


ALSO_THROUGH_PGBOUNCER = pytest.mark.parametrize("db_access", ["direct", "pgbouncer"], indirect=True)


class LiveServer:
    """The real app under uvicorn on a loopback port, in a thread with its own event loop."""

    def __init__(self, settings: Settings, *, role: Role) -> None:
        import uvicorn  # noqa: PLC0415

        from service.app import create_app  # noqa: PLC0415

        self._uvicorn = uvicorn
        self.app = create_app(settings, role=role)
        # As `serve` does: an open event stream does not hold the shutdown for ever.
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_config=None, lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self._pool: Any = None
        self._thread: threading.Thread | None = None

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    def start(self, timeout: float = 30) -> str:
        self._thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app did not start (see the log above)")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self._pool = self.runtime.engine.pool
        return self.base_url

    def stop(self, timeout: float = 15) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the app did not stop in time")
            assert_every_connection_returned(self._pool)


def assert_every_connection_returned(pool: Any) -> None:
    """Once its users have stopped, no connection of `pool` is still checked out: one left out would be
    found later by the garbage collector, in whichever test it happens to run."""
    checked_out = pool.checkedout()
    assert checked_out == 0, f"{checked_out} connections not returned to the pool"


@pytest.fixture
def live_server(db_access: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., LiveServer]]:
    """Start the real app: `base = live_server(settings).base_url` (role `api` unless told). Stopped at
    test end. With db_access `pgbouncer`, an `api` server reaches the same database through PgBouncer."""
    started: list[LiveServer] = []

    def start(settings: Settings, *, role: Role = "api") -> LiveServer:
        if role == "api" and db_access == "pgbouncer":
            assert settings.database_url is not None
            database = make_url(settings.database_url).database
            bouncer = make_url(request.getfixturevalue("pgbouncer")).set(database=database)
            url = _async_url(bouncer.render_as_string(hide_password=False))
            settings = settings.model_copy(update={"database_url": url, "db_transaction_pooler": True})
        server = LiveServer(settings, role=role)
        server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
async def relay() -> AsyncIterator[FakeRelay]:
    """The fake relay on a loopback port, wanting RELAY_KEY."""
    async with FakeRelay(api_key=RELAY_KEY) as fake:
        yield fake


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on a loopback port that answers 200 and keeps what it got."""
    from tests.webhooks.conftest import Receiver  # noqa: PLC0415  (that module imports this one)

    server = await Receiver().start()
    yield server
    await server.stop()


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    *,
    timeout: float = 10,
    what: str | None = None,
    step: Callable[[], Awaitable[Any]] | None = None,
) -> None:
    """Check `condition` (running `step`, or pausing a moment, between checks) until it holds; fail
    after `timeout` seconds naming what was awaited."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            awaited = what or getattr(condition, "__name__", repr(condition))
            raise AssertionError(f"timed out after {timeout} s waiting for {awaited}")
        if step is not None:
            await step()
        await asyncio.sleep(0.01)


def auth_headers(token: str = TEST_ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def api(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> AsyncIterator[httpx.AsyncClient]:
    """An admin client of the real app (no background jobs) on a fresh database."""
    server = live_server(make_settings())
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as client:
        yield client
