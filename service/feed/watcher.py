"""Wakes this process's stream readers when any process numbers new feed events (LISTEN/NOTIFY).

A notification is only a wake-up: each reader then reads the feed from its own last id, so a missed or
folded notification loses nothing (the readers' 15 s keep-alive reads again anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import structlog

from service.feed.sequencer import CHANNEL
from service.webhooks.jobs import DB_ERRORS, LISTEN_HEARTBEAT_S, LISTEN_RETRY_MAX_S

log = structlog.get_logger()


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
