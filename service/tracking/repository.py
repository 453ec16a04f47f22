"""Queries over tasks, clips and events. Functions take the session first and never commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import Clip, Task, TaskEvent


async def get_task(session: AsyncSession, task_id: str, *, for_update: bool = False) -> Task | None:
    query = select(Task).where(Task.task_id == task_id)
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def clips_by_task(session: AsyncSession, task_pks: Sequence[int]) -> dict[int, list[Clip]]:
    """Clips of several tasks in one query, each task's in first-seen order."""
    grouped: dict[int, list[Clip]] = {pk: [] for pk in task_pks}
    if not task_pks:
        return grouped
    rows = await session.execute(
        select(Clip).where(Clip.task_pk.in_(task_pks)).order_by(Clip.task_pk, Clip.position)
    )
    for clip in rows.scalars():
        grouped[clip.task_pk].append(clip)
    return grouped


async def list_tasks(
    session: AsyncSession,
    *,
    status: str | None,
    kind: str | None,
    limit: int,
    before_pk: int | None,
) -> list[Task]:
    """Newest first by the identity key: a cursor of the last pk seen is stable while rows are added."""
    query = select(Task).order_by(Task.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Task.status == status)
    if kind is not None:
        query = query.where(Task.kind == kind)
    if before_pk is not None:
        query = query.where(Task.id < before_pk)
    return list((await session.execute(query)).scalars())


async def list_events(session: AsyncSession, task_pk: int, *, after_seq: int = 0) -> list[TaskEvent]:
    query = (
        select(TaskEvent)
        .where(TaskEvent.task_pk == task_pk, TaskEvent.seq > after_seq)
        .order_by(TaskEvent.seq)
    )
    return list((await session.execute(query)).scalars())


# --- the poller's and the recorder's statements --------------------------------------------------------
# Hot paths use array parameters and unnest(): one statement per chunk whatever its size (per-row ORM
# round trips cost 5-10x the driver's limit, NOTES.md).

TASK_STATE_COLUMNS = (
    "id, task_id, kind, status, upstream_status, progress, fail_reason, last_seq, created_at, "
    "updated_at, finished_at, next_poll_at, poll_interval_s, last_polled_at, poll_count, "
    "consecutive_errors, missing_count, last_error, notify_hook, notify_format, metadata"
)


@dataclass(slots=True)
class ClipState:
    clip_id: str
    position: int
    status: str | None
    upstream_status: str | None
    title: str | None
    audio_url: str | None
    image_url: str | None
    video_url: str | None
    duration: float | None
    error: str | None
    updated_at: datetime | None = None
    # Set by the recorder when the row must be written back.
    dirty: bool = False


@dataclass(slots=True)
class TaskState:
    """A task row as the recorder sees it while holding its row lock; mutated in place, then written."""

    pk: int
    task_id: str
    kind: str
    status: str
    upstream_status: str | None
    progress: int | None
    fail_reason: str | None
    last_seq: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    next_poll_at: datetime | None
    poll_interval_s: float | None
    last_polled_at: datetime | None
    poll_count: int
    consecutive_errors: int
    missing_count: int
    last_error: str | None
    notify_hook: str | None
    notify_format: str
    metadata: dict[str, Any] | None
    clips: list[ClipState] = field(default_factory=list)
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    pk: int
    task_id: str
    kind: str
    last_error: str | None
    # The exact next_poll_at this claim wrote: holding the lease means the row still carries it.
    lease_until: datetime
    lag_s: float


@dataclass(frozen=True, slots=True)
class EventRow:
    task_pk: int
    seq: int
    type: str
    from_status: str | None
    to_status: str
    clip_id: str | None
    detail: dict[str, Any] | None
    source: str


_CLAIM = text(
    """
    WITH due AS (
        SELECT id, next_poll_at FROM tasks
        WHERE next_poll_at <= now()
        ORDER BY next_poll_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks AS t
    SET next_poll_at = now() + make_interval(secs => :lease_s)
    FROM due
    WHERE t.id = due.id
    RETURNING t.id, t.task_id, t.kind, t.last_error, t.next_poll_at,
              extract(epoch FROM now() - due.next_poll_at)::float8 AS lag_s
    """
)


async def claim_due(session: AsyncSession, *, limit: int, lease_s: float) -> list[ClaimedTask]:
    """Lease up to `limit` due tasks to the caller; rows leased by others are skipped, never waited on."""
    rows = await session.execute(_CLAIM, {"limit": limit, "lease_s": lease_s})
    return [ClaimedTask(row[0], row[1], row[2], row[3], row[4], row[5]) for row in rows]


_RELEASE = text(
    """
    UPDATE tasks AS t SET next_poll_at = now()
    FROM unnest(CAST(:ids AS bigint[]), CAST(:leases AS timestamptz[])) AS v(id, lease_until)
    WHERE t.id = v.id AND t.next_poll_at = v.lease_until
    """
)


async def release_leases(session: AsyncSession, leases: Sequence[tuple[int, datetime]]) -> int:
    """Make still-held tasks due at once, so another process (or the next start) polls them."""
    if not leases:
        return 0
    result = await session.execute(
        _RELEASE, {"ids": [pk for pk, _ in leases], "leases": [lease for _, lease in leases]}
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


_NOW = text("SELECT now()")


async def lock_task_states(
    session: AsyncSession, *, pks: Sequence[int] = (), task_ids: Sequence[str] = ()
) -> tuple[datetime, list[TaskState]]:
    """Lock the given tasks (in id order, so concurrent lockers cannot deadlock) and read them with
    their clips. Returns the transaction's now() too: every time written in this unit of work uses it."""
    where = "id = ANY(CAST(:pks AS bigint[]))" if pks else "task_id = ANY(CAST(:task_ids AS text[]))"
    rows = (
        await session.execute(
            text(f"SELECT now(), {TASK_STATE_COLUMNS} FROM tasks WHERE {where} ORDER BY id FOR UPDATE"),  # noqa: S608  (fixed fragments)
            {"pks": list(pks), "task_ids": list(task_ids)},
        )
    ).all()
    if not rows:
        return (await session.execute(_NOW)).scalar_one(), []
    now: datetime = rows[0][0]
    states = {row[1]: TaskState(*row[1:]) for row in rows}
    clip_rows = await session.execute(
        text(
            "SELECT task_pk, clip_id, position, status, upstream_status, title, audio_url, image_url, "
            "video_url, duration, error FROM clips WHERE task_pk = ANY(CAST(:pks AS bigint[])) "
            "ORDER BY task_pk, position"
        ),
        {"pks": list(states)},
    )
    for row in clip_rows:
        states[row[0]].clips.append(ClipState(*row[1:]))
    return now, list(states.values())


_UPDATE_TASKS = text(
    """
    UPDATE tasks AS t SET
        status = v.status, upstream_status = v.upstream_status, progress = v.progress,
        fail_reason = v.fail_reason, last_payload = COALESCE(v.payload::jsonb, t.last_payload),
        last_seq = v.last_seq, updated_at = v.updated_at, finished_at = v.finished_at,
        next_poll_at = v.next_poll_at, poll_interval_s = v.poll_interval_s,
        last_polled_at = v.last_polled_at, poll_count = v.poll_count,
        consecutive_errors = v.consecutive_errors, missing_count = v.missing_count,
        last_error = v.last_error
    FROM unnest(
        CAST(:id AS bigint[]), CAST(:status AS text[]), CAST(:upstream_status AS text[]),
        CAST(:progress AS smallint[]), CAST(:fail_reason AS text[]), CAST(:payload AS text[]),
        CAST(:last_seq AS integer[]), CAST(:updated_at AS timestamptz[]),
        CAST(:finished_at AS timestamptz[]), CAST(:next_poll_at AS timestamptz[]),
        CAST(:poll_interval_s AS float8[]), CAST(:last_polled_at AS timestamptz[]),
        CAST(:poll_count AS integer[]), CAST(:consecutive_errors AS integer[]),
        CAST(:missing_count AS integer[]), CAST(:last_error AS text[])
    ) AS v(id, status, upstream_status, progress, fail_reason, payload, last_seq, updated_at,
           finished_at, next_poll_at, poll_interval_s, last_polled_at, poll_count,
           consecutive_errors, missing_count, last_error)
    WHERE t.id = v.id
    """
)


def _json_text(raw: bytes) -> str:
    # jsonb refuses the NUL escape that plain JSON allows; one such string must not block a whole chunk.
    text_ = raw.decode()
    return text_.replace("\\u0000", "\\ufffd") if "\\u0000" in text_ else text_


async def write_task_states(session: AsyncSession, states: Sequence[TaskState]) -> None:
    if not states:
        return
    await session.execute(
        _UPDATE_TASKS,
        {
            "id": [s.pk for s in states],
            "status": [s.status for s in states],
            "upstream_status": [s.upstream_status for s in states],
            "progress": [s.progress for s in states],
            "fail_reason": [s.fail_reason for s in states],
            "payload": [None if s.payload is None else _json_text(s.payload) for s in states],
            "last_seq": [s.last_seq for s in states],
            "updated_at": [s.updated_at for s in states],
            "finished_at": [s.finished_at for s in states],
            "next_poll_at": [s.next_poll_at for s in states],
            "poll_interval_s": [s.poll_interval_s for s in states],
            "last_polled_at": [s.last_polled_at for s in states],
            "poll_count": [s.poll_count for s in states],
            "consecutive_errors": [s.consecutive_errors for s in states],
            "missing_count": [s.missing_count for s in states],
            "last_error": [s.last_error for s in states],
        },
    )


_UPSERT_CLIPS = text(
    """
    INSERT INTO clips (task_pk, clip_id, position, status, upstream_status, title, audio_url,
                       image_url, video_url, duration, error, created_at, updated_at)
    SELECT v.*, v.updated_at FROM unnest(
        CAST(:task_pk AS bigint[]), CAST(:clip_id AS text[]), CAST(:position AS smallint[]),
        CAST(:status AS text[]), CAST(:upstream_status AS text[]), CAST(:title AS text[]),
        CAST(:audio_url AS text[]), CAST(:image_url AS text[]), CAST(:video_url AS text[]),
        CAST(:duration AS float8[]), CAST(:error AS text[]), CAST(:updated_at AS timestamptz[])
    ) AS v(task_pk, clip_id, position, status, upstream_status, title, audio_url, image_url, video_url,
           duration, error, updated_at)
    ON CONFLICT (task_pk, clip_id) DO UPDATE SET
        status = excluded.status, upstream_status = excluded.upstream_status, title = excluded.title,
        audio_url = excluded.audio_url, image_url = excluded.image_url,
        video_url = excluded.video_url, duration = excluded.duration, error = excluded.error,
        updated_at = excluded.updated_at
    """
)


async def upsert_clips(session: AsyncSession, clips: Sequence[tuple[int, ClipState]]) -> None:
    if not clips:
        return
    await session.execute(
        _UPSERT_CLIPS,
        {
            "task_pk": [pk for pk, _ in clips],
            "clip_id": [c.clip_id for _, c in clips],
            "position": [c.position for _, c in clips],
            "status": [c.status for _, c in clips],
            "upstream_status": [c.upstream_status for _, c in clips],
            "title": [c.title for _, c in clips],
            "audio_url": [c.audio_url for _, c in clips],
            "image_url": [c.image_url for _, c in clips],
            "video_url": [c.video_url for _, c in clips],
            "duration": [c.duration for _, c in clips],
            "error": [c.error for _, c in clips],
            "updated_at": [c.updated_at for _, c in clips],
        },
    )


_INSERT_EVENTS = text(
    """
    INSERT INTO task_events (task_pk, seq, at, type, from_status, to_status, source, clip_id, detail)
    SELECT v.task_pk, v.seq, :at, v.type, v.from_status, v.to_status, v.source, v.clip_id, v.detail::jsonb
    FROM unnest(
        CAST(:task_pk AS bigint[]), CAST(:seq AS integer[]), CAST(:type AS text[]),
        CAST(:from_status AS text[]), CAST(:to_status AS text[]), CAST(:source AS text[]),
        CAST(:clip_id AS text[]), CAST(:detail AS text[])
    ) AS v(task_pk, seq, type, from_status, to_status, source, clip_id, detail)
    """
)


async def insert_events(session: AsyncSession, events: Sequence[EventRow], *, at: datetime) -> None:
    if not events:
        return
    encode = msgspec.json.encode
    await session.execute(
        _INSERT_EVENTS,
        {
            "at": at,
            "source": [e.source for e in events],
            "task_pk": [e.task_pk for e in events],
            "seq": [e.seq for e in events],
            "type": [e.type for e in events],
            "from_status": [e.from_status for e in events],
            "to_status": [e.to_status for e in events],
            "clip_id": [e.clip_id for e in events],
            "detail": [None if e.detail is None else encode(e.detail).decode() for e in events],
        },
    )
