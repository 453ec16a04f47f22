"""Several `sunotrack serve` processes on one database and one relay: row locks share the work."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from service.config import Settings
from service.db import create_engine, create_session_maker, transaction
from service.tracking.service import register_task
from service.upstream.fake import Advance, FakeRelay, Lifecycle
from tests.conftest import TEST_ADMIN_TOKEN, TEST_WEBHOOK_SECRET, free_port, wait_until
from tests.tracking.conftest import RELAY_KEY, assert_consistent_history
from tests.tracking.test_lifecycles import music_history

TASKS = 500


class Service:
    """One `sunotrack serve` child process."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from service.cli import main; main()", "serve", "--port", str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def ready(self, http: aiohttp.ClientSession) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"service exited with {self.process.returncode}")
        try:
            async with http.get(self.base_url + "/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    async def polls(self, http: aiohttp.ClientSession) -> float:
        async with http.get(self.base_url + "/metrics") as response:
            metrics = await response.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("sunotrack_polls_total")
        )

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def services(
    database_url: str, fake_relay: FakeRelay, tmp_path: Path
) -> Iterator[Callable[[int], list[Service]]]:
    started: list[Service] = []

    def start(count: int) -> list[Service]:
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "SUNO_BASE_URL": fake_relay.base_url,
            "SUNO_API_KEY": RELAY_KEY,
            "SUNOTRACK_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
            "SUNOTRACK_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
            "SUNOTRACK_POLL_MIN_INTERVAL_S": "0.05",
            "SUNOTRACK_POLL_MAX_INTERVAL_S": "0.2",
            "SUNOTRACK_POLL_TICK_S": "0.05",
            "SUNOTRACK_LEASE_S": "2",
            "SUNOTRACK_UPSTREAM_TIMEOUT_S": "1",
            # Pages of 80 (16 requests of 5) on 3 workers: one process holds at most 240 of a round's
            # tasks at once, so none can take a whole round alone.
            "SUNOTRACK_POLL_BATCH_SIZE": "5",
            "SUNOTRACK_LOG_LEVEL": "warning",
        }
        for n in range(count):
            started.append(Service(env, tmp_path / f"service-{len(started)}-{n}.log"))
        return started[-count:]

    yield start
    for service in started:
        service.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


class Database:
    """The test's own view of the shared database."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url, pool_size=2)
        self.sessions = create_session_maker(self.engine)

    async def query(self, sql: str) -> list[Any]:
        async with self.sessions() as session:
            return list((await session.execute(text(sql))).all())

    async def finished(self) -> bool:
        return bool(
            (await self.query("SELECT count(*) FROM tasks WHERE next_poll_at IS NOT NULL"))[0][0] == 0
        )

    async def histories(self) -> dict[str, list[Any]]:
        rows = await self.query(
            "SELECT t.task_id, e.seq, e.type, e.from_status, e.to_status, e.source, e.clip_id "
            "FROM task_events e JOIN tasks t ON t.id = e.task_pk ORDER BY t.task_id, e.seq"
        )
        found: dict[str, list[Any]] = {}
        for row in rows:
            found.setdefault(row[0], []).append(tuple(row[1:]))
        return found


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = Database(database_url)
    yield db
    await db.engine.dispose()


async def register(database: Database, settings: Settings, task_ids: list[str]) -> None:
    async with transaction(database.sessions) as session:
        for task_id in task_ids:
            await register_task(
                session, task_id=task_id, kind="music", notify_hook=None, notify_format=None,
                metadata=None, settings=settings,
            )  # fmt: skip


async def test_processes_share_the_work_and_survive_a_kill_and_a_hang(
    services: Callable[[int], list[Service]],
    http: aiohttp.ClientSession,
    database: Database,
    make_settings: Callable[..., Settings],
    fake_relay: FakeRelay,
) -> None:
    """Three processes (starting them is the slow part) through three rounds of 500 tasks."""
    settings = make_settings()
    trio = services(3)
    for service in trio:
        await wait_until(functools.partial(service.ready, http), timeout=90)

    # Round 1: all up before the tasks exist, so none can take everything alone.
    task_ids = [fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS) for _ in range(TASKS)]
    await register(database, settings, task_ids)
    await wait_until(database.finished, timeout=60)

    found = await database.histories()
    for task_id in task_ids:
        assert found[task_id] == music_history(fake_relay.clip_ids(task_id)), task_id
    assert fake_relay.overlaps() == {}
    # Each task was asked about exactly once per stage, and both processes did part of the work.
    assert {fake_relay.task_requests[task_id] for task_id in task_ids} == {4}
    assert min([await service.polls(http) for service in trio]) > 0

    async def round_interrupted_by(signal_number: int, target: Service, running: list[Service]) -> None:
        """500 more tasks; once every running process polls them, signal `target`; the others must
        finish every task, each history consistent, no task ever asked by two processes at once."""
        fake_relay.reset_counters()
        task_ids = [
            fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, advance=Advance.TIMED, stage_s=1.0)
            for _ in range(TASKS)
        ]
        polls = [await service.polls(http) for service in running]
        await register(database, settings, task_ids)

        async def all_polling() -> bool:
            now = [await service.polls(http) for service in running]
            return all(after > before + 50 for before, after in zip(polls, now, strict=True))

        await wait_until(all_polling, timeout=60, what="every process polling this round's tasks")
        target.process.send_signal(signal_number)
        await wait_until(database.finished, timeout=60, what="the other processes finishing every task")

        found = await database.histories()
        for task_id in task_ids:
            assert_consistent_history(found[task_id], "complete")
        assert fake_relay.overlaps() == {}

    # Round 2: kill -9 one process mid-run; its transactions die with its connections.
    victim, hung, survivor = trio
    await round_interrupted_by(signal.SIGKILL, victim, trio)
    await asyncio.to_thread(victim.process.wait, 10)

    # Round 3: another one hangs (SIGSTOP) instead: Postgres ends its sessions once they have sat idle
    # in their transactions for SUNOTRACK_LEASE_S plus SUNOTRACK_UPSTREAM_TIMEOUT_S for each round of
    # requests a page may wait through (2 + 3 x 1 s here: Poller.idle_limit_s).
    await round_interrupted_by(signal.SIGSTOP, hung, [hung, survivor])
    statuses = await database.query("SELECT status, count(*) FROM tasks GROUP BY status")
    assert [tuple(row) for row in statuses] == [("complete", 3 * TASKS)]
    assert survivor.process.poll() is None
    hung.process.send_signal(signal.SIGCONT)  # it finds its sessions gone, and carries on

    # A graceful stop ends both within a few seconds.
    started = time.monotonic()
    for service in (hung, survivor):
        service.process.send_signal(signal.SIGTERM)
    for service in (hung, survivor):
        # uvicorn re-raises the signal it handled once its shutdown is complete.
        assert await asyncio.to_thread(service.process.wait, 15) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 10
