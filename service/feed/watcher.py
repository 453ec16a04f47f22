"""Wakes this process's stream readers when any process numbers new feed events: by LISTEN/NOTIFY, or,
behind a transaction pooler (which cannot carry LISTEN), by reading the feed's last id every tick.

A wake-up is only that: each reader then reads the feed from its own last id, so a missed or folded
notification loses nothing (the readers' 15 s keep-alive reads again anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.feed.sequencer import CHANNEL
from service.webhooks.jobs import DB_ERRORS, LISTEN_HEARTBEAT_S, LISTEN_RETRY_MAX_S

log = structlog.get_logger()

# The unique partial index on feed_id answers this from its last entry.
_LAST_FEED_ID = text("SELECT max(feed_id) FROM task_events WHERE feed_id IS NOT NULL")


class FeedWatcher:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next notification. Take it before reading the feed, then wait on it: a
        notification arriving in between is not lost."""
        return self._changed

    def notify(self, *_: Any) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="feed.listen")

    def start_polling(self, engine: AsyncEngine, every_s: float) -> None:
        """Wake the readers when the feed's last id grows, read every `every_s` through the pool: one
        index probe per process and tick, however many streams are open."""
        self._task = asyncio.create_task(self._poll(engine, every_s), name="feed.poll")

    async def _poll(self, engine: AsyncEngine, every_s: float) -> None:
        last: int | None = None
        failing = False
        while True:
            try:
                async with engine.connect() as db:
                    newest = await db.scalar(_LAST_FEED_ID)
            except (OSError, DBAPIError) as exc:
                if not failing:
                    log.warning("feed.poll_failed", error=type(exc).__name__)
                failing = True
            else:
                if failing:
                    log.info("feed.poll_recovered")
                failing = False
                if newest != last:
                    last = newest
                    self.notify()
            await asyncio.sleep(every_s)

    async def stop(self) -> None:
        self.closed = True
        self.notify()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                connection = await asyncpg.connect(
                    self._dsn, timeout=5, server_settings={"application_name": "sunotrack-feed-listen"}
                )
            except DB_ERRORS as exc:
                log.warning("feed.listen_connect_failed", error=str(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, LISTEN_RETRY_MAX_S)
                continue
            lost = asyncio.Event()
            connection.add_termination_listener(lambda _, lost=lost: lost.set())
            try:
                await connection.add_listener(CHANNEL, self.notify)
                backoff = 0.1
                self.notify()  # anything numbered while we were not listening
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), LISTEN_HEARTBEAT_S)
                    except TimeoutError:
                        await connection.fetchval("SELECT 1", timeout=5)
                log.warning("feed.listen_lost")
            except DB_ERRORS as exc:
                log.warning("feed.listen_lost", error=str(exc))
            finally:
                connection.terminate()
