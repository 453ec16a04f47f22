from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.db import Base, alembic_config, create_engine, migrate
from tests.conftest import _async_url, _driver_url, scratch_database


@pytest.fixture
async def empty_database_url(postgres_server_url: str) -> AsyncIterator[str]:
    async with scratch_database(postgres_server_url) as name:
        yield _async_url(_driver_url(postgres_server_url, name))


async def test_concurrent_start_ups_migrate_an_empty_database_once(empty_database_url: str) -> None:
    engines = [create_engine(empty_database_url, pool_size=1) for _ in range(4)]
    try:
        await asyncio.gather(*(migrate(engine) for engine in engines))
        async with engines[0].connect() as connection:
            version = (await connection.exec_driver_sql("SELECT version_num FROM alembic_version")).all()
    finally:
        for engine in engines:
            await engine.dispose()

    assert len(version) == 1


async def test_models_and_migrations_agree(database_url: str) -> None:
    """The test-suite form of `alembic check`: autogenerate finds nothing to add or drop."""
    engine = create_engine(database_url, pool_size=1)

    def diff(connection: Any) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    try:
        async with engine.connect() as connection:
            differences = await connection.run_sync(diff)
    finally:
        await engine.dispose()

    assert differences == []


async def test_downgrade_to_base_and_upgrade_again(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url, pool_size=1)

    def run(connection: Any, *steps: tuple[str, str]) -> None:
        config = alembic_config(empty_database_url)
        config.attributes["connection"] = connection
        for action, target in steps:
            getattr(command, action)(config, target)

    try:
        async with engine.begin() as connection:
            await connection.run_sync(run, ("upgrade", "head"), ("downgrade", "base"), ("upgrade", "head"))
        async with engine.connect() as connection:
            tables = (
                (
                    await connection.exec_driver_sql(
                        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
                    )
                )
                .scalars()
                .all()
            )
    finally:
        await engine.dispose()

    assert tables == [
        "alembic_version", "clips", "deliveries", "delivery_attempts", "hook_hosts", "task_events", "tasks",
    ]  # fmt: skip
