"""Numbers committed events in the order they become visible: their position in the global feed.

Identity ids are handed out when a row is inserted, not when it commits: a reader paging by them can pass
an id whose transaction commits later. Here one process at a time (an advisory lock) numbers the events
it can see, after the highest number given so far, and commits before the next numbering can begin: any
event committed later gets a higher number, so a reader that has seen N never later finds a new event
at or below N (docs/design.md, "The event feed").
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import DB_ERRORS

log = structlog.get_logger()

# NOTIFY channel: a new stretch of the feed was numbered (payload: its last feed id).
CHANNEL = "sunotrack_feed"
# Any constant: the same in every process sharing the database.
SEQUENCER_LOCK_KEY = 0x5A5A_FEED
BATCH = 5000

_NUMBER = text(
    """
    WITH batch AS (
        SELECT id FROM task_events WHERE feed_id IS NULL ORDER BY id LIMIT :limit
    ),
    numbered AS (
        SELECT id,
               (SELECT coalesce(max(feed_id), 0) FROM task_events)
                   + row_number() OVER (ORDER BY id) AS feed_id
        FROM batch
    ),
    written AS (
        UPDATE task_events AS e SET feed_id = n.feed_id, client_id = t.client_id
        FROM numbered AS n, tasks AS t
        WHERE e.id = n.id AND t.id = e.task_pk
        RETURNING e.feed_id
    )
    SELECT count(*) AS numbered, max(feed_id) AS last FROM written
    """
)


async def number_events(db: AsyncConnection, *, limit: int = BATCH) -> int:
    """Number up to `limit` unnumbered events in the caller's transaction, which must commit before
    anyone numbers again (the advisory lock held until then sees to it). Returns how many; 0 when
    another process is numbering."""
    locked = await db.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": SEQUENCER_LOCK_KEY})
    if not locked:
        return 0
    row = (await db.execute(_NUMBER, {"limit": limit})).one()
    if row.numbered:
        await db.execute(
            text("SELECT pg_notify(:channel, :last)"), {"channel": CHANNEL, "last": str(row.last)}
        )
    return int(row.numbered)


async def number_all(engine: AsyncEngine) -> int:
    """Number every event committed so far (batch after batch, each its own transaction)."""
    total = 0
    while True:
        async with engine.begin() as db:
            numbered = await number_events(db)
        total += numbered
        if numbered < BATCH:
            return total


class Sequencer:
    """One per process; the lock makes the others' turns no-ops. Ticks every `tick_s`."""

    def __init__(self, engine: AsyncEngine, *, tick_s: float) -> None:
        self._engine = engine
        self._tick_s = tick_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="feed.sequencer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await number_all(self._engine)
            except DB_ERRORS as exc:
                log.warning("feed.numbering_failed", error=str(exc))
            await asyncio.sleep(self._tick_s)
