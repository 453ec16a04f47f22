from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db import Base, alembic_config, create_engine, migrate
from tests.conftest import _async_url, _driver_url, scratch_database


@pytest.fixture
async def empty_database_url(postgres_server_url: str) -> AsyncIterator[str]:
    async with scratch_database(postgres_server_url) as name:
        yield _async_url(_driver_url(postgres_server_url, name))


def alembic_steps(connection: Any, database_url: str, *steps: tuple[str, str]) -> None:
    """Alembic's upgrade/downgrade steps, in order, on the test's own connection."""
    config = alembic_config(database_url)
    config.attributes["connection"] = connection
    for action, target in steps:
        getattr(command, action)(config, target)


class Migration:
    """A test's migration steps and its own statements between them, in one transaction."""

    def __init__(self, connection: AsyncConnection, database_url: str) -> None:
        self.connection = connection
        self._database_url = database_url

    async def upgrade(self, target: str = "head") -> None:
        await self.connection.run_sync(alembic_steps, self._database_url, ("upgrade", target))

    async def downgrade(self, target: str) -> None:
        await self.connection.run_sync(alembic_steps, self._database_url, ("downgrade", target))

    async def run(self, *statements: str) -> None:
        for statement in statements:
            await self.connection.exec_driver_sql(statement)

    async def rows(self, sql: str) -> list[Any]:
        return list((await self.connection.exec_driver_sql(sql)).all())


@asynccontextmanager
async def migration_from(database_url: str, revision: str) -> AsyncIterator[Migration]:
    """An empty database upgraded to `revision`, for a test to fill and migrate further."""
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.begin() as connection:
            migration = Migration(connection, database_url)
            await migration.upgrade(revision)
            yield migration
    finally:
        await engine.dispose()


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

    try:
        async with engine.begin() as connection:
            await connection.run_sync(
                alembic_steps,
                empty_database_url,
                ("upgrade", "head"),
                ("downgrade", "base"),
                ("upgrade", "head"),
            )
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
        "alembic_version", "clients", "clips", "deliveries", "delivery_attempts", "delivery_counts",
        "hook_hosts", "task_answers", "task_counts", "task_events", "tasks",
    ]  # fmt: skip


async def test_clients_migration_keeps_every_task_and_its_history_as_the_admins(
    empty_database_url: str,
) -> None:
    """From the schema before clients (0004): tasks become the admin's (no client) on the default relay,
    with their clips, events, deliveries and attempts as they were."""
    tables = ("tasks", "clips", "task_events", "deliveries", "delivery_attempts")

    async def each_table() -> dict[str, Any]:
        return {
            table: (await migration.connection.exec_driver_sql(f"SELECT * FROM {table} ORDER BY 1, 2"))
            .mappings()
            .all()
            for table in tables
        }

    async with migration_from(empty_database_url, "0004") as migration:
        await migration.run(
            "INSERT INTO tasks (task_id, kind, status, notify_hook, notify_hook_source, last_seq, "
            "next_poll_at) VALUES ('t-live', 'music', 'queued', 'https://h.example/x', 'client', 2, "
            "now()), ('t-done', 'lyrics', 'complete', NULL, NULL, 2, NULL)",
            "INSERT INTO clips (task_pk, clip_id, position, status) "
            "SELECT id, 'clip-' || task_id, 0, status FROM tasks",
            "INSERT INTO task_events (task_pk, seq, to_status, source) "
            "SELECT id, 1, 'submitted', 'register' FROM tasks "
            "UNION ALL SELECT id, 2, status, 'poll' FROM tasks",
            "INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body) "
            "SELECT id, 2, 'msg_' || task_id, notify_hook, '{}' FROM tasks WHERE notify_hook IS NOT NULL",
            "INSERT INTO delivery_attempts (delivery_id, attempt, status_code) "
            "SELECT id, 1, 500 FROM deliveries",
        )
        before = await each_table()
        await migration.upgrade()
        after = await each_table()
        owners = await migration.rows("SELECT task_id, client_id, relay, shared FROM tasks ORDER BY id")

    assert [len(before[table]) for table in tables] == [2, 2, 4, 1, 1]
    for table in tables:
        # Later migrations add columns, and 0012 moves the answer columns (empty here) out of tasks; the
        # rows keep every other value they had.
        kept = [name for name in before[table][0] if name not in ("last_answer", "last_payload")]
        assert [[row[name] for name in kept] for row in after[table]] == [
            [row[name] for name in kept] for row in before[table]
        ], table
    assert owners == [("t-live", None, "default", False), ("t-done", None, "default", False)]


async def test_fair_delivery_migration_gives_each_delivery_its_lane(empty_database_url: str) -> None:
    """From 0006: each delivery gets its host key and its task's client; the breaker's streaks, counted
    by host name alone before, start over."""
    async with migration_from(empty_database_url, "0006") as migration:
        await migration.run(
            "INSERT INTO clients (name, token_sha256, webhook_secret, relay)"
            " VALUES ('acme', 'x', 'whsec_x', 'default')",
            "INSERT INTO tasks (task_id, kind, status, client_id) VALUES "
            "('t-admin', 'music', 'complete', NULL), ('t-acme', 'music', 'complete', 1)",
            "INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body) "
            "SELECT id, 2, 'msg_' || task_id, 'HTTPS://Hooks.Example/' || task_id, '{}' FROM tasks",
            "INSERT INTO hook_hosts (host, consecutive_failures) VALUES ('hooks.example', 3)",
        )
        await migration.upgrade()
        lanes = await migration.rows("SELECT webhook_id, client_key, host FROM deliveries ORDER BY id")
        streaks = (await migration.connection.exec_driver_sql("SELECT count(*) FROM hook_hosts")).scalar_one()

    assert lanes == [
        ("msg_t-admin", 0, "https://hooks.example:443"), ("msg_t-acme", 1, "https://hooks.example:443"),
    ]  # fmt: skip
    assert streaks == 0


async def test_stats_counts_migration_counts_the_rows_there_are(empty_database_url: str) -> None:
    """From 0009: task_counts and delivery_counts start from the rows already there; a downgrade drops
    them with their triggers."""
    async with migration_from(empty_database_url, "0009") as migration:
        await migration.run(
            "INSERT INTO clients (name, token_sha256, webhook_secret, relay) VALUES ('c', '\\x01', 's', 'r')",
            "INSERT INTO tasks (task_id, client_id, kind, status, next_poll_at) VALUES "
            "('a', NULL, 'music', 'complete', NULL), ('b', NULL, 'music', 'complete', NULL), "
            "('c', (SELECT id FROM clients), 'stems', 'queued', now())",
            "INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body, client_key, status) "
            "SELECT id, 1, 'w-' || task_id, 'http://127.0.0.1:9/', '', coalesce(client_id, 0), 'dead' "
            "FROM tasks",
        )
        await migration.upgrade()
        counts = await migration.rows(
            "SELECT c.name IS NULL, status, kind, shard, n FROM task_counts "
            "LEFT JOIN clients AS c ON c.id = client_key ORDER BY 1 DESC, 2"
        )
        deliveries = await migration.rows(
            "SELECT client_key = 0, shard, n FROM delivery_counts ORDER BY 1 DESC"
        )
        await migration.downgrade("0009")
        left = await migration.rows(
            "SELECT count(*) FROM pg_class WHERE relname IN ('task_counts', 'delivery_counts') "
            "UNION ALL SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%_counts_%'"
        )

    assert counts == [(True, "complete", "music", 0, 2), (False, "queued", "stems", 0, 1)]
    assert deliveries == [(True, 0, 2), (False, 0, 1)]
    assert left == [(0,), (0,)]


async def test_answers_migration_moves_every_answer_and_a_downgrade_brings_them_back(
    empty_database_url: str,
) -> None:
    """From 0011: each task's answer, as text or (before 0009) as jsonb only, is its row of task_answers,
    and tasks keeps neither column; a downgrade puts every answer back as last_answer."""
    async with migration_from(empty_database_url, "0011") as migration:
        await migration.run(
            "INSERT INTO tasks (task_id, kind, status, next_poll_at, last_answer, last_payload) VALUES "
            """('text', 'music', 'queued', now(), '{"status": "IN_PROGRESS"}', NULL), """
            """('jsonb', 'music', 'complete', NULL, NULL, '{"status": "SUCCESS"}'), """
            "('none', 'music', 'queued', now(), NULL, NULL)"
        )
        await migration.upgrade()
        answers = await migration.rows(
            "SELECT t.task_id, a.answer::jsonb FROM task_answers AS a "
            "JOIN tasks AS t ON t.id = a.task_pk ORDER BY 1"
        )
        columns = await migration.rows(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'tasks' AND column_name IN ('last_answer', 'last_payload')"
        )
        await migration.downgrade("0011")
        back = await migration.rows("SELECT task_id, last_answer::jsonb FROM tasks ORDER BY 1")

    assert answers == [("jsonb", {"status": "SUCCESS"}), ("text", {"status": "IN_PROGRESS"})]
    assert columns == []
    assert back == [("jsonb", {"status": "SUCCESS"}), ("none", None), ("text", {"status": "IN_PROGRESS"})]
