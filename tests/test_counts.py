"""The counts /stats reads (task_counts, delivery_counts): kept by triggers, exact through every kind of
write, from several connections at once, and folded when their writers are gone."""

from __future__ import annotations

import asyncio

import asyncpg

from service import stats
from service.db import create_engine, create_session_maker, transaction
from tests.conftest import wait_until

TASKS = """
    SELECT client_key, status, kind, n FROM (
        SELECT coalesce(client_id, 0) AS client_key, status, kind, count(*) AS n FROM tasks GROUP BY 1, 2, 3
    ) AS counted ORDER BY 1, 2, 3
"""
TASK_COUNTS = """
    SELECT client_key, status, kind, sum(n) AS n FROM task_counts GROUP BY 1, 2, 3 HAVING sum(n) <> 0
    ORDER BY 1, 2, 3
"""
DELIVERIES = "SELECT client_key, count(*) AS n FROM deliveries GROUP BY 1 ORDER BY 1"
DELIVERY_COUNTS = (
    "SELECT client_key, sum(n) AS n FROM delivery_counts GROUP BY 1 HAVING sum(n) <> 0 ORDER BY 1"
)


async def counted(db: asyncpg.Connection) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The counts tables' figures, after checking them against a count of the rows themselves."""
    tasks = [tuple(row) for row in await db.fetch(TASK_COUNTS)]
    deliveries = [tuple(row) for row in await db.fetch(DELIVERY_COUNTS)]
    assert tasks == [tuple(row) for row in await db.fetch(TASKS)]
    assert deliveries == [tuple(row) for row in await db.fetch(DELIVERIES)]
    return tasks, deliveries


async def test_counts_follow_every_write_and_writers_never_wait_on_each_other(database_url: str) -> None:
    dsn = database_url.replace("+asyncpg", "")
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    engine = create_engine(database_url, pool_size=1)
    try:
        await first.execute(
            "INSERT INTO clients (name, token_sha256, webhook_secret, relay) VALUES ('c', '\\x01', 's', 'r')"
        )
        client = await first.fetchval("SELECT id FROM clients")
        await first.execute(
            """INSERT INTO tasks (task_id, client_id, kind, status, next_poll_at) VALUES
               ('a', NULL, 'music', 'submitted', now()), ('b', NULL, 'music', 'submitted', now()),
               ('c', $1, 'lyrics', 'queued', now()), ('d', $1, 'music', 'in_progress', now())""",
            client,
        )
        await second.execute(
            "INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body, client_key) "
            "SELECT id, 1, 'w-' || task_id, 'http://127.0.0.1:9/', '', coalesce(client_id, 0) FROM tasks"
        )
        # Two transactions change counted rows of the same (client, status, kind) and stay open: each
        # adds to its own backend's rows, so neither waits for the other's commit.
        one, two = first.transaction(), second.transaction()
        await one.start()
        await two.start()
        finish = "UPDATE tasks SET status = 'complete', next_poll_at = NULL, finished_at = now() "
        finish += "WHERE task_id = $1"
        await first.execute(finish, "a")
        await asyncio.wait_for(second.execute(finish, "b"), timeout=10)
        await asyncio.wait_for(
            second.execute("UPDATE deliveries SET status = 'delivered' WHERE webhook_id IN ('w-a', 'w-c')"),
            timeout=10,
        )
        await two.commit()
        await one.commit()
        # Writes that leave the counted columns as they were change nothing; an update in a CTE counts
        # as any other (the recorder writes a page so).
        await first.execute("UPDATE tasks SET status = status, progress = 50")
        await first.execute(
            "WITH moved AS (UPDATE tasks SET status = 'cancelled', next_poll_at = NULL WHERE task_id = 'c' "
            "RETURNING id) SELECT count(*) FROM moved"
        )
        await first.execute("DELETE FROM tasks WHERE task_id = 'd'")  # its delivery goes with it

        tasks, deliveries = await counted(first)

        assert tasks == [
            (0, "complete", "music", 2),
            (client, "cancelled", "lyrics", 1),
        ]
        assert deliveries == [(0, 2), (client, 1)]
        shards = {row["shard"] for row in await first.fetch("SELECT shard FROM task_counts")}
        gone = await second.fetchval("SELECT pg_backend_pid()")
        assert shards == {await first.fetchval("SELECT pg_backend_pid()"), gone}

        # The second writer leaves: a fold moves its rows into shard 0, the figures as they were.
        await second.close()

        async def second_gone() -> bool:
            return not await first.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", gone)

        await wait_until(second_gone, what="the second writer's backend to leave pg_stat_activity")
        async with transaction(create_session_maker(engine)) as session:
            await stats.fold_counts(session)

        assert await counted(first) == (tasks, deliveries)
        async with transaction(create_session_maker(engine)) as session:
            everyone, admins = await stats.stats(session, None), await stats.stats(session, 0)
        assert everyone["tasks"]["by_status"]["complete"] == 2
        assert everyone["tasks"]["by_kind"] == {"music": 2, "lyrics": 1, "stems": 0}
        # Delivered: the kept total less those not delivered, counted from their rows.
        assert everyone["deliveries"]["by_status"] == {"pending": 1, "delivered": 2, "failed": 0, "dead": 0}
        assert admins["deliveries"]["by_status"] == {"pending": 1, "delivered": 1, "failed": 0, "dead": 0}
        shards = {row["shard"] for row in await first.fetch("SELECT shard FROM task_counts")}
        assert shards == {0, await first.fetchval("SELECT pg_backend_pid()")}

        await first.execute("TRUNCATE tasks CASCADE")
        assert await first.fetchval("SELECT count(*) FROM task_counts") == 0
        assert await first.fetchval("SELECT count(*) FROM delivery_counts") == 0
    finally:
        await engine.dispose()
        await first.close()
        if not second.is_closed():
            await second.close()
