"""The idle poller (docs/design.md, "The idle poller"): while no live task is due, a tick reads only
the tasks registered since it looked ahead. Each test makes a task due before the look-ahead runs out
in one of the ways that can happen, and needs it polled then: the look-ahead reaches 10 minutes here,
far past each wait."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy import text

from service.db import transaction
from service.feed.sequencer import number_all
from service.tracking.jobs import Poller
from service.tracking.service import cancel_task, claim_polls, register_task
from service.upstream.fake import Advance, FakeRelay
from tests.conftest import wait_until
from tests.tracking.conftest import Tracking
from tests.tracking.test_clients import clients

# The longest poll interval, and so the furthest a look-ahead reaches.
LONG_S = "600"


def steady(fake_relay: FakeRelay) -> str:
    """A task the relay reports in progress from its first answer on: a change once, then none."""
    return fake_relay.add_task(stages=["IN_PROGRESS"], advance=Advance.MANUAL)


async def polls(tracking: Tracking, task_id: str, client_id: int | None = None) -> int:
    rows = await tracking.fetch(
        "SELECT poll_count FROM tasks WHERE task_id = :task_id AND client_id IS NOT DISTINCT FROM :client",
        task_id=task_id,
        client=client_id,
    )
    return int(rows[0].poll_count)


async def rest(tracking: Tracking, task_id: str, seconds: float = 3600) -> None:
    """Schedule the task's next poll `seconds` ahead (before any look-ahead: it sees that)."""
    async with transaction(tracking.sessions) as session:
        await session.execute(
            text("UPDATE tasks SET next_poll_at = now() + make_interval(secs => :s) WHERE task_id = :id"),
            {"s": seconds, "id": task_id},
        )


async def looking_ahead(tracking: Tracking) -> object:
    """Drain with nothing due: the poller looks ahead (after one more sweep, if the last one found
    work). Returns the look-ahead, to check it is still the one in force (the task was found within
    it, not by a sweep after it). Numbers the feed first, as a process's sequencer would have: the
    tasks registered so far are then behind the look-ahead's mark."""
    await number_all(tracking.engine)
    poller = tracking.poller
    for _ in range(2):
        assert await poller.drain() == 0
        if poller._horizon is not None:
            return poller._horizon
    raise AssertionError("the poller did not look ahead")


async def polled_again(
    tracking: Tracking, poller: Poller, task_id: str, *, client_id: int | None = None
) -> None:
    before = await polls(tracking, task_id, client_id)

    async def more() -> bool:
        return await polls(tracking, task_id, client_id) > before

    await wait_until(more, timeout=5, step=poller.drain, what=f"{task_id} polled again")


async def test_tasks_registered_during_a_look_ahead_are_polled_when_due(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    tracking = await tracking_factory(SUNOTRACK_POLL_MAX_INTERVAL_S=LONG_S)
    resting = steady(fake_relay)
    await tracking.register(resting)
    await rest(tracking, resting)
    poller = tracking.poller
    horizon = await looking_ahead(tracking)

    unnumbered, numbered = steady(fake_relay), steady(fake_relay)
    await tracking.register(unnumbered)  # no sequencer runs here: its event is not numbered yet
    await polled_again(tracking, poller, unnumbered)
    await tracking.register(numbered)
    assert await number_all(tracking.engine) >= 1
    await polled_again(tracking, poller, numbered)

    assert poller._horizon is horizon
    assert await polls(tracking, resting) == 0


async def test_a_registration_committed_after_a_later_one_is_polled(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    """Ids are taken at insert, not at commit: a registration holding a smaller id may commit after
    the look-ahead saw a larger one (`id > the largest seen` would never read it). Feed numbers are
    given after commit, in commit order."""
    tracking = await tracking_factory(SUNOTRACK_POLL_MAX_INTERVAL_S=LONG_S)
    early, late = steady(fake_relay), steady(fake_relay)
    async with tracking.sessions() as slow, slow.begin():
        await register_task(
            slow, task_id=early, kind="music", notify_hook=None, notify_format=None, metadata=None,
            settings=tracking.settings,
        )  # fmt: skip
        await tracking.register(late)
        await rest(tracking, late)
        horizon = await looking_ahead(tracking)
    [(early_pk,)] = await tracking.fetch("SELECT id FROM tasks WHERE task_id = :id", id=early)
    [(late_pk,)] = await tracking.fetch("SELECT id FROM tasks WHERE task_id = :id", id=late)
    assert early_pk < late_pk
    assert await number_all(tracking.engine) == 1  # the early one's, numbered after the mark

    await polled_again(tracking, tracking.poller, early)
    assert tracking.poller._horizon is horizon


async def test_a_task_another_process_rescheduled_is_polled_once_that_process_is_gone(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    """The other process's page wrote an earlier next poll than this one's look-ahead: one only
    lowering its look-ahead for its own writes would wait for it to run out."""
    gone = await tracking_factory(SUNOTRACK_POLL_MAX_INTERVAL_S=LONG_S)
    here = await tracking_factory(SUNOTRACK_POLL_MAX_INTERVAL_S=LONG_S)
    resting = steady(fake_relay)
    await here.register(resting)
    await rest(here, resting)
    horizon = await looking_ahead(here)

    task_id = steady(fake_relay)
    await here.register(task_id)
    await polled_again(gone, gone.poller, task_id)  # a change: due again at the shortest interval
    await gone.poller.stop()
    assert await here.status(task_id) == "in_progress"

    await polled_again(here, here.poller, task_id)
    assert here.poller._horizon is horizon


async def test_a_task_held_by_a_page_in_flight_is_polled_once_that_page_rolls_back(
    tracking: Tracking, fake_relay: FakeRelay
) -> None:
    """A process claimed it and died (or hung until Postgres ended its session): its page rolls back
    and the task is due as before. Looking ahead while the page is open must not look past it."""
    task_id = steady(fake_relay)
    await tracking.register(task_id)
    poller = tracking.poller

    async def due() -> bool:
        rows = await tracking.fetch(
            "SELECT next_poll_at <= now() AS due FROM tasks WHERE task_id = :id", id=task_id
        )
        return bool(rows[0].due)

    await wait_until(due, timeout=5)
    async with tracking.sessions() as dying, dying.begin():
        claim = await claim_polls(dying, limit=10, settings=tracking.settings)
        assert [task.task_id for task in claim.tasks] == [task_id]
        assert await poller.drain() == 0  # held by the other page
        assert await poller.drain() == 0  # looked ahead: the task is due as far as it can see
        assert poller._horizon is None
        await dying.rollback()

    await polled_again(tracking, poller, task_id)


async def test_a_shared_record_polled_with_a_new_one_is_polled_in_its_own_turn(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    """A claim polls the other clients' records of a relay task with the due one, due or not, and
    schedules them anew: the admin's old record, resting past the look-ahead, is due again soon after
    it was polled with a client's new one, and stays so once that one is cancelled."""
    tracking = await tracking_factory(SUNOTRACK_POLL_MAX_INTERVAL_S=LONG_S)
    task_id = steady(fake_relay)
    [client_id] = await clients(tracking, "shop")
    await tracking.register(task_id)
    await polled_again(tracking, tracking.poller, task_id)
    await rest(tracking, task_id)
    horizon = await looking_ahead(tracking)

    await tracking.register(task_id, client_id=client_id)
    await polled_again(tracking, tracking.poller, task_id, client_id=client_id)
    assert await polls(tracking, task_id) == 2  # the admin's, along with it
    async with transaction(tracking.sessions) as session:
        await cancel_task(session, task_id, client_id=client_id, settings=tracking.settings)

    await polled_again(tracking, tracking.poller, task_id)
    assert tracking.poller._horizon is horizon


async def test_a_look_ahead_ends_when_the_next_task_is_due(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    tracking = await tracking_factory(SUNOTRACK_POLL_MAX_INTERVAL_S=LONG_S)
    task_id = steady(fake_relay)
    await tracking.register(task_id)
    await rest(tracking, task_id, seconds=0.5)
    await looking_ahead(tracking)

    await polled_again(tracking, tracking.poller, task_id)


async def test_a_change_no_tick_can_see_waits_no_longer_than_the_longest_interval(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    """A write by hand (or by anything that is not a registration or a poller's page) is not seen:
    the look-ahead never reaches past SUNOTRACK_POLL_MAX_INTERVAL_S, so it waits no longer than an
    unchanging task does between polls."""
    tracking = await tracking_factory(SUNOTRACK_POLL_MAX_INTERVAL_S="1")
    task_id = steady(fake_relay)
    await tracking.register(task_id)
    await rest(tracking, task_id)
    await looking_ahead(tracking)
    async with transaction(tracking.sessions) as session:
        await session.execute(text("UPDATE tasks SET next_poll_at = now()"))

    await polled_again(tracking, tracking.poller, task_id)
