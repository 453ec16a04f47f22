"""The feed's order under concurrent writers: a reader paging by feed id never passes an event that
commits later (docs/design.md, "The event feed")."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import create_engine
from service.feed.sequencer import number_all

_TASK = (
    "INSERT INTO tasks (task_id, kind, status, next_poll_at) VALUES ($1, 'music', 'submitted', now()) "
    "RETURNING id"
)
_EVENT = (
    "INSERT INTO task_events (task_pk, seq, to_status, source) VALUES ($1, $2, 'submitted', 'register') "
    "RETURNING id"
)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=2)
    yield engine
    await engine.dispose()


async def connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(database_url.replace("+asyncpg", ""))


async def read_after(db: asyncpg.Connection, column: str, after: int) -> list[tuple[int, int]]:
    """What a reader paging by `column` gets: (event id, position) after `after`, in that column's order."""
    rows = await db.fetch(
        f"SELECT id, {column} AS position FROM task_events WHERE {column} > $1 ORDER BY {column}",
        after,
    )
    return [(row["id"], row["position"]) for row in rows]


async def test_an_event_committed_after_a_later_numbered_one_is_not_skipped(
    database_url: str, engine: AsyncEngine
) -> None:
    """A takes the smaller identity id but commits after B. Paging by identity id skips A's event;
    paging by feed id does not."""
    a, b, reader = [await connect(database_url) for _ in range(3)]
    try:
        task = await reader.fetchval(_TASK, "t-1")
        other = await reader.fetchval(_TASK, "t-2")
        slow = a.transaction()
        await slow.start()
        slow_id = await a.fetchval(_EVENT, task, 1)
        fast_id = await b.fetchval(_EVENT, other, 1)  # autocommit: committed now
        await number_all(engine)
        by_id, by_feed = await read_after(reader, "id", 0), await read_after(reader, "feed_id", 0)
        await slow.commit()
        await number_all(engine)
        by_id += await read_after(reader, "id", by_id[-1][1])
        by_feed += await read_after(reader, "feed_id", by_feed[-1][1])
    finally:
        for db in (a, b, reader):
            await db.close()

    assert slow_id < fast_id
    assert [event for event, _ in by_id] == [fast_id]  # what the identity id would have served
    assert by_feed == [(fast_id, 1), (slow_id, 2)]


async def test_concurrent_writers_and_numberers_give_every_event_once_in_order(
    database_url: str, engine: AsyncEngine
) -> None:
    """Writers commit in random order (some roll back) while two numberers race and a reader pages the
    feed: the reader sees every committed event exactly once, positions dense, each task's in seq order."""
    rng = random.Random(12)
    writers, commits = 6, 15
    setup = await connect(database_url)
    tasks = [await setup.fetchval(_TASK, f"t-{n}") for n in range(writers)]
    await setup.close()
    committed: list[int] = []
    done = asyncio.Event()

    async def write(task_pk: int) -> None:
        db = await connect(database_url)
        try:
            seq = 0
            for _ in range(commits):
                transaction = db.transaction()
                await transaction.start()
                ids = []
                for n in range(rng.randint(1, 3)):
                    ids.append(await db.fetchval(_EVENT, task_pk, seq + n + 1))
                    await asyncio.sleep(rng.random() * 0.01)
                await asyncio.sleep(rng.random() * 0.02)
                if rng.random() < 0.1:
                    await transaction.rollback()
                else:
                    await transaction.commit()
                    committed.extend(ids)
                    seq += len(ids)
        finally:
            await db.close()

    async def number() -> None:
        while not done.is_set():
            await number_all(engine)
            await asyncio.sleep(0.002)
        await number_all(engine)

    seen: list[tuple[int, int]] = []

    async def read() -> None:
        db = await connect(database_url)
        try:
            after = 0
            while True:
                finished = done.is_set() and not await db.fetchval(
                    "SELECT count(*) FROM task_events WHERE feed_id IS NULL"
                )
                page = await read_after(db, "feed_id", after)
                seen.extend(page)
                if page:
                    after = page[-1][1]
                if finished and not page:
                    return
                await asyncio.sleep(0.001)
        finally:
            await db.close()

    numberers = [asyncio.create_task(number()) for _ in range(2)]
    reader = asyncio.create_task(read())
    await asyncio.gather(*(write(task) for task in tasks))
    done.set()
    await asyncio.gather(*numberers)
    await asyncio.wait_for(reader, 30)

    check = await connect(database_url)
    order = {
        row["id"]: (row["task_pk"], row["seq"])
        for row in await check.fetch("SELECT id, task_pk, seq FROM task_events")
    }
    await check.close()
    assert sorted(event for event, _ in seen) == sorted(committed)
    assert [position for _, position in seen] == list(range(1, len(seen) + 1))
    for task_pk in tasks:
        seqs = [order[event][1] for event, _ in seen if order[event][0] == task_pk]
        assert seqs == sorted(seqs)
