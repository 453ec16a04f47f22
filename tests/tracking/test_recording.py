"""The recorder on its own: callbacks, races, stems, cancellation, and the outbox rows it writes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

import msgspec
import pytest
from sqlalchemy import text

from service.db import transaction
from service.errors import Conflict
from service.tracking.jobs import DURABLE
from service.tracking.service import (
    BACKOFF_FACTOR,
    PollResult,
    cancel_task,
    claim_polls,
    record_polls,
    record_snapshot,
)
from service.upstream.dialects import parse_callback
from service.upstream.fake import Advance, Lifecycle
from service.upstream.schemas import ClipSnapshot, TaskSnapshot
from service.vocabulary import TaskStatus
from tests.conftest import wait_until
from tests.tracking.conftest import Tracking, assert_consistent_history
from tests.tracking.test_lifecycles import clip_steps


def callback_body(task_id: str, status: str, clip_status: str | None = None, **extra: object) -> bytes:
    """A relay notify_hook call in camelCase, without the envelope."""
    clips = (
        [] if clip_status is None else [{"id": f"{task_id}-c{n}", "status": clip_status} for n in range(2)]
    )
    return msgspec.json.encode({"taskId": task_id, "status": status, "data": clips, **extra})


def snapshot(
    task_id: str, status: TaskStatus | None, clips: dict[str, TaskStatus] | None = None
) -> TaskSnapshot:
    return TaskSnapshot(
        task_id=task_id,
        status=status,
        raw_status=None,
        progress=None,
        fail_reason=None,
        submitted_at=None,
        started_at=None,
        finished_at=None,
        clips=tuple(
            ClipSnapshot(
                id=clip_id,
                status=clip_status,
                raw_status=str(clip_status),
                title=None,
                audio_url=None,
                image_url=None,
                video_url=None,
                duration=None,
                error=None,
            )
            for clip_id, clip_status in (clips or {}).items()
        ),
        lyrics=None,
        raw=b'{"task_id": "%s"}' % task_id.encode(),
    )


async def record(tracking: Tracking, body: bytes, source: str = "callback") -> bool:
    async with transaction(tracking.sessions) as session:
        return await record_snapshot(session, parse_callback(body), source=source, settings=tracking.settings)  # type: ignore[arg-type]


async def test_a_callback_records_once_and_a_repeat_writes_nothing(tracking: Tracking) -> None:
    await tracking.register("cb-1")
    body = callback_body("cb-1", "IN_PROGRESS", "streaming", progress="40%")

    assert await record(tracking, body)
    first = await tracking.task("cb-1")
    assert await record(tracking, body)

    assert await tracking.events("cb-1") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "in_progress", "callback", None),
        *clip_steps(3, ("cb-1-c0", "cb-1-c1"), None, "in_progress", source="callback"),
    ]
    again = await tracking.task("cb-1")
    assert (again.updated_at, again.last_seq, again.progress) == (first.updated_at, 4, 40)
    # A callback leaves the schedule of a live task to the poller.
    assert again.next_poll_at == first.next_poll_at is not None


async def test_a_callback_for_an_unknown_task_writes_nothing(tracking: Tracking) -> None:
    assert not await record(tracking, callback_body("nobody", "SUCCESS"))
    assert await tracking.fetch("SELECT count(*) FROM task_events") == [(0,)]


async def test_a_late_answer_after_the_end_is_an_anomaly_once(tracking: Tracking) -> None:
    await tracking.register("late-1")
    await record(tracking, callback_body("late-1", "SUCCESS"))

    await record(tracking, callback_body("late-1", "QUEUED"))
    await record(tracking, callback_body("late-1", "QUEUED"))

    assert await tracking.events("late-1") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "complete", "callback", None),
        (3, "anomaly", "complete", "complete", "callback", None),
    ]
    assert (await tracking.details("late-1"))[2] == {
        "anomaly": "regression", "upstream_status": "QUEUED", "reported": "queued",
    }  # fmt: skip
    assert (await tracking.task("late-1")).next_poll_at is None


async def make_due(tracking: Tracking) -> None:
    async with transaction(tracking.sessions) as session:
        await session.execute(text("UPDATE tasks SET next_poll_at = now() WHERE next_poll_at IS NOT NULL"))


async def poll_once(tracking: Tracking, answers: dict[str, TaskSnapshot]) -> bool:
    """As the poller does: claim what is due, and record the answers in the claim's transaction;
    returns whether the recorder wrote anything."""
    async with transaction(tracking.sessions) as session:
        claim = await claim_polls(session, limit=100, settings=tracking.settings)
        results = [PollResult(task.id, True, answers[task.task_id]) for task in claim.tasks]
        return await record_polls(session, claim, results, settings=tracking.settings, now=claim.now)


async def waiting_on_locks(tracking: Tracking) -> int:
    rows = await tracking.fetch(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return int(rows[0][0])


async def test_a_callback_waits_for_the_poll_holding_its_task_and_nothing_is_recorded_twice(
    tracking: Tracking,
) -> None:
    task_ids = [f"race-{n}" for n in range(4)]
    for task_id in task_ids:
        await tracking.register(task_id)
    await make_due(tracking)

    async with transaction(tracking.sessions) as session:
        claim = await claim_polls(session, limit=100, settings=tracking.settings)
        assert len(claim.tasks) == 4
        callbacks = [
            asyncio.create_task(record(tracking, callback_body(task_id, "QUEUED"))) for task_id in task_ids
        ]
        await wait_until(lambda: _equals(waiting_on_locks(tracking), 4), timeout=10, what="callbacks blocked")
        results = [PollResult(t.id, True, snapshot(t.task_id, TaskStatus.QUEUED)) for t in claim.tasks]
        await record_polls(session, claim, results, settings=tracking.settings, now=claim.now)
    assert await asyncio.gather(*callbacks) == [True] * 4

    for task_id in task_ids:
        assert await tracking.events(task_id) == [
            (1, "transition", None, "submitted", "register", None),
            (2, "transition", "submitted", "queued", "poll", None),
        ]


async def test_a_cancel_waits_for_the_poll_holding_the_task(tracking: Tracking) -> None:
    await tracking.register("cancel-race")
    await make_due(tracking)

    async def cancel() -> None:
        async with transaction(tracking.sessions) as session:
            await cancel_task(session, "cancel-race", settings=tracking.settings)

    async with transaction(tracking.sessions) as session:
        claim = await claim_polls(session, limit=10, settings=tracking.settings)
        cancelling = asyncio.create_task(cancel())
        await wait_until(lambda: _equals(waiting_on_locks(tracking), 1), timeout=10, what="cancel blocked")
        [task] = claim.tasks
        results = [PollResult(task.id, True, snapshot("cancel-race", TaskStatus.IN_PROGRESS))]
        await record_polls(session, claim, results, settings=tracking.settings, now=claim.now)
    await cancelling

    assert await tracking.events("cancel-race") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "in_progress", "poll", None),
        (3, "transition", "in_progress", "cancelled", "api", None),
    ]
    row = await tracking.task("cancel-race")
    assert (row.status, row.next_poll_at) == ("cancelled", None)


async def test_an_answer_like_the_last_is_recorded_by_the_claim_alone(tracking: Tracking) -> None:
    await tracking.register("steady")
    answer = snapshot("steady", TaskStatus.IN_PROGRESS, {"steady-c0": TaskStatus.IN_PROGRESS})
    await make_due(tracking)
    assert await poll_once(tracking, {"steady": answer})
    first = await tracking.task("steady")

    await make_due(tracking)
    # Nothing written but the claim's bookkeeping: the poller commits such a page without waiting
    # for the WAL flush.
    assert not await poll_once(tracking, {"steady": answer})

    assert await tracking.events("steady") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "in_progress", "poll", None),
        (3, "transition", None, "in_progress", "poll", "steady-c0"),
    ]
    second = await tracking.task("steady")
    assert (second.poll_count, second.last_seq, second.updated_at) == (2, 3, first.updated_at)
    settings = tracking.settings
    # A change resets the interval to the minimum; an answer like the last stretches it.
    assert first.poll_interval_s == settings.poll_min_interval_s
    assert second.poll_interval_s == pytest.approx(
        min(settings.poll_max_interval_s, settings.poll_min_interval_s * BACKOFF_FACTOR)
    )
    assert second.last_polled_at > first.last_polled_at
    assert second.snapshot_digest == first.snapshot_digest is not None


async def test_a_callback_in_between_makes_the_next_poll_compare_again(tracking: Tracking) -> None:
    """The digest of the last answer merged moves with every writer, not only with the poller."""
    await tracking.register("lagging")
    clips = ("lagging-c0", "lagging-c1")
    queued = snapshot("lagging", TaskStatus.QUEUED, dict.fromkeys(clips, TaskStatus.QUEUED))
    await make_due(tracking)
    await poll_once(tracking, {"lagging": queued})
    await record(tracking, callback_body("lagging", "IN_PROGRESS", "streaming"))

    # A lagging replica answers the poll with what the poll saw before.
    await make_due(tracking)
    assert await poll_once(tracking, {"lagging": queued})

    assert await tracking.events("lagging") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "queued", "poll", None),
        *clip_steps(3, clips, None, "queued"),
        (5, "transition", "queued", "in_progress", "callback", None),
        *clip_steps(6, clips, "queued", "in_progress", source="callback"),
        (8, "anomaly", "in_progress", "in_progress", "poll", None),
    ]
    assert (await tracking.details("lagging"))[7]["anomaly"] == "regression"


async def _equals(count: Awaitable[int], expected: int) -> bool:
    return await count == expected


async def test_cancel_is_idempotent_and_refuses_a_finished_task(tracking: Tracking) -> None:
    await tracking.register("c-1")
    await tracking.register("c-2")
    await record(tracking, callback_body("c-2", "FAILURE", failReason="boom"))

    for _ in range(2):
        async with transaction(tracking.sessions) as session:
            await cancel_task(session, "c-1", settings=tracking.settings)
    with pytest.raises(Conflict, match="already finished with status 'failed'"):
        async with transaction(tracking.sessions) as session:
            await cancel_task(session, "c-2", settings=tracking.settings)

    assert await tracking.events("c-1") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "cancelled", "api", None),
    ]
    assert (await tracking.task("c-2")).fail_reason == "boom"


async def test_stem_clip_ids_never_seen_before_are_recorded_and_noted(tracking: Tracking) -> None:
    await tracking.register("source-clip", kind="stems")
    first = snapshot(
        "source-clip", TaskStatus.QUEUED, {"vocals-1": TaskStatus.QUEUED, "inst-1": TaskStatus.QUEUED}
    )
    later = snapshot(
        "source-clip",
        TaskStatus.QUEUED,
        {
            "vocals-1": TaskStatus.IN_PROGRESS,
            "inst-1": TaskStatus.IN_PROGRESS,
            "vocals-2": TaskStatus.QUEUED,
            "inst-2": TaskStatus.QUEUED,
        },
    )

    for answer in (first, later):
        async with transaction(tracking.sessions) as session:
            await record_snapshot(session, answer, source="api", settings=tracking.settings)

    assert await tracking.events("source-clip") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "queued", "api", None),
        *clip_steps(3, ("vocals-1", "inst-1"), None, "queued", source="api"),
        *clip_steps(5, ("vocals-1", "inst-1"), "queued", "in_progress", source="api"),
        *clip_steps(7, ("vocals-2", "inst-2"), None, "queued", source="api"),
        (9, "anomaly", "queued", "queued", "api", None),
    ]
    assert (await tracking.details("source-clip"))[8] == {
        "anomaly": "new_stem_clips", "clip_ids": ["vocals-2", "inst-2"],
    }  # fmt: skip
    assert [c.clip_id for c in await tracking.clips("source-clip")] == [
        "vocals-1",
        "inst-1",
        "vocals-2",
        "inst-2",
    ]


async def test_only_task_level_transitions_of_hooked_tasks_reach_the_outbox(tracking: Tracking) -> None:
    await tracking.register("hooked", notify_hook="http://127.0.0.1:9/hook")
    await tracking.register("unhooked")
    for task_id in ("hooked", "unhooked"):
        await record(tracking, callback_body(task_id, "QUEUED", "queued"))
        await record(tracking, callback_body(task_id, "UNKNOWN"))
        await record(tracking, callback_body(task_id, "SUCCESS", "complete"))

    rows = await tracking.fetch(
        "SELECT t.task_id, d.event_seq, d.url FROM deliveries d "
        "JOIN tasks t ON t.id = d.task_pk ORDER BY d.id"
    )
    # seq 1 registration, 2 queued, 3-4 clips, 5 anomaly, 6 complete, 7-8 clips.
    assert [tuple(row) for row in rows] == [
        ("hooked", 2, "http://127.0.0.1:9/hook"),
        ("hooked", 6, "http://127.0.0.1:9/hook"),
    ]
    body = msgspec.json.decode(
        (await tracking.fetch("SELECT body FROM deliveries WHERE event_seq = 6"))[0][0]
    )
    assert body["data"]["status"] == "complete"
    assert body["data"]["previous_status"] == "queued"
    assert [clip["status"] for clip in body["data"]["clips"]] == ["complete", "complete"]


async def test_poller_sessions_commit_without_waiting_for_the_flush_until_stopped(tracking: Tracking) -> None:
    """Pages that recorded something ask for a durable commit (jobs.DURABLE); the others need not."""
    setting = text("SHOW synchronous_commit")
    async with tracking.poller._connections.transaction() as session:
        assert (await session.execute(setting)).scalar_one() == "off"
        await session.execute(DURABLE)
        assert (await session.execute(setting)).scalar_one() == "on"
    async with tracking.poller._connections.transaction() as session:
        assert (await session.execute(setting)).scalar_one() == "off"

    await tracking.poller.stop()

    # The pool's other users get their connections back as they were: every idle one is checked.
    idle = tracking.engine.pool.checkedin()  # type: ignore[attr-defined]
    assert idle >= 1
    async with contextlib.AsyncExitStack() as stack:
        connections = [await stack.enter_async_context(tracking.engine.connect()) for _ in range(idle)]
        assert [(await c.execute(setting)).scalar_one() for c in connections] == ["on"] * idle


async def test_an_answer_holding_nul_is_recorded(tracking: Tracking) -> None:
    """Postgres's text and jsonb refuse NUL: the page records U+FFFD instead (a backslash and `u0000`
    written as text stay as they are)."""
    title = "Neon\x00Harbor \\u0000"
    task_id = tracking.fake.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, advance=Advance.PER_POLL, title=title)
    await tracking.register(task_id)

    await tracking.poll_until(task_id, "complete")

    assert {clip.title for clip in await tracking.clips(task_id)} == {"Neon\ufffdHarbor \\u0000"}
    assert_consistent_history(await tracking.events(task_id), "complete")
