"""How a drain spreads its pages over workers. Pages come from a script here instead of Postgres and
the relay (those are covered by the lifecycle and process tests): what is under test is only which
workers run, and when."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import text

from service.db import transaction
from service.tracking import jobs
from service.tracking.jobs import Poller, _Crew
from service.tracking.repository import PollClaim
from tests.tracking.conftest import Tracking


class ScriptedPoller(Poller):
    """Each page claims the script's next count (0 once it runs out); a negative count fails."""

    def __init__(self, tracking: Tracking, script: list[int]) -> None:
        super().__init__(tracking.settings, tracking.engine, tracking.relay)
        self.script = iter(script)
        self.in_flight = 0
        # How many pages were in flight when each page started, after the first short (or failed) one.
        self.widths_after_short: list[int] = []
        self.widths_after_failure: list[int] = []
        self._seen_short = self._seen_failure = False

    async def _poll_page(self, crew: _Crew) -> int:
        self.in_flight += 1
        if self._seen_short:
            self.widths_after_short.append(self.in_flight)
        if self._seen_failure:
            self.widths_after_failure.append(self.in_flight)
        try:
            claimed = next(self.script, 0)
            await asyncio.sleep(0.01)  # a page takes a while: the others get to start theirs
            if claimed < 0:
                self._seen_failure = True
                raise RuntimeError("the database went away")
            if claimed < self._page_size:
                self._seen_short = True
            return claimed
        finally:
            self.in_flight -= 1

    async def _since(self) -> int | None:
        return None  # every drain sweeps: no look-ahead


async def test_a_short_page_does_not_narrow_the_drain(
    tracking_factory: Callable[..., Awaitable[Tracking]],
) -> None:
    # Pages of 5 x 8 tasks on 3 workers.
    tracking = await tracking_factory(SUNOTRACK_POLL_BATCH_SIZE="5", SUNOTRACK_UPSTREAM_CONCURRENCY="8")
    full = 40
    # The first page comes back empty (the other worker's claim held every due row at that moment);
    # plenty is due after it.
    poller = ScriptedPoller(tracking, [0] + [full] * 12 + [7])
    assert (poller.workers, poller._page_size) == (3, full)

    polled = await poller.drain()

    assert polled == 12 * full + 7
    # The worker that found nothing was replaced as soon as a full page came back: all three ran side
    # by side for the rest of the drain, not the two left.
    assert poller.widths_after_short.count(3) >= 9, poller.widths_after_short


async def test_a_failed_page_stops_replacing_workers(
    tracking_factory: Callable[..., Awaitable[Tracking]],
) -> None:
    tracking = await tracking_factory(SUNOTRACK_POLL_BATCH_SIZE="5", SUNOTRACK_UPSTREAM_CONCURRENCY="8")
    full = 40
    poller = ScriptedPoller(tracking, [-1] + [full] * 6)

    polled = await poller.drain()

    # The other workers poll what is due on their own, and the drain ends.
    assert polled == 6 * full
    assert max(poller.widths_after_failure) == poller.workers - 1 == 2, poller.widths_after_failure


async def test_a_drain_with_nothing_due_reads_the_live_tasks_once(
    tracking_factory: Callable[..., Awaitable[Tracking]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each claim that finds nothing reads every live task above its cursor: the other workers must
    not each sweep the whole table again to find out the same."""
    tracking = await tracking_factory(SUNOTRACK_POLL_BATCH_SIZE="5", SUNOTRACK_UPSTREAM_CONCURRENCY="8")
    for n in range(50):
        await tracking.register(f"idle-{n}")
    async with transaction(tracking.sessions) as session:
        await session.execute(text("UPDATE tasks SET next_poll_at = now() + interval '1 hour'"))
    claims_from: list[int] = []
    claim_polls = jobs.claim_polls

    async def counted(*args: Any, after: int, **kwargs: Any) -> PollClaim:
        claims_from.append(after)
        return await claim_polls(*args, after=after, **kwargs)

    monkeypatch.setattr(jobs, "claim_polls", counted)
    poller = tracking.poller
    assert poller.workers == 3

    poller._busy = True  # the last sweep found work: this one sweeps again (no look-ahead)
    assert await poller.drain() == 0
    assert claims_from == [0]

    # A sweep that had stopped part-way ends where it was, then goes once over the rest.
    poller._busy = True
    poller._sweep_after = 25
    claims_from.clear()
    assert await poller.drain() == 0
    assert claims_from == [25, 0]


async def test_the_idle_limit_allows_for_each_round_of_requests_a_page_may_queue_behind(
    tracking_factory: Callable[..., Awaitable[Tracking]],
) -> None:
    # 3 pages of 16 requests on 16 slots: the last page's requests may wait for two rounds of the others'.
    tracking = await tracking_factory(
        SUNOTRACK_LEASE_S="2", SUNOTRACK_UPSTREAM_TIMEOUT_S="1", SUNOTRACK_UPSTREAM_CONCURRENCY="16"
    )
    poller = tracking.poller
    assert (poller.workers, poller.idle_limit_s) == (3, 2 + 3 * 1)

    async with poller._connections.transaction() as session:
        setting = "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'"
        assert (await session.execute(text(setting))).scalar_one() == "5000"
