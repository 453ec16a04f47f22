"""Alembic environment: runs on a connection handed over by service.db.migrate, or on DATABASE_URL."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from service import models  # noqa: F401  (registers every table on Base.metadata)
from service.config import Settings
from service.db import Base, create_engine

config = context.config
target_metadata = Base.metadata


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_from_url(url: str) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_on)
    finally:
        await engine.dispose()


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    url = config.attributes.get("database_url") or Settings.from_env().database_url
    if url is None:
        raise SystemExit("DATABASE_URL is not set: alembic needs a database to run against")
    asyncio.run(run_from_url(url))


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported: run against a database")
main()
