"""The poller: claims due tasks from Postgres, asks the relay about them, records what changed.

The APScheduler job only ticks. Each tick starts a drain unless one is still running; the drain runs
a few workers, each looping claim -> poll -> record over one page (up to 16 batch requests' worth of
tasks) until nothing is due; the claims sweep the live tasks in id order. While no live task is due
for a while, a tick reads only the tasks registered since it looked ahead (docs/design.md, "The idle
poller"). No task list lives in memory: each page is claimed by a transaction that keeps its rows
locked until the answers are recorded, so any number of processes can run this safely and a crashed
one's tasks are free again as soon as its connections drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from service.config import Settings
from service.db import database_unavailable
from service.metrics import CLAIM_LAG, POLL_TICK, POLLS, UPSTREAM_ERRORS
from service.runtime import Runtime
from service.tracking.repository import ClaimedTask, PollClaim, look_ahead
from service.tracking.service import (
    PollResult,
    claim_polls,
    polls_singly,
    record_polls,
)
from service.upstream.client import RelayClient
from service.upstream.schemas import TaskSnapshot, UpstreamError

log = structlog.get_logger()

# How long stop() lets in-flight pages finish before cancelling them (which rolls their claims back).
DRAIN_TIMEOUT_S = 3.0
PAGE_REQUESTS = 16
DURABLE = text("SET LOCAL synchronous_commit = on")


class _Connections:
    """The poller's connections, one per worker, kept from drain to drain until stop(): checking one
    out per page (or per tick) would add the pool's pre-ping, and the session settings below, to every
    page (or tick, even one that finds nothing due).

    Each holds its page's transaction open while the relay answers. Postgres ends a session idle in
    its transaction for longer than `idle_s`, so a process that hangs rather than dies (a stalled
    network, a frozen VM) cannot keep its tasks locked for longer than that.

    Their commits do not wait for the WAL flush unless the page asks for it (DURABLE): a page whose
    answers changed nothing wrote only its tasks' next poll, and losing that in a server crash means
    polling them again. A page that recorded anything commits durably.
    """

    def __init__(self, engine: AsyncEngine, *, idle_s: float) -> None:
        self._engine = engine
        self._idle_ms = max(1, round(idle_s * 1000))
        self._idle: list[AsyncConnection] = []

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """The same unit of work as service.db.transaction: commit at the end, roll back on error."""
        fresh = not self._idle
        connection = await self._engine.connect() if fresh else self._idle.pop()
        try:
            if fresh:
                await connection.exec_driver_sql(f"SET idle_in_transaction_session_timeout = {self._idle_ms}")
                await connection.exec_driver_sql("SET synchronous_commit = off")
                await connection.commit()
            async with AsyncSession(connection, expire_on_commit=False) as session, session.begin():
                yield session
        except BaseException:
            await connection.close()  # back to the pool, which drops it if it broke
            raise
        self._idle.append(connection)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            # The pool's other users keep the server's default.
            with contextlib.suppress(Exception):
                await connection.exec_driver_sql("RESET idle_in_transaction_session_timeout")
                await connection.exec_driver_sql("RESET synchronous_commit")
                await connection.commit()
            await connection.close()


@dataclass(frozen=True, slots=True)
class _Horizon:
    """No live task of the relay was due before `until` (monotonic) when the feed's last number was
    `mark`: until then only the tasks registered after `mark` need reading."""

    until: float
    mark: int


class Poller:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        relay: RelayClient,
        *,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        connections: int | None = None,
    ) -> None:
        """Polls `relay`'s tasks (one Poller per relay), its workers holding at most `connections`
        of the engine's pool (default: the pool's steady size)."""
        self._settings = settings
        self._drain_timeout_s = drain_timeout_s
        self._relay = relay
        # A page is several batch requests' worth of tasks; the workers' pages fill the relay's request
        # slots with two pages more (docs/design.md, "Pages, not rows"), within poll_claim_size.
        concurrency = relay.max_in_flight
        requests_per_page = min(PAGE_REQUESTS, concurrency)
        self._page_size = min(settings.poll_batch_size * requests_per_page, settings.poll_claim_size)
        # Each worker keeps a connection until stop(): one of the pool's is always left for the rest
        # of the process (the dispatcher's sweep, /readyz, the API), which would otherwise wait for it.
        self.workers = max(
            1,
            min(
                concurrency // requests_per_page + 2,
                settings.poll_claim_size // self._page_size,
                connections or engine.pool.size() - 1,  # type: ignore[attr-defined]
            ),
        )
        self._single_slots = asyncio.Semaphore(concurrency)
        # A page's transaction sits idle while the relay answers. Single requests start within half a
        # lease of the claim (_poll_single); a page's batch requests may queue behind the other pages'
        # for a slot (a round per page ahead), and none takes longer than the upstream timeout once it
        # has one.
        rounds = math.ceil(self.workers * requests_per_page / concurrency)
        self.idle_limit_s = settings.lease_s + settings.upstream_timeout_s * rounds
        self._connections = _Connections(engine, idle_s=self.idle_limit_s)
        # Claims sweep the live tasks by id: each page starts after the last id the previous one took,
        # and a short page ends the sweep. One claim at a time (docs/design.md, "The poller's claim").
        self._sweep_after = 0
        # Whose claims the cursor is for: the look-ahead mark of the drain that set it (None: a sweep).
        self._cursor_since: int | None = None
        self._claiming = asyncio.Lock()
        self._horizon: _Horizon | None = None
        # The last sweep polled something: sweep again rather than look ahead (which would find work).
        self._busy = False
        self._database_down = False
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
        """Stop claiming, let in-flight pages finish for a moment, then cancel them: their transactions
        roll back, so another process (or the next start) polls those tasks at once."""
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
        await self._connections.close()
        log.info("poll.stopped")

    # -- the work ---------------------------------------------------------------------------------

    async def drain(self) -> int:
        """Poll everything due now; returns how many task polls were recorded."""
        started = time.perf_counter()
        try:
            return await self._drain()
        finally:
            POLL_TICK.observe(time.perf_counter() - started)  # a failed one too

    async def _drain(self) -> int:
        try:
            since = await self._since()
        except Exception as exc:  # logged; the next tick tries again
            self._failed(exc)
            return 0
        if since != self._cursor_since:
            self._sweep_after, self._cursor_since = 0, since
        async with asyncio.TaskGroup() as group:
            crew = _Crew(group, self._worker, self.workers, since)
            crew.top_up()
        if since is None:
            self._busy = crew.polled > 0 or crew.failed
        return crew.polled

    async def _since(self) -> int | None:
        """The feed mark of the look-ahead in force, after which claims read only the tasks registered
        (None: sweep every live task). Looks ahead again once it has run out, unless the last sweep
        found work: one aggregate over the live tasks tells when the next is due."""
        now = time.monotonic()
        if self._horizon is not None and now < self._horizon.until:
            return self._horizon.mark
        self._horizon = None
        if self._busy:
            return None
        async with self._connections.transaction() as session:
            ahead = await look_ahead(session, relay=self._relay.name)
        self._recovered()
        if ahead.due_in_s is not None and ahead.due_in_s <= 0:
            return None  # due now, or held by a page in flight (whose rollback would leave it due)
        # Never further ahead than the longest poll interval: a change this cannot see (a write by
        # hand) then waits no longer than an unchanging task does.
        limit_s = self._settings.poll_max_interval_s
        wait_s = limit_s if ahead.due_in_s is None else min(ahead.due_in_s, limit_s)
        self._horizon = _Horizon(now + wait_s, ahead.mark)
        return ahead.mark

    def _failed(self, exc: BaseException) -> None:
        """Log a page's (or look-ahead's) failure; a database outage once, however many ticks it lasts."""
        if not database_unavailable(exc):
            log.error("poll.page_failed", exc_info=exc)
        elif not self._database_down:
            self._database_down = True
            log.warning("poll.database_unavailable", relay=self._relay.name, error=type(exc).__name__)

    def _recovered(self) -> None:
        if self._database_down:
            self._database_down = False
            log.info("poll.database_recovered", relay=self._relay.name)

    async def _worker(self, crew: _Crew) -> None:
        try:
            while not self._stopping:
                try:
                    claimed = await self._poll_page(crew)
                except Exception as exc:
                    # Rolled back: the page's tasks are due again, for the next tick. No more workers
                    # this drain: a failing database should not be hammered at the speed of a loop.
                    self._failed(exc)
                    crew.failed = True
                    return
                self._recovered()
                crew.polled += claimed
                if claimed < self._page_size:  # nothing more is due, or others hold the rest
                    return
                # A full page: more may be due than this worker alone can poll. A worker that found a
                # short page (others held the rest at that moment) is replaced, so the drain keeps its
                # width for as long as work keeps coming instead of narrowing to one worker.
                crew.top_up()
        finally:
            crew.active -= 1

    async def _poll_page(self, crew: _Crew) -> int:
        """Claim, poll and record one page in one transaction; returns how many tasks it claimed."""
        async with self._connections.transaction() as session:
            async with self._claiming:
                if crew.swept_all:
                    return 0
                after = self._sweep_after
                claim = await claim_polls(
                    session,
                    relay=self._relay.name,
                    after=after,
                    limit=self._page_size,
                    settings=self._settings,
                    since=crew.since,
                )
                full = len(claim.tasks) == self._page_size
                self._sweep_after = max(task.id for task in claim.tasks) if full else 0
                crew.swept_all = after == 0 and not full
            if not claim.tasks:
                return 0
            claimed_at = time.monotonic()
            CLAIM_LAG.observe_many([task.lag_s for task in claim.tasks])
            results = await self._fetch(claim, claimed_at)
            # The database's clock, read by the claim, carried forward: every process schedules by
            # that one clock.
            now = claim.now + timedelta(seconds=time.monotonic() - claimed_at)
            if await record_polls(session, claim, results, settings=self._settings, now=now):
                await session.execute(DURABLE)
        return len(claim.tasks)

    async def _fetch(self, claim: PollClaim, claimed_at: float) -> list[PollResult]:
        batches: defaultdict[str, list[ClaimedTask]] = defaultdict(list)
        # Several clients' records of one relay task are claimed together: one request for them all
        # (a batch request asks for each id once).
        singles: defaultdict[tuple[str, str], list[ClaimedTask]] = defaultdict(list)
        for task in claim.tasks:
            if self._relay.batches(task.kind) and not polls_singly(task.last_error):
                batches[task.kind].append(task)
            else:
                singles[task.kind, task.task_id].append(task)
        requests = [self._poll_batch(kind, tasks) for kind, tasks in batches.items()]
        requests += [self._poll_single(tasks, claimed_at) for tasks in singles.values()]
        results: list[PollResult] = []
        for answer in await asyncio.gather(*requests):
            results.extend(answer)
        return results

    async def _poll_batch(self, kind: str, tasks: list[ClaimedTask]) -> list[PollResult]:
        answer = await self._relay.fetch_tasks(kind, [task.task_id for task in tasks])
        seen: set[int] = set()
        for failure in answer.errors.values():
            if id(failure) not in seen:
                seen.add(id(failure))
                _count_error(failure, tasks=len(tasks))
        POLLS.labels(self._relay.endpoint(kind, batched=True)).inc(len(answer.snapshots))
        results = []
        for task in tasks:
            snapshot = answer.snapshots.get(task.task_id)
            error = answer.errors.get(task.task_id) if snapshot is None else None
            results.append(PollResult(task.id, True, snapshot, error))
        return results

    async def _poll_single(self, tasks: list[ClaimedTask], claimed_at: float) -> list[PollResult]:
        """One request about one relay task, for each client's record of it in `tasks`."""
        task = tasks[0]
        async with self._single_slots:
            # A request started late in the lease could outlive it (Postgres would end the session and
            # the whole page with it): hand such tasks back unpolled instead.
            if time.monotonic() - claimed_at > self._settings.lease_s / 2:
                return []
            snapshot: TaskSnapshot | None = None
            error: UpstreamError | None = None
            try:
                snapshot = await self._relay.fetch_task(task.kind, task.task_id)
            except UpstreamError as exc:
                error = exc
                _count_error(exc, tasks=1, task_id=task.task_id)
            else:
                POLLS.labels(self._relay.endpoint(task.kind, batched=False)).inc()
        return [PollResult(each.id, False, snapshot, error) for each in tasks]


class _Crew:
    """A drain's workers: how many run, what they polled, whether one failed, and whether a sweep from
    the lowest id came back short (every due task was claimed: the other workers need not read the
    live tasks again to find that out). `since`: the look-ahead mark its claims read after (None:
    they sweep every live task)."""

    def __init__(
        self,
        group: asyncio.TaskGroup,
        worker: Callable[[_Crew], Coroutine[Any, Any, None]],
        size: int,
        since: int | None,
    ) -> None:
        self._group = group
        self._worker = worker
        self.size = size
        self.since = since
        self.active = 0
        self.polled = 0
        self.failed = False
        self.swept_all = False

    def top_up(self) -> None:
        while not self.failed and not self.swept_all and self.active < self.size:
            self.active += 1
            self._group.create_task(self._worker(self))


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


async def start_poller(runtime: Runtime, relay: RelayClient, *, connections: int | None = None) -> Poller:
    """Add a poller of `relay`'s tasks to the lifespan's (started) scheduler; its stop() ends it."""
    poller = Poller(runtime.settings, runtime.engine, relay, connections=connections)
    poller.job = runtime.scheduler.add_job(
        poller.tick,
        "interval",
        seconds=runtime.settings.poll_tick_s,
        id=f"poll-tick:{relay.name}:{runtime.instance_id}",
        max_instances=1,
        coalesce=True,
    )
    log.info(
        "poll.started",
        instance_id=runtime.instance_id,
        relay=relay.name,
        workers=poller.workers,
        tick_s=runtime.settings.poll_tick_s,
    )
    return poller


async def start_pollers(runtime: Runtime) -> list[Poller]:
    """A poller per configured relay, each with its own drain, request slots and share of the pool's
    connections (one of which is left for the rest of the process): a slow or failing relay never
    holds up another's polling."""
    pollable = runtime.engine.pool.size() - 1  # type: ignore[attr-defined]
    share = max(1, pollable // max(1, len(runtime.relays)))
    return [await start_poller(runtime, relay, connections=share) for relay in runtime.relays.values()]
