"""Plumbing the benchmarks share: the event loop they measure on and a fresh migrated database."""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
from sqlalchemy.engine import make_url

from service.db import create_engine, migrate


def install_uvloop() -> str:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


@asynccontextmanager
async def fresh_database(keep: str | None = None) -> AsyncIterator[str]:
    """A migrated database of its own, dropped afterwards. `keep`: a name, for a database kept between
    runs (migrated to the head each time): on DATABASE_URL's server, else in an embedded PostgreSQL whose
    data directory is /tmp/st-bench-<keep>."""
    server = None
    root = None
    base = os.environ.get("DATABASE_URL")
    if not base:
        if keep:
            root = Path(f"/tmp/st-bench-{keep}")
            root.mkdir(exist_ok=True)
        else:
            root = Path(tempfile.mkdtemp(prefix="st-bench-", dir="/tmp"))
        (root / "run").mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(root / "run")
        import pgserver  # noqa: PLC0415

        # pgserver's own exit hook touches its runtime directory again; exit hooks run last-registered
        # first, so this one, registered before pgserver's, removes the directory after it.
        if not keep:
            atexit.register(shutil.rmtree, root, ignore_errors=True)
        server = pgserver.get_server(root / "pg", cleanup_mode="stop")
        base = server.get_uri()
    admin_url = make_url(base).set(drivername="postgresql")
    name = f"bench_{keep}" if keep else f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url.render_as_string(hide_password=False))
    try:
        if not await admin.fetchval("SELECT true FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
        url = admin_url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
        engine = create_engine(url, pool_size=2)
        await migrate(engine)
        await engine.dispose()
        yield url
        if not keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
        if server is not None:
            server.cleanup()
        if root is not None and not keep:
            shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_ready(base: str, server: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Until the server at `base` answers /readyz (its database reached); SystemExit if it exits or
    takes longer than `timeout_s`."""
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                async with http.get(f"{base}/readyz") as ready:
                    if ready.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            await asyncio.sleep(0.1)


@asynccontextmanager
async def api_server(url: str, admin_token: str) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """`sunotrack serve --role api` in a process of its own on DATABASE_URL=url (nothing polled or
    delivered), ready: its base URL and process."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "SUNOTRACK_ADMIN_TOKEN": admin_token}
    env["SUNOTRACK_LOG_LEVEL"] = "warning"
    env.pop("SUNO_BASE_URL", None)
    argv = ["serve", "--role", "api", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(  # noqa: ASYNC220  (started once, before anything is measured)
        [sys.executable, "-c", "from service.cli import main; main()", *argv], env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, server)
        yield base, server
    finally:
        server.terminate()
        server.wait(30)


async def timed(call: Callable[[], Awaitable[object]], requests: int) -> list[float]:
    for _ in range(min(50, requests)):  # warm-up: connections, prepared statements, caches
        await call()
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": statistics.median(ordered),
        "p95": ordered[int(len(ordered) * 0.95) - 1],
        "p99": ordered[int(len(ordered) * 0.99) - 1],
        "max": ordered[-1],
    }


def keep_name(value: str) -> str:
    """--keep's argument: a database name's tail."""
    if not re.fullmatch(r"[a-z0-9_]{1,40}", value):
        raise ValueError(value)
    return value
