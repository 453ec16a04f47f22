"""The recorder on its own: callbacks, races, stems, cancellation, and the outbox rows it writes."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from sqlalchemy import text

from service.db import transaction
from service.errors import Conflict
from service.tracking import repository
from service.tracking.service import (
    PollResult,
    cancel_task,
    plan_polls,
    record_polls,
    record_snapshot,
    redo_polls,
)
from service.upstream.dialects import parse_callback
from service.upstream.schemas import ClipSnapshot, TaskSnapshot, TaskStatus
from tests.tracking.conftest import Tracking
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


async def record_poll(tracking: Tracking, claim: repository.Claim, result: PollResult) -> None:
    """As the poller does: optimistically against the claim's read, then redo a lost race under lock."""
    plan = plan_polls(claim.tasks, [result], settings=tracking.settings, now=claim.now)
    async with transaction(tracking.sessions) as session:
        _, lost = await record_polls(session, plan)
        if lost:
            await redo_polls(session, lost, settings=tracking.settings)


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
    # A callback never moves the schedule of a live task: that row may be a poller's lease.
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


async def test_a_poll_and_a_callback_racing_never_record_a_change_twice(tracking: Tracking) -> None:
    task_ids = [f"race-{n}" for n in range(20)]
    for task_id in task_ids:
        await tracking.register(task_id)
    async with transaction(tracking.sessions) as session:
        await session.execute(text("UPDATE tasks SET next_poll_at = now()"))
    async with transaction(tracking.sessions) as session:
        claim = await repository.claim_due(session, limit=100, lease_s=30)
    assert len(claim.tasks) == 20

    async def poll(task: repository.TaskState) -> None:
        result = PollResult(task.pk, task.next_poll_at, "batch", snapshot(task.task_id, TaskStatus.QUEUED))
        await record_poll(tracking, claim, result)

    await asyncio.gather(
        *(poll(task) for task in claim.tasks),
        *(record(tracking, callback_body(task_id, "QUEUED")) for task_id in task_ids),
    )

    for task_id in task_ids:
        events = await tracking.events(task_id)
        assert [event[:4] for event in events] == [
            (1, "transition", None, "submitted"),
            (2, "transition", "submitted", "queued"),
        ]
        assert events[1][4] in {"poll", "callback"}


async def test_a_poll_answer_for_a_task_cancelled_meanwhile_changes_nothing(tracking: Tracking) -> None:
    await tracking.register("cancel-race")
    async with transaction(tracking.sessions) as session:
        await session.execute(text("UPDATE tasks SET next_poll_at = now()"))
    async with transaction(tracking.sessions) as session:
        claim = await repository.claim_due(session, limit=10, lease_s=30)
    async with transaction(tracking.sessions) as session:
        await cancel_task(session, "cancel-race", settings=tracking.settings)

    [task] = claim.tasks
    result = PollResult(task.pk, task.next_poll_at, "batch", snapshot("cancel-race", TaskStatus.IN_PROGRESS))
    await record_poll(tracking, claim, result)

    assert await tracking.events("cancel-race") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "cancelled", "api", None),
    ]
    task = await tracking.task("cancel-race")
    assert (task.status, task.next_poll_at) == ("cancelled", None)


async def test_a_poll_answer_compared_with_a_stale_read_is_redone_under_lock(tracking: Tracking) -> None:
    """The poller compares with what its claim read; a callback that lands in between is not lost."""
    await tracking.register("stale")
    async with transaction(tracking.sessions) as session:
        await session.execute(text("UPDATE tasks SET next_poll_at = now()"))
    async with transaction(tracking.sessions) as session:
        claim = await repository.claim_due(session, limit=10, lease_s=30)
    await record(tracking, callback_body("stale", "QUEUED", "queued"))

    [task] = claim.tasks
    lease = task.next_poll_at
    assert lease is not None
    answer = snapshot("stale", TaskStatus.IN_PROGRESS, {"stale-c0": TaskStatus.IN_PROGRESS})
    await record_poll(tracking, claim, PollResult(task.pk, lease, "batch", answer))

    assert await tracking.events("stale") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "queued", "callback", None),
        *clip_steps(3, ("stale-c0", "stale-c1"), None, "queued", source="callback"),
        (5, "transition", "queued", "in_progress", "poll", None),
        (6, "transition", "queued", "in_progress", "poll", "stale-c0"),
    ]
    row = await tracking.task("stale")
    # Still this poller's to schedule: its lease was intact, only the status had moved.
    assert (row.poll_count, row.next_poll_at < lease) == (1, True)


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
