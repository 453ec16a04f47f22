"""A relay that fails, refuses, lies about tasks or never finishes them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from service.upstream.fake import FakeRelay, FaultKind, Lifecycle
from tests.conftest import wait_until
from tests.tracking.conftest import Tracking, assert_consistent_history
from tests.tracking.test_lifecycles import clip_steps, music_history


async def run_for(tracking: Tracking, seconds: float) -> None:
    """Keep the poller running for a fixed window (the faults are what is being timed)."""
    until = time.monotonic() + seconds

    async def elapsed() -> bool:
        return time.monotonic() >= until

    await wait_until(elapsed, timeout=seconds + 5, step=tracking.poller.drain)


async def test_an_unhealthy_relay_backs_off_and_everything_finishes_once_it_recovers(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    tracking = await tracking_factory(SUNOTRACK_POLL_MAX_INTERVAL_S="1", SUNOTRACK_UPSTREAM_TIMEOUT_S="0.3")
    task_ids = [fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS) for _ in range(20)]
    for task_id in task_ids:
        await tracking.register(task_id)

    outages = [
        (FaultKind.HTTP_ERROR, {}, "http_500"),
        (FaultKind.GARBAGE, {}, "bad_json"),
        (FaultKind.LATENCY, {"latency_s": 0.6}, "timeout"),
        (FaultKind.DROP, {}, "disconnected"),
    ]
    for kind, options, code in outages:
        fake_relay.inject(kind, **options)  # type: ignore[arg-type]
        fake_relay.reset_counters()
        await run_for(tracking, 1.2)
        # At the minimum interval each task would be asked ~24 times in 1.2 s; backing off, a handful.
        assert 1 <= max(fake_relay.task_requests[t] for t in task_ids) <= 7, (kind, fake_relay.task_requests)

        # Every task is asked during the outage and keeps what went wrong, though not necessarily
        # within the window: a task coming due (up to a max interval plus jitter after its last poll in
        # the previous outage) while a drain waits out a timed-out request is claimed by the next drain,
        # and on a loaded machine a request can outlive the 0.3 s timeout (`timeout` until asked again).
        async def all_failed_with(code: str = code) -> bool:
            rows = await tracking.fetch("SELECT last_error FROM tasks")
            return {str(row[0]).partition(":")[0] for row in rows} == {code}

        await wait_until(
            all_failed_with, timeout=10, what=f"every task failing with {code}", step=tracking.poller.drain
        )
        fake_relay.clear_faults()

    await tracking.poll_until_all_terminal(timeout=20)

    for task_id in task_ids:
        # Errors are not events. An answer served after the client gave up (the timeout phase) is a
        # stage nobody saw, so only consistency can be asserted, not the full history.
        assert_consistent_history(await tracking.events(task_id), "complete")
        task = await tracking.task(task_id)
        assert (task.status, task.last_error, task.consecutive_errors) == ("complete", None, 0)


async def test_retry_after_is_honoured(tracking: Tracking, fake_relay: FakeRelay) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    fake_relay.inject(FaultKind.RATE_LIMIT, task_id=task_id, times=1, retry_after="1")
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "complete")

    starts = sorted(start for start, _ in fake_relay.windows[task_id])
    assert len(starts) == 5
    assert starts[1] - starts[0] >= 0.95  # the minimum interval is 0.05 s
    assert await tracking.events(task_id) == music_history(fake_relay.clip_ids(task_id))


async def test_a_task_the_relay_never_heard_of_fails_once_the_grace_is_over(
    tracking: Tracking, fake_relay: FakeRelay
) -> None:
    await tracking.register("ghost-task")

    await tracking.poll_until("ghost-task", "failed")

    assert await tracking.events("ghost-task") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "failed", "poll", None),
    ]
    task = await tracking.task("ghost-task")
    assert task.fail_reason.startswith("the relay answered task_not_exist 3 times in a row")
    # Left out of the batch once, then asked for singly until the verdict.
    assert (fake_relay.requests["fetch_batch"], fake_relay.requests["fetch"]) == (1, 3)


async def test_task_not_exist_within_the_grace_only_sets_last_error(
    tracking_factory: Callable[..., Awaitable[Tracking]],
) -> None:
    tracking = await tracking_factory(SUNOTRACK_NOT_FOUND_GRACE_S="60")
    await tracking.register("late-task")

    async def asked_often() -> bool:
        return bool((await tracking.task("late-task")).consecutive_errors >= 5)

    await wait_until(asked_often, timeout=10, step=tracking.poller.drain)

    task = await tracking.task("late-task")
    assert task.status == "submitted"
    assert task.last_error.startswith("task_not_exist:")
    assert len(await tracking.events("late-task")) == 1


async def test_a_refusing_relay_fails_the_task_past_the_limit(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    tracking = await tracking_factory(SUNO_API_KEY="wrong-key")
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "failed")

    task = await tracking.task(task_id)
    assert task.fail_reason.startswith("the relay refused 5 times in a row: unauthorized:")
    assert "wrong-key" not in task.fail_reason
    assert fake_relay.requests["fetch_batch"] == 5


async def test_a_task_that_never_finishes_times_out(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    tracking = await tracking_factory(SUNOTRACK_TASK_DEADLINE_S="1.5")
    task_id = fake_relay.add_task(lifecycle=Lifecycle.NEVER_FINISHES)
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "timed_out")

    clips = fake_relay.clip_ids(task_id)
    assert await tracking.events(task_id) == [
        *music_history(clips)[:9],
        (10, "transition", "in_progress", "timed_out", "deadline", None),
    ]
    task = await tracking.task(task_id)
    assert task.fail_reason == "no terminal status within the deadline of 1.5 s since registration"
    assert task.next_poll_at is None
    # Backing off never sleeps past the deadline: the timeout lands on time.
    assert (task.finished_at - task.created_at).total_seconds() < 1.5 + 0.5


async def test_the_deadline_applies_while_the_relay_is_down(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    tracking = await tracking_factory(SUNOTRACK_TASK_DEADLINE_S="0.5")
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    fake_relay.inject(FaultKind.HTTP_ERROR, status=503)
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "timed_out")

    assert await tracking.events(task_id) == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "timed_out", "deadline", None),
    ]
    assert (await tracking.task(task_id)).last_error.startswith("http_503:")


async def test_unchanged_answers_back_off_to_the_maximum_and_a_change_resets(
    tracking_factory: Callable[..., Awaitable[Tracking]], fake_relay: FakeRelay
) -> None:
    # One request at a time: a drain then polls the task at most once (its sweep from the lowest id
    # comes back short, which ends the drain), so the interval read is the one just set.
    tracking = await tracking_factory(SUNOTRACK_UPSTREAM_CONCURRENCY="1")
    task_id = fake_relay.add_task(stages=["QUEUED", "IN_PROGRESS", "SUCCESS"], advance="manual")  # type: ignore[arg-type]
    await tracking.register(task_id)
    low, high = tracking.settings.poll_min_interval_s, tracking.settings.poll_max_interval_s

    async def at_max() -> bool:
        return bool((await tracking.task(task_id)).poll_interval_s == high)

    await wait_until(at_max, timeout=10, step=tracking.poller.drain)
    before = await tracking.task(task_id)
    await run_for(tracking, 0.5)

    after = await tracking.task(task_id)
    # Polled again, and nothing was written but the bookkeeping.
    assert after.poll_count > before.poll_count
    assert (after.last_seq, after.updated_at, after.last_answer) == (
        before.last_seq, before.updated_at, before.last_answer,
    )  # fmt: skip
    fake_relay.advance(task_id)
    await tracking.poll_until(task_id, "in_progress")
    assert (await tracking.task(task_id)).poll_interval_s == low
    clips = fake_relay.clip_ids(task_id)
    assert await tracking.events(task_id) == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "queued", "poll", None),
        *clip_steps(3, clips, None, "queued"),
        (5, "transition", "queued", "in_progress", "poll", None),
        *clip_steps(6, clips, "queued", "in_progress"),
    ]
