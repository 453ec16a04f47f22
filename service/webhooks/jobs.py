"""The webhook dispatcher: wakes on NOTIFY (or the sweep), claims due deliveries, POSTs them, settles them.

Safe on many replicas by construction: the scheduler and the LISTEN connection only wake this process,
and the lease each claim writes into `deliveries.next_attempt_at` decides who sends what.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import structlog
from apscheduler.jobstores.base import JobLookupError

from service.db import DB_ERRORS, driver_dsn, listen_forever, transaction
from service.metrics import DELIVERY_ATTEMPTS, DELIVERY_LATENCY, HOSTS_PAUSED
from service.runtime import Runtime
from service.vocabulary import DeliveryStatus
from service.webhooks.attempts import (
    RETRY_JITTER,
    AttemptResult,
    Settlement,
    attempt_delivery,
    outcome,
    settle,
)
from service.webhooks.hosts import HostBook, HostView
from service.webhooks.outbox import CHANNEL
from service.webhooks.repository import (
    CLAIM_SESSION,
    Blocked,
    ClaimedDelivery,
    Driver,
    Lane,
    claim_due_deliveries,
    count_paused_hosts,
    record_attempts,
    release_claims,
)
from service.webhooks.signing import client_keys, secret_keys
from service.webhooks.ssrf import webhook_connector

log = structlog.get_logger()

STOP_GRACE_S = 5.0
WRITE_RETRIES = 3
# While sends are in flight, a few results are moments away: the flush waits this long for them, so one
# write settles many (docs/design.md, "Fair delivery claims").
FLUSH_LINGER_S = 0.005
# A row claimed ahead goes out only while its lease has the whole webhook timeout and this much left;
# later it is released instead (another process may claim it once the lease ends).
AHEAD_MARGIN_S = 0.5


async def start_dispatcher(runtime: Runtime) -> Dispatcher:
    dispatcher = Dispatcher(runtime)
    await dispatcher.start()
    return dispatcher


class DriverConnection:
    """A dedicated asyncpg connection one loop keeps for its statements, reopened after an error.

    Outside the engine's pool: a checkout there costs a pre-ping round trip, as much as the statement.
    """

    def __init__(self, dsn: str, *, name: str, settings: Mapping[str, str] | None = None) -> None:
        self._dsn = dsn
        self._name = name
        self._settings = dict(settings or {})
        self._connection: Any = None

    async def get(self) -> Driver:
        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(
                self._dsn,
                timeout=10,
                command_timeout=30,
                # Only claims and attempt bookkeeping go through here. Should the database crash, losing
                # its last milliseconds of these means a delivery goes out again under the same
                # webhook-id, never that one is lost (the outbox rows are written elsewhere, durably);
                # in exchange no statement here waits for a WAL flush.
                server_settings={
                    "application_name": self._name,
                    "jit": "off",
                    "synchronous_commit": "off",
                    **self._settings,
                },
            )
        driver: Driver = self._connection
        return driver

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(*DB_ERRORS):
                await asyncio.wait_for(connection.close(), 5)
            connection.terminate()


class Dispatcher:
    """One per process. `stop()` stops claiming, lets in-flight sends finish briefly, releases the rest."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._settings = runtime.settings
        self._dsn = driver_dsn(runtime.engine)
        self._claim_db = DriverConnection(self._dsn, name="sunotrack-webhooks-claim", settings=CLAIM_SESSION)
        self._write_db = DriverConnection(self._dsn, name="sunotrack-webhooks-write")
        self._min_claim = max(1, runtime.settings.webhook_concurrency // 4)
        self._keys = secret_keys(runtime.settings.webhook_secrets)
        self._job_id = f"webhooks.sweep:{runtime.instance_id}"
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._results_ready = asyncio.Event()
        self._stopping = False
        self._closing = False
        self._in_flight: dict[int, ClaimedDelivery] = {}
        # Claim-ahead (docs/design.md, "Fair delivery claims"): rows claimed before their lane has a
        # free slot, each with the loop time after which its lease no longer covers a send.
        self._ahead: dict[Lane, deque[tuple[ClaimedDelivery, float]]] = {}
        self._ahead_s = runtime.settings.lease_s - runtime.settings.webhook_timeout_s - AHEAD_MARGIN_S
        # The lane the last claim that found any due rows found alone: it may use its lone allowance.
        self._alone: Lane | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._hosts = HostBook(
            concurrency=runtime.settings.hook_host_concurrency,
            client_concurrency=runtime.settings.webhook_concurrency
            - runtime.settings.webhook_concurrency // 4,
            slow_s=runtime.settings.hook_slow_s,
        )
        # A lone lane's buffer: two claims' worth, within its allowance (docs/design.md, "Fair delivery
        # claims": one claim's worth drained before the next claim came back under load).
        self._ahead_cap = min(2 * self._min_claim, self._hosts.alone_share) if self._ahead_s > 0 else 0
        # Lanes and clients the last claim left due rows of because they had no free slot: a send of
        # theirs finishing is worth a claim.
        self._blocked = Blocked()
        self._sends: set[asyncio.Task[None]] = set()
        self._results: list[tuple[ClaimedDelivery, AttemptResult, Settlement]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._log = log.bind(instance_id=runtime.instance_id)
        self._attempt_counters: dict[str, Any] = {}

    @property
    def held(self) -> bool:
        """True when SUNOTRACK_WEBHOOK_SECRET is unset: the admin's tasks' deliveries stay queued rather
        than going out unsigned (clients' go out, signed with their own secrets)."""
        return not self._keys

    async def start(self) -> None:
        settings = self._settings
        if not self._keys:
            self._log.error(
                "webhooks.unsigned_refused",
                reason="SUNOTRACK_WEBHOOK_SECRET is not set: deliveries of tasks registered with the "
                "admin token stay pending until it is",
            )
        if settings.lease_s <= settings.webhook_timeout_s:
            self._log.warning(
                "webhooks.lease_shorter_than_timeout",
                lease_s=settings.lease_s,
                timeout_s=settings.webhook_timeout_s,
                risk="a slow receiver may get a delivery twice",
            )
        self._http = aiohttp.ClientSession(
            connector=webhook_connector(
                allow_private=settings.allow_private_hooks, limit=settings.webhook_concurrency
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_s),
            raise_for_status=False,
        )
        self._loops = {
            "listen": asyncio.create_task(self._listen_loop(), name="webhooks.listen"),
            "claim": asyncio.create_task(self._claim_loop(), name="webhooks.claim"),
            "flush": asyncio.create_task(self._flush_loop(), name="webhooks.flush"),
        }
        self._runtime.scheduler.add_job(
            self._sweep,
            "interval",
            seconds=settings.webhook_sweep_s,
            id=self._job_id,
            max_instances=1,
            coalesce=True,
            replace_existing=True,
        )
        self.wake()
        self._log.info("webhooks.dispatcher_started", concurrency=settings.webhook_concurrency)

    def wake(self) -> None:
        self._wake.set()

    def hosts(self) -> list[HostView]:
        """This process's view of the hosts it sends to: in flight, share, recent answer times."""
        return self._hosts.view()

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(JobLookupError):
            self._runtime.scheduler.remove_job(self._job_id)
        self._wake.set()
        self._slot_freed.set()
        await self._finish(self._loops["claim"])
        if self._sends:
            _, unfinished = await asyncio.wait(set(self._sends), timeout=STOP_GRACE_S)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        unsent = list(self._in_flight.values()) + self._drop_ahead(lambda _: True)
        self._closing = True
        self._results_ready.set()
        await self._finish(self._loops["flush"])
        if unsent:
            try:
                async with transaction(self._runtime.sessions) as session:
                    await release_claims(session, unsent)
            except DB_ERRORS as exc:
                self._log.warning("webhooks.release_failed", count=len(unsent), error=str(exc))
        await asyncio.gather(*self._releases, return_exceptions=True)
        self._loops["listen"].cancel()
        await asyncio.gather(self._loops["listen"], return_exceptions=True)
        await self._claim_db.close()
        await self._write_db.close()
        if self._timer is not None:
            self._timer.cancel()
        if self._http is not None:
            await self._http.close()
        self._log.info("webhooks.dispatcher_stopped", released=len(unsent))

    @staticmethod
    async def _finish(task: asyncio.Task[None]) -> None:
        _, pending = await asyncio.wait({task}, timeout=STOP_GRACE_S)
        if pending:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # --- waking ---------------------------------------------------------------------------------------

    def _wake_at(self, when: datetime) -> None:
        """Arm one timer for the earliest retry or pause end this process knows of."""
        loop = asyncio.get_running_loop()
        due = loop.time() + max((when - datetime.now(UTC)).total_seconds(), 0.0)
        if due >= self._timer_due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = math.inf
        self.wake()

    async def _sweep(self) -> None:
        """Fallback tick: catches rows whose NOTIFY was missed and leases left by crashed processes."""
        self.wake()
        self._hosts.forget_idle()
        try:
            async with transaction(self._runtime.sessions) as session:
                HOSTS_PAUSED.set(await count_paused_hosts(session))
        except DB_ERRORS as exc:
            self._log.warning("webhooks.sweep_failed", error=str(exc))

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def _listen_loop(self) -> None:
        await listen_forever(
            self._dsn, CHANNEL, self._on_notify,
            on_listening=self.wake, application_name="sunotrack-listen", logger=self._log, events="webhooks",
        )  # fmt: skip

    # --- claiming and sending -------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        settings = self._settings
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            while not self._stopping:
                # Free slots, less the rows waiting for them, and room for a few claimed ahead of them.
                free = settings.webhook_concurrency + self._ahead_cap
                free -= len(self._in_flight) + sum(map(len, self._ahead.values()))
                # While sends are in flight, wait for a few slots rather than claiming rows one at a time.
                if free < (self._min_claim if self._in_flight else 1):
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                send_by = asyncio.get_running_loop().time() + self._ahead_s
                try:
                    claim = await claim_due_deliveries(
                        await self._claim_db.get(),
                        limit=free,
                        lease_s=settings.lease_s,
                        breaker_failures=settings.hook_breaker_failures,
                        probe_s=settings.webhook_timeout_s + 1,
                        signs_admin=bool(self._keys),
                        quotas=self._hosts.quotas(self._ahead_cap),
                    )
                except Exception as exc:
                    # The sweep wakes us again; the rows are unclaimed or come back with their lease.
                    if isinstance(exc, DB_ERRORS):
                        self._log.warning("webhooks.claim_failed", error=str(exc))
                    else:
                        self._log.exception("webhooks.claim_failed")
                    await self._claim_db.close()
                    break
                if claim.wake_at is not None:
                    self._wake_at(claim.wake_at)
                self._blocked = claim.blocked
                if claim.due_lanes:
                    self._alone = claim.alone
                for delivery in claim.deliveries:
                    if self._may_start(delivery.lane):
                        self._start(delivery)
                    else:
                        self._ahead.setdefault(delivery.lane, deque()).append((delivery, send_by))
                        self._hosts.claimed_ahead(delivery.lane)
                if len(claim.deliveries) + claim.deferred < free:
                    break

    def _may_start(self, lane: Lane) -> bool:
        return (
            not self._stopping
            and len(self._in_flight) < self._settings.webhook_concurrency
            and self._hosts.may_start(lane, alone=lane == self._alone)
        )

    def _start(self, delivery: ClaimedDelivery) -> None:
        self._in_flight[delivery.id] = delivery
        self._hosts.started(delivery.lane)
        task = asyncio.create_task(self._send(delivery))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _start_ahead(self, lane: Lane) -> None:
        """Send rows claimed ahead while their lanes have free slots, `lane`'s first; release those
        whose lease no longer covers a send."""
        now = asyncio.get_running_loop().time()
        stale: list[ClaimedDelivery] = []
        for each in (lane, *(other for other in self._ahead if other != lane)):
            queue = self._ahead.get(each)
            while queue and self._may_start(each):
                delivery, send_by = queue.popleft()
                self._hosts.unclaimed_ahead(each)
                if now > send_by:
                    stale.append(delivery)
                else:
                    self._start(delivery)
            if queue is not None and not queue:
                del self._ahead[each]
        self._release(stale)

    def _drop_ahead(self, which: Callable[[Lane], bool]) -> list[ClaimedDelivery]:
        """Take the rows claimed ahead of the lanes `which` selects out of the buffer; returns them."""
        dropped: list[ClaimedDelivery] = []
        for lane in [lane for lane in self._ahead if which(lane)]:
            queue = self._ahead.pop(lane)
            self._hosts.unclaimed_ahead(lane, len(queue))
            dropped.extend(delivery for delivery, _ in queue)
        return dropped

    def _release(self, deliveries: list[ClaimedDelivery]) -> None:
        """Hand rows back in the background: due at once, for this process's next claim or another's."""
        if deliveries:
            task = asyncio.create_task(self._release_now(deliveries))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release_now(self, deliveries: list[ClaimedDelivery]) -> None:
        try:
            async with transaction(self._runtime.sessions) as session:
                await release_claims(session, deliveries)
        except DB_ERRORS as exc:
            # Their lease ends them: sent by whoever claims them then.
            self._log.warning("webhooks.release_failed", count=len(deliveries), error=str(exc))

    async def _send(self, delivery: ClaimedDelivery) -> None:
        assert self._http is not None
        settings = self._settings
        result = await attempt_delivery(
            self._http,
            delivery,
            keys=self._keys
            if delivery.webhook_secret is None
            else client_keys(delivery.webhook_secret, delivery.previous_webhook_secret),
            allow_private=settings.allow_private_hooks,
        )
        settlement = settle(delivery, result, settings.webhook_retry_schedule)
        self._results.append((delivery, result, settlement))
        del self._in_flight[delivery.id]
        if self._hosts.finished(delivery.lane, result.duration_ms / 1000):
            # No longer answering fast: its rows claimed ahead would wait for slots it no longer gets.
            self._release(self._drop_ahead(lambda lane: lane[1] == delivery.host))
        if self._ahead:
            self._start_ahead(delivery.lane)
        # A lane (or client) with rows left waits for a few free slots, so that its claims take a few
        # rows at a time rather than one.
        if self._hosts.worth_a_claim(self._blocked, delivery.lane, self._ahead_cap):
            self._blocked = Blocked()
            self.wake()
        self._slot_freed.set()
        self._results_ready.set()
        self._observe(delivery, result, settlement)

    def _observe(self, delivery: ClaimedDelivery, result: AttemptResult, settlement: Settlement) -> None:
        outcome = result.error_class or f"{(result.status_code or 0) // 100}xx"
        if (counter := self._attempt_counters.get(outcome)) is None:
            counter = self._attempt_counters[outcome] = DELIVERY_ATTEMPTS.labels(outcome=outcome)
        counter.inc()
        DELIVERY_LATENCY.observe(result.duration_ms / 1000)
        if result.ok:
            return
        event = (
            "webhooks.delivery_dead"
            if settlement.status == DeliveryStatus.DEAD
            else "webhooks.attempt_failed"
        )
        self._log.warning(
            event,
            delivery_id=delivery.id,
            task_id=delivery.task_id,
            webhook_id=delivery.webhook_id,
            attempt=delivery.attempts + 1,
            status_code=result.status_code,
            error_class=result.error_class,
            error=result.error,
            next_attempt_at=settlement.next_attempt_at,
        )

    # --- writing results ------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            if len(self._results) < self._min_claim and self._in_flight and not self._closing:
                await asyncio.sleep(FLUSH_LINGER_S)
            batch, self._results = self._results, []
            if batch:
                await self._write(batch)
            if self._closing and not self._results:
                return

    async def _write(self, batch: list[tuple[ClaimedDelivery, AttemptResult, Settlement]]) -> None:
        settings = self._settings
        for attempt in range(1, WRITE_RETRIES + 1):
            try:
                paused = await record_attempts(
                    await self._write_db.get(),
                    [(d.host, result.host_failed, outcome(d, result, s)) for d, result, s in batch],
                    breaker_failures=settings.hook_breaker_failures,
                    breaker_pause_s=settings.hook_breaker_pause_s,
                    jitter=RETRY_JITTER,
                )
                break
            except Exception as exc:
                await self._write_db.close()
                if not isinstance(exc, DB_ERRORS):
                    self._log.exception("webhooks.results_failed")
                if attempt == WRITE_RETRIES:
                    # The rows keep their lease and are sent again once it expires: at least once.
                    self._log.error("webhooks.results_lost", count=len(batch), error=str(exc))
                    return
                await asyncio.sleep(0.1 * attempt)
        for host, until in paused:
            self._log.warning("webhooks.host_paused", host=host, paused_until=until)
            self._wake_at(until)
        if paused:
            # Their rows claimed ahead go back too: the claim holds them until each pause ends.
            hosts = {host for host, _ in paused}
            self._release(self._drop_ahead(lambda lane: lane[1] in hosts))
        retries = [s.next_attempt_at for _, _, s in batch if s.next_attempt_at is not None]
        if retries:
            self._wake_at(min(retries))
