"""Plumbing the benchmarks share: the event loop they measure on and a fresh migrated database."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

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
async def fresh_database() -> AsyncIterator[str]:
    server = None
    root = None
    base = os.environ.get("DATABASE_URL")
    if not base:
        root = Path(tempfile.mkdtemp(prefix="st-bench-", dir="/tmp"))
        (root / "run").mkdir(mode=0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(root / "run")
        import pgserver  # noqa: PLC0415

        # pgserver's own exit hook touches its runtime directory again; exit hooks run last-registered
        # first, so this one, registered before pgserver's, removes the directory after it.
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        server = pgserver.get_server(root / "pg", cleanup_mode="stop")
        base = server.get_uri()
    admin_url = make_url(base).set(drivername="postgresql")
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url.render_as_string(hide_password=False))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = admin_url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
        engine = create_engine(url, pool_size=2)
        await migrate(engine)
        await engine.dispose()
        yield url
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
        if server is not None:
            server.cleanup()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
