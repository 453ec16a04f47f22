"""A fake relay on loopback, a real database, and a poller the test drives (or the real app runs)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from service.db import SessionMaker, create_engine, create_session_maker, transaction
from service.tracking.jobs import Poller
from service.tracking.service import register_task
from service.upstream.client import RelayClient
from service.upstream.fake import FakeRelay
from tests.conftest import assert_every_connection_returned, wait_until

RELAY_KEY = "test-relay-key"

EventTuple = tuple[int, str, str | None, str, str, str | None]


RANK = {
    "submitted": 0,
    "queued": 1,
    "in_progress": 2,
    "complete": 3,
    "failed": 3,
    "timed_out": 3,
    "cancelled": 3,
}


def assert_consistent_history(events: list[EventTuple], final: str) -> None:
    """What must hold even when some stages were never seen (a killed poller, a timed-out answer):
    seqs 1..n without gaps, registration first, and every status (task's and each clip's) only moving
    forward, each transition starting where the previous one ended."""
    assert [event[0] for event in events] == list(range(1, len(events) + 1))
    assert events[0][1:] == ("transition", None, "submitted", "register", None)
    current: dict[str | None, str | None] = {None: "submitted"}
    for _, type_, before, after, _, clip_id in events[1:]:
        if type_ == "anomaly":
            assert before == after == current[None]
            continue
        assert before == current.get(clip_id), events
        assert before is None or RANK[after] > RANK[before], events
        current[clip_id] = after
    assert current[None] == final


@dataclass
class Tracking:
    """Everything a tracking test touches: settings, database, relay client and a poller."""

    settings: Settings
    engine: AsyncEngine
    sessions: SessionMaker
    relay: RelayClient
    fake: FakeRelay
    poller: Poller

    async def register(
        self,
        task_id: str,
        kind: str = "music",
        *,
        notify_hook: str | None = None,
        client_id: int | None = None,
    ) -> None:
        async with transaction(self.sessions) as session:
            await register_task(
                session,
                client_id=client_id,
                task_id=task_id,
                kind=kind,
                notify_hook=notify_hook,
                notify_format=None,
                metadata=None,
                settings=self.settings,
            )

    async def fetch(self, query: str, **params: Any) -> list[Any]:
        async with self.sessions() as session:
            return list((await session.execute(text(query), params)).all())

    async def task(self, task_id: str) -> Any:
        """The task's row, with the relay's last answer (task_answers) as `last_answer`."""
        rows = await self.fetch(
            "SELECT t.*, a.answer AS last_answer FROM tasks AS t LEFT JOIN task_answers AS a "
            "ON a.task_pk = t.id WHERE t.task_id = :task_id",
            task_id=task_id,
        )
        return rows[0]

    async def clips(self, task_id: str) -> list[Any]:
        return await self.fetch(
            "SELECT c.* FROM clips c JOIN tasks t ON t.id = c.task_pk WHERE t.task_id = :task_id "
            "ORDER BY c.position",
            task_id=task_id,
        )

    async def events(self, task_id: str) -> list[EventTuple]:
        rows = await self.fetch(
            "SELECT e.seq, e.type, e.from_status, e.to_status, e.source, e.clip_id FROM task_events e "
            "JOIN tasks t ON t.id = e.task_pk WHERE t.task_id = :task_id ORDER BY e.seq",
            task_id=task_id,
        )
        return [tuple(row) for row in rows]

    async def details(self, task_id: str) -> list[Any]:
        rows = await self.fetch(
            "SELECT e.detail FROM task_events e JOIN tasks t ON t.id = e.task_pk "
            "WHERE t.task_id = :task_id ORDER BY e.seq",
            task_id=task_id,
        )
        return [row[0] for row in rows]

    async def status(self, task_id: str) -> str:
        return str((await self.task(task_id)).status)

    async def poll_until(self, task_id: str, status: str, *, timeout: float = 10) -> None:
        async def reached() -> bool:
            return await self.status(task_id) == status

        await wait_until(reached, timeout=timeout, step=self.poller.drain)

    async def poll_until_all_terminal(self, *, timeout: float = 20) -> None:
        async def done() -> bool:
            rows = await self.fetch("SELECT count(*) FROM tasks WHERE next_poll_at IS NOT NULL")
            return bool(rows[0][0] == 0)

        await wait_until(done, timeout=timeout, step=self.poller.drain)


@pytest.fixture
async def fake_relay() -> AsyncIterator[FakeRelay]:
    async with FakeRelay(api_key=RELAY_KEY) as fake:
        yield fake


@pytest.fixture
async def tracking_factory(
    make_settings: Callable[..., Settings], fake_relay: FakeRelay
) -> AsyncIterator[Callable[..., Awaitable[Tracking]]]:
    """`await tracking_factory(**env_overrides)`: a Tracking against the fake relay."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def build(**overrides: Any) -> Tracking:
        settings = make_settings(
            **{"SUNO_BASE_URL": fake_relay.base_url, "SUNO_API_KEY": RELAY_KEY, **overrides}
        )
        assert settings.database_url is not None
        assert settings.suno_api_key is not None
        # The test's own statements and a poller (3 workers) share it; some tests hold several at once.
        engine = create_engine(settings.database_url, pool_size=10)
        http = aiohttp.ClientSession()
        relay = RelayClient(
            http,
            base_url=fake_relay.base_url,
            api_key=settings.suno_api_key.get_secret_value(),
            batch_size=settings.poll_batch_size,
            max_in_flight=settings.upstream_concurrency,
            timeout_s=settings.upstream_timeout_s,
            dialect=settings.suno_api_dialect,
        )
        sessions = create_session_maker(engine)
        poller = Poller(settings, engine, relay)

        async def cleanup() -> None:
            await poller.stop()
            await http.close()
            try:
                assert_every_connection_returned(engine.pool)
            finally:
                await engine.dispose()

        cleanups.append(cleanup)
        return Tracking(settings, engine, sessions, relay, fake_relay, poller)

    yield build
    for cleanup in reversed(cleanups):
        await cleanup()


@pytest.fixture
async def tracking(tracking_factory: Callable[..., Awaitable[Tracking]]) -> Tracking:
    return await tracking_factory()
