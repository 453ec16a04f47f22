"""Stopping the poller: stop claiming, let in-flight work finish briefly, roll back what did not."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.db import transaction
from service.tracking.jobs import Poller, _Connections
from service.upstream.fake import FakeRelay, FaultKind, Lifecycle
from tests.conftest import assert_every_connection_returned, wait_until
from tests.tracking.conftest import Tracking


async def start_polling(tracking: Tracking, poller: Poller, count: int) -> list[str]:
    task_ids = [tracking.fake.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS) for _ in range(count)]
    for task_id in task_ids:
        await tracking.register(task_id)
    async with transaction(tracking.sessions) as session:
        # All due at once, so the first page holds them all.
        await session.execute(text("UPDATE tasks SET next_poll_at = now()"))

    async def asked() -> bool:
        return tracking.fake.requests["fetch_batch"] > 0

    await wait_until(asked, timeout=5, step=poller.tick)
    return task_ids


async def test_stop_cancels_slow_work_and_rolls_its_claims_back(
    tracking: Tracking, fake_relay: FakeRelay
) -> None:
    fake_relay.inject(FaultKind.LATENCY, latency_s=5)
    poller = Poller(tracking.settings, tracking.engine, tracking.relay, drain_timeout_s=0.2)
    task_ids = await start_polling(tracking, poller, 10)

    started = time.monotonic()
    await poller.stop()

    assert time.monotonic() - started < 1
    due = await tracking.fetch("SELECT count(*) FROM tasks WHERE next_poll_at <= now() AND poll_count = 0")
    assert due == [(len(task_ids),)]
    assert await tracking.fetch("SELECT count(*) FROM task_events") == [(len(task_ids),)]


async def test_stop_lets_quick_work_finish(tracking: Tracking, fake_relay: FakeRelay) -> None:
    fake_relay.inject(FaultKind.LATENCY, latency_s=0.3)
    poller = Poller(tracking.settings, tracking.engine, tracking.relay, drain_timeout_s=3)
    task_ids = await start_polling(tracking, poller, 10)

    await poller.stop()

    # The answers in flight were recorded (each first poll sees both clips submitted).
    rows = await tracking.fetch("SELECT poll_count, last_seq FROM tasks")
    assert {tuple(row) for row in rows} == {(1, 3)}
    requests = fake_relay.requests["fetch_batch"]
    await poller.tick()
    assert not poller.draining
    assert fake_relay.requests["fetch_batch"] == requests
    assert len(task_ids) == 10


async def test_a_connection_whose_set_up_fails_goes_back_to_the_pool(tracking: Tracking) -> None:
    """A worker's new connection is set up before its first page; should that fail (or a stop cancel
    it), the connection is returned, not left checked out until the garbage collector finds it."""
    # Postgres refuses an idle timeout over 2^31 - 1 ms: the set-up's first statement fails.
    connections = _Connections(tracking.engine, idle_s=3e6)
    with pytest.raises(DBAPIError, match="idle_in_transaction_session_timeout"):
        async with connections.transaction():
            pass
    assert_every_connection_returned(tracking.engine.pool)
