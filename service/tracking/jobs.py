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
from collections.abc import Sequence
from datetime import datetime

import structlog
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError

from service.config import Settings
from service.db import SessionMaker, transaction
from service.metrics import CLAIM_LAG, POLL_TICK, POLLS, UPSTREAM_ERRORS
from service.runtime import Runtime
from service.tracking import repository
from service.tracking.repository import ClaimedTask
from service.tracking.service import (
    Endpoint,
    PollResult,
    fetch_snapshot,
    polls_singly,
    record_polls,
)
from service.upstream.client import RelayClient
from service.upstream.schemas import TaskSnapshot, UpstreamError

log = structlog.get_logger()

# How long stop() lets in-flight pages finish before cancelling them and releasing their leases.
DRAIN_TIMEOUT_S = 3.0
# Transactions the poller holds at once; leaves the rest of the pool to the API and the dispatcher.
DB_SLOTS = 4
_BATCH_ACTIONS = {"music": "MUSIC", "lyrics": "LYRICS"}


class Poller:
    def __init__(
        self,
        settings: Settings,
        sessions: SessionMaker,
        relay: RelayClient,
        *,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        self._settings = settings
        self._drain_timeout_s = drain_timeout_s
        self._sessions = sessions
        self._relay = relay
        self._page_size = settings.poll_batch_size
        # poll_claim_size bounds the tasks this process holds leased at once.
        self.workers = max(
            1, min(settings.upstream_concurrency, settings.poll_claim_size // settings.poll_batch_size)
        )
        self._db_slots = asyncio.Semaphore(DB_SLOTS)
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
        """The scheduler's job: start a drain unless one runs. Returning at once means a busy poller
        never makes APScheduler skip runs, and stop() owns the work it has to wait for."""
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
                async with transaction(self._sessions) as session:
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
        async with asyncio.TaskGroup() as group:
            for n in range(self.workers):
                group.create_task(self._worker(counts, n))
        POLL_TICK.observe(time.perf_counter() - started)
        return sum(counts)

    async def _worker(self, counts: list[int], n: int) -> None:
        while not self._stopping:
            try:
                page = await self._claim()
            except Exception:
                log.exception("poll.claim_failed")
                return
            if page:
                counts[n] += await self._poll_page(page)
            if len(page) < self._page_size:
                return

    async def _claim(self) -> list[ClaimedTask]:
        async with self._db_slots, transaction(self._sessions) as session:
            page = await repository.claim_due(session, limit=self._page_size, lease_s=self._settings.lease_s)
        for task in page:
            self._held[task.pk] = task.lease_until
            CLAIM_LAG.observe(max(task.lag_s, 0.0))
        return page

    async def _poll_page(self, page: Sequence[ClaimedTask]) -> int:
        claimed_at = time.monotonic()
        batches: defaultdict[str, list[ClaimedTask]] = defaultdict(list)
        singles: list[ClaimedTask] = []
        for task in page:
            action = _BATCH_ACTIONS.get(task.kind)
            if action is None or self._settings.suno_api_dialect == "v1" or polls_singly(task.last_error):
                singles.append(task)
            else:
                batches[action].append(task)
        requests = [self._poll_batch(tasks, action) for action, tasks in batches.items()]
        requests += [self._poll_single(task, claimed_at) for task in singles]
        results: list[PollResult] = []
        for answer in await asyncio.gather(*requests):
            results.extend(answer)
        polled = {result.pk for result in results}
        skipped = [(task.pk, task.lease_until) for task in page if task.pk not in polled]
        stats = None
        try:
            async with self._db_slots, transaction(self._sessions) as session:
                if results:
                    stats = await record_polls(session, results, settings=self._settings)
                await repository.release_leases(session, skipped)
        except Exception:
            # The leases run out by themselves and another turn polls these tasks again.
            log.exception("poll.record_failed", tasks=len(page))
        for task in page:
            self._held.pop(task.pk, None)
        if stats is not None and stats.transitions:
            log.debug("poll.recorded", tasks=stats.tasks, transitions=stats.transitions)
        return len(results) if stats is not None else 0

    async def _poll_batch(self, tasks: list[ClaimedTask], action: str) -> list[PollResult]:
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
            results.append(PollResult(task.pk, task.lease_until, "batch", snapshot, error))
        return results

    async def _poll_single(self, task: ClaimedTask, claimed_at: float) -> list[PollResult]:
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
        return [PollResult(task.pk, task.lease_until, endpoint, snapshot, error)]


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
    poller = Poller(runtime.settings, runtime.sessions, runtime.relay)
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
