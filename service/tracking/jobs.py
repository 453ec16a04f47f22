"""The poller: claims due tasks from Postgres, asks the relay about them, records what changed.

The APScheduler job only ticks. Each tick starts a drain unless one is still running; the drain runs
a few workers, each looping claim -> poll -> record over one page (one batch request's worth of
tasks) until nothing is due. No task list lives in memory: Postgres leases (next_poll_at pushed one
lease ahead by the claim) decide who polls what, so any number of processes can run this safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from service.config import Settings
from service.metrics import CLAIM_LAG, POLL_TICK, POLLS, UPSTREAM_ERRORS
from service.runtime import Runtime
from service.tracking import repository
from service.tracking.repository import Claim, TaskState
from service.tracking.service import (
    Endpoint,
    PollResult,
    fetch_snapshot,
    plan_polls,
    polls_singly,
    record_polls,
    redo_polls,
)
from service.upstream.client import RelayClient
from service.upstream.schemas import TaskSnapshot, UpstreamError

log = structlog.get_logger()

# How long stop() lets in-flight pages finish before cancelling them and releasing their leases.
DRAIN_TIMEOUT_S = 3.0
# Connections the poller holds while it drains; the rest of the engine's pool stays with the API.
DB_SLOTS = 8
_BATCH_ACTIONS = {"music": "MUSIC", "lyrics": "LYRICS"}


class _Connections:
    """The poller's database slots: a few connections from the engine's pool, kept for a whole drain.

    Checking one out per page would add the pool's pre-ping round trip to every page. Connections for
    single statements run in autocommit (no BEGIN and COMMIT round trips); the others carry the usual
    unit of work. A connection keeps its mode for life, so no transaction state leaks between them.
    """

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        self._engine = engine
        self._slots = asyncio.Semaphore(size)
        self._idle: dict[bool, list[AsyncConnection]] = {True: [], False: []}

    @contextlib.asynccontextmanager
    async def _connection(self, autocommit: bool) -> AsyncIterator[AsyncConnection]:
        async with self._slots:
            idle = self._idle[autocommit]
            if idle:
                connection = idle.pop()
            else:
                connection = await self._engine.connect()
                if autocommit:
                    await connection.execution_options(isolation_level="AUTOCOMMIT")
            try:
                yield connection
            except BaseException:
                await connection.close()  # back to the pool, which drops it if it broke
                raise
            idle.append(connection)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """The same unit of work as service.db.transaction: commit at the end, roll back on error."""
        async with (
            self._connection(autocommit=False) as connection,
            AsyncSession(connection, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    @contextlib.asynccontextmanager
    async def statement(self) -> AsyncIterator[AsyncConnection]:
        """For one statement, which commits by itself."""
        async with self._connection(autocommit=True) as connection:
            yield connection
            await connection.commit()  # ends SQLAlchemy's bookkeeping; the database already committed

    async def close(self) -> None:
        idle, self._idle = self._idle, {True: [], False: []}
        for connection in (*idle[True], *idle[False]):
            await connection.close()


class Poller:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        relay: RelayClient,
        *,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        self._settings = settings
        self._drain_timeout_s = drain_timeout_s
        self._engine = engine
        self._connections = _Connections(engine, DB_SLOTS)
        self._relay = relay
        self._page_size = settings.poll_batch_size
        # poll_claim_size bounds the tasks this process holds leased at once.
        self.workers = max(
            1, min(settings.upstream_concurrency, settings.poll_claim_size // settings.poll_batch_size)
        )
        self._single_slots = asyncio.Semaphore(settings.upstream_concurrency)
        self._held: dict[int, datetime] = {}
        self._drain_task: asyncio.Task[int] | None = None
        self._stopping = False
        self.job: Job | None = None

    @property
    def draining(self) -> bool:
        return self._drain_task is not None and not self._drain_task.done()

    # -- scheduling -------------------------------------------------------------------------------

    async def tick(self) -> None:
        """The scheduler's job: start a drain unless one runs. Returning at once keeps runs from
        overlapping however long a drain takes, and leaves stop() owning the work it waits for."""
        if self._stopping or self.draining:
            return
        self._drain_task = asyncio.create_task(self.drain(), name="poll.drain")

    async def stop(self) -> None:
        """Stop claiming, let in-flight pages finish for a moment, then cancel them and hand their
        leases back so another process (or the next start) polls those tasks at once."""
        self._stopping = True
        if self.job is not None:
            with contextlib.suppress(JobLookupError):
                self.job.remove()
        drain = self._drain_task
        if drain is not None and not drain.done():
            _, pending = await asyncio.wait({drain}, timeout=self._drain_timeout_s)
            if pending:
                drain.cancel()
                await asyncio.wait({drain})
        if self._held:
            held = list(self._held.items())
            try:
                async with AsyncSession(self._engine) as session, session.begin():
                    released = await repository.release_leases(session, held)
            except Exception:
                log.exception("poll.release_failed", tasks=len(held))
            else:
                log.info("poll.released", tasks=released)
            self._held.clear()
        log.info("poll.stopped")

    # -- the work ---------------------------------------------------------------------------------

    async def drain(self) -> int:
        """Poll everything due now; returns how many task polls were recorded."""
        started = time.perf_counter()
        counts = [0] * self.workers
        try:
            async with asyncio.TaskGroup() as group:
                for n in range(self.workers):
                    group.create_task(self._worker(counts, n))
        finally:
            await self._connections.close()
        POLL_TICK.observe(time.perf_counter() - started)
        return sum(counts)

    async def _worker(self, counts: list[int], n: int) -> None:
        page: _Page | None = None
        results: list[PollResult] = []
        while True:
            # A full page says more is due: the next one is claimed by the statement that records
            # this one.
            more = not self._stopping and (page is None or len(page.claim.tasks) == self._page_size)
            try:
                fresh = await self._record_and_claim(page, results, claim=more)
            except Exception:
                # The leases run out by themselves and another turn polls these tasks again.
                log.exception("poll.record_failed", tasks=0 if page is None else len(page.claim.tasks))
                fresh = None
            else:
                counts[n] += len(results)
            finally:
                for task in page.claim.tasks if page is not None else ():
                    self._held.pop(task.pk, None)
            if fresh is None or not fresh.tasks:
                return
            page = _Page(fresh, time.monotonic())
            for task, lag in zip(fresh.tasks, fresh.lags_s, strict=True):
                self._held[task.pk] = _lease(task)
                CLAIM_LAG.observe(max(lag, 0.0))
            try:
                results = await self._fetch(page)
            except Exception:
                log.exception("poll.fetch_failed", tasks=len(page.claim.tasks))
                results = []  # recorded as nothing: the page's leases are handed back at once

    async def _record_and_claim(
        self, page: _Page | None, results: list[PollResult], *, claim: bool
    ) -> Claim | None:
        limit = self._page_size if claim else 0
        lease_s = self._settings.lease_s
        plan = None
        fresh: Claim | None
        lost: list[PollResult] = []
        skipped: list[tuple[int, datetime]] = []
        if page is not None:
            # The database's clock, read by the claim, carried forward: every process schedules by
            # that one clock.
            now = page.claim.now + timedelta(seconds=time.monotonic() - page.claimed_at)
            plan = plan_polls(page.claim.tasks, results, settings=self._settings, now=now)
            polled = {result.pk for result in results}
            skipped = [(task.pk, _lease(task)) for task in page.claim.tasks if task.pk not in polled]
        if plan is None or (plan.quiet and not skipped):
            # The common page: one statement records it and claims the next.
            async with self._connections.statement() as connection:
                if plan is None:
                    fresh = await repository.claim_due(connection, limit=limit, lease_s=lease_s)
                else:
                    fresh, lost = await record_polls(connection, plan, claim=limit, lease_s=lease_s)
        else:
            async with self._connections.transaction() as session:
                fresh, lost = await record_polls(session, plan, claim=limit, lease_s=lease_s)
                await repository.release_leases(session, skipped)
        if lost:
            async with self._connections.transaction() as session:
                await redo_polls(session, lost, settings=self._settings)
        return fresh if claim else None

    async def _fetch(self, page: _Page) -> list[PollResult]:
        batches: defaultdict[str, list[TaskState]] = defaultdict(list)
        singles: list[TaskState] = []
        for task in page.claim.tasks:
            action = _BATCH_ACTIONS.get(task.kind)
            if action is None or self._settings.suno_api_dialect == "v1" or polls_singly(task.last_error):
                singles.append(task)
            else:
                batches[action].append(task)
        requests = [self._poll_batch(tasks, action) for action, tasks in batches.items()]
        requests += [self._poll_single(task, page.claimed_at) for task in singles]
        results: list[PollResult] = []
        for answer in await asyncio.gather(*requests):
            results.extend(answer)
        return results

    async def _poll_batch(self, tasks: list[TaskState], action: str) -> list[PollResult]:
        answer = await self._relay.fetch_batch([task.task_id for task in tasks], action)
        seen: set[int] = set()
        for failure in answer.errors.values():
            if id(failure) not in seen:
                seen.add(id(failure))
                _count_error(failure, tasks=len(tasks))
        POLLS.labels("batch").inc(len(answer.snapshots))
        results = []
        for task in tasks:
            snapshot = answer.snapshots.get(task.task_id)
            error = answer.errors.get(task.task_id) if snapshot is None else None
            results.append(PollResult(task.pk, _lease(task), "batch", snapshot, error))
        return results

    async def _poll_single(self, task: TaskState, claimed_at: float) -> list[PollResult]:
        endpoint: Endpoint = (
            "stems" if task.kind == "stems" else "v1" if self._settings.suno_api_dialect == "v1" else "single"
        )
        async with self._single_slots:
            # A request started late in the lease could still be running when another process claims
            # the task: hand such tasks back unpolled instead.
            if time.monotonic() - claimed_at > self._settings.lease_s / 2:
                return []
            snapshot: TaskSnapshot | None = None
            error: UpstreamError | None = None
            try:
                snapshot = await fetch_snapshot(
                    self._relay, self._settings.suno_api_dialect, task.kind, task.task_id
                )
            except UpstreamError as exc:
                error = exc
                _count_error(exc, tasks=1, task_id=task.task_id)
            else:
                POLLS.labels(endpoint).inc()
        return [PollResult(task.pk, _lease(task), endpoint, snapshot, error)]


@dataclass(frozen=True, slots=True)
class _Page:
    claim: Claim
    claimed_at: float  # monotonic


def _lease(task: TaskState) -> datetime:
    lease = task.loaded[2]
    assert lease is not None  # a claimed row always carries its lease
    return lease


def _count_error(error: UpstreamError, *, tasks: int, task_id: str | None = None) -> None:
    UPSTREAM_ERRORS.labels(error.error_class, error.code).inc()
    log.info(
        "poll.upstream_error",
        task_id=task_id,
        tasks=tasks,
        error_class=error.error_class,
        code=error.code,
        http_status=error.http_status,
        retry_after_s=error.retry_after_s,
        detail=error.message,
    )


async def start_poller(runtime: Runtime) -> Poller:
    """Add the poller's tick to the lifespan's (started) scheduler; the returned object's stop() ends it."""
    if runtime.relay is None:
        raise RuntimeError("the poller needs a relay (SUNO_BASE_URL)")
    poller = Poller(runtime.settings, runtime.engine, runtime.relay)
    poller.job = runtime.scheduler.add_job(
        poller.tick,
        "interval",
        seconds=runtime.settings.poll_tick_s,
        id=f"poll-tick:{runtime.instance_id}",
        max_instances=1,
        coalesce=True,
    )
    log.info(
        "poll.started",
        instance_id=runtime.instance_id,
        workers=poller.workers,
        tick_s=runtime.settings.poll_tick_s,
    )
    return poller
