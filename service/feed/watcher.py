"""Wakes this process's stream readers when any process numbers new feed events: by LISTEN/NOTIFY, or,
behind a transaction pooler (which cannot carry LISTEN), by reading the feed's last id every tick.

A wake-up is only that: each reader then reads the feed from its own last id, so a missed or folded
notification loses nothing (the readers' 15 s keep-alive reads again anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import listen_forever
from service.feed.sequencer import CHANNEL

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
        await listen_forever(
            self._dsn, CHANNEL, self.notify,
            # Anything numbered while we were not listening.
            on_listening=self.notify, application_name="sunotrack-feed-listen", logger=log, events="feed",
        )  # fmt: skip
