"""Queries over tasks, clips and events. Functions take the session first and never commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.models import LIVE, Clip, Task, TaskEvent


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
    if before_pk is not None:
        query = query.where(Task.id < before_pk)
    if kind is not None:
        query = query.where(Task.kind == kind)
    if status is not None:
        query = query.where(Task.status == status)
    return list((await session.execute(query)).scalars())


async def list_events(session: AsyncSession, task_pk: int, *, after_seq: int = 0) -> list[TaskEvent]:
    query = (
        select(TaskEvent)
        .where(TaskEvent.task_pk == task_pk, TaskEvent.seq > after_seq)
        .order_by(TaskEvent.seq)
    )
    return list((await session.execute(query)).scalars())


# --- the poller's and the recorder's statements --------------------------------------------------------
# Core statements over whole pages, never per-row ORM round trips (5-10x slower, NOTES.md).

TASK_STATE_COLUMNS = (
    "id, task_id, kind, status, upstream_status, progress, fail_reason, last_seq, created_at, "
    "updated_at, finished_at, next_poll_at, poll_interval_s, last_polled_at, poll_count, "
    "consecutive_errors, missing_count, last_error, notify_hook, notify_format, metadata, snapshot_digest, "
    "notify_hook_source, relay_notify_hook"
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
    """A task row as the recorder sees it; mutated in place, then written back. Always read under the
    row's lock (lock_task_states), held until the write-back: nobody can change it in between."""

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
    notify_format: str | None
    metadata: dict[str, Any] | None
    snapshot_digest: bytes | None
    notify_hook_source: str | None
    relay_notify_hook: str | None
    clips: list[ClipState] = field(default_factory=list)
    payload: bytes | None = None


class ClaimedTask(NamedTuple):
    """What the poller needs of a claimed task to poll it and to tell whether its answer is news;
    the rest is read (lock_task_states) only for the tasks whose answers are. A tuple, as the driver
    returns it: a page holds hundreds."""

    pk: int
    task_id: str
    kind: str
    last_error: str | None
    snapshot_digest: bytes | None
    # Nothing pending but the next answer: no error, no batch miss, deadline not reached.
    quiet: bool
    # Before the claim stretched it (the claim's own values are for an answer that changes nothing).
    poll_interval_s: float | None


@dataclass(frozen=True, slots=True)
class Claim:
    """Due tasks locked by the caller's transaction, which must stay open until they are recorded."""

    now: datetime
    tasks: list[ClaimedTask]
    lags_s: list[float]


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


_CLIP_COLUMNS = (
    "clip_id", "position", "status", "upstream_status", "title", "audio_url", "image_url", "video_url",
    "duration", "error",
)  # fmt: skip


def _with_clips(alias: str) -> str:
    """The task's clips as one JSON array column. Riding along saves a statement per page, and avoids
    a `task_pk = ANY(array)` lookup, whose cached generic plan was seen to stay a sequential scan
    (planned while the table was empty) long after the table had grown."""
    fields = ", ".join(f"c.{column}" for column in _CLIP_COLUMNS)
    return (
        f"(SELECT coalesce(json_agg(json_build_array({fields}) ORDER BY c.position), '[]')::text "  # noqa: S608
        f"FROM clips AS c WHERE c.task_pk = {alias}.id)"
    )


_ClipRow = tuple[
    str, int, str | None, str | None, str | None, str | None, str | None, str | None, float | None, str | None
]
_clip_rows = msgspec.json.Decoder(list[_ClipRow])


def _task_state(row: Sequence[Any]) -> TaskState:
    """A row of TASK_STATE_COLUMNS followed by _with_clips()."""
    state = TaskState(*row[:-1])
    state.clips = [ClipState(*clip) for clip in _clip_rows.decode(row[-1])]
    return state


_NOW = text("SELECT now()")


_LOCK = (
    f"SELECT now(), {TASK_STATE_COLUMNS}, {_with_clips('tasks')} FROM tasks WHERE %s ORDER BY id FOR UPDATE"  # noqa: S608
)
_LOCK_BY_PK = text(_LOCK % "id = ANY(CAST(:pks AS bigint[]))")
_LOCK_BY_TASK_ID = text(_LOCK % "task_id = ANY(CAST(:task_ids AS text[]))")


async def lock_task_states(
    session: AsyncSession, *, pks: Sequence[int] = (), task_ids: Sequence[str] = ()
) -> tuple[datetime, list[TaskState]]:
    """Lock the given tasks (in id order, so concurrent lockers cannot deadlock) and read them with
    their clips. Returns the transaction's now() too: every time written in this unit of work uses it."""
    query = _LOCK_BY_PK if pks else _LOCK_BY_TASK_ID
    rows = (await session.execute(query, {"pks": list(pks), "task_ids": list(task_ids)})).all()
    if not rows:
        return (await session.execute(_NOW)).scalar_one(), []
    return rows[0][0], [_task_state(row[1:]) for row in rows]


# The claim. Every claimed row is written once, here, already scheduled as if the relay's answer will
# change nothing (the common case): then recording that answer writes nothing at all. The row locks
# taken by `due` are the lease, held until the caller's transaction ends; a crashed process's locks go
# with its connection.
#
# It sweeps the live tasks in id order from a cursor (the last id the previous page claimed), taking
# the due ones: every due task is reached within one sweep however large the backlog, and, with no
# index on what the UPDATE writes, the update is HOT (models.Task). The due index this replaces cost
# a new entry in every index of the table for every poll.
_CLAIM = text(
    f"""
    WITH due AS MATERIALIZED (
        SELECT ctid, id, next_poll_at, poll_interval_s
        FROM tasks
        WHERE {LIVE} AND id > :after AND next_poll_at <= now()
        ORDER BY id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ),
    claimed AS (
        UPDATE tasks AS t SET
            poll_interval_s = least(:max_s, coalesce(nullif(t.poll_interval_s, 0), :min_s) * :factor),
            next_poll_at = least(
                now() + make_interval(
                    secs => least(:max_s, coalesce(nullif(t.poll_interval_s, 0), :min_s) * :factor)
                        * (1 - :jitter + 2 * :jitter * random())
                ),
                greatest(t.created_at + make_interval(secs => :deadline_s), now())
            ),
            last_polled_at = now(),
            poll_count = t.poll_count + 1
        -- The locked rows by their addresses, as one array: a TID scan whatever the table's size.
        -- Joined to `due` instead, the planner chose a whole-table scan and hash join on tables of
        -- up to some 40,000 rows (1.8 ms of a 4.2 ms claim of 400 rows, measured).
        WHERE t.ctid = ANY(ARRAY(SELECT ctid FROM due))
        RETURNING t.id, t.task_id, t.kind, t.last_error, t.snapshot_digest,
                  t.last_error IS NULL AND t.consecutive_errors = 0 AND t.missing_count = 0
                      AND now() < t.created_at + make_interval(secs => :deadline_s) AS quiet
    )
    -- One row even when nothing was due: it carries the clock.
    SELECT extract(epoch FROM now())::float8,
           greatest(0, extract(epoch FROM now() - due.next_poll_at))::float8,
           claimed.*, due.poll_interval_s
    FROM (VALUES (1)) AS one LEFT JOIN (claimed JOIN due USING (id)) ON true
    """  # noqa: S608
)


@dataclass(frozen=True, slots=True)
class UnchangedSchedule:
    """How the claim schedules a task whose answer will not change: the interval stretches by
    `factor` from at least `min_s` up to `max_s`, with +-`jitter`, never past the task's deadline."""

    min_s: float
    max_s: float
    factor: float
    jitter: float
    deadline_s: float


async def claim_due(
    db: AsyncSession | AsyncConnection, *, after: int, limit: int, schedule: UnchangedSchedule
) -> Claim:
    """Lock up to `limit` due tasks with ids above `after` (skipping rows others hold, never waiting on
    them) and schedule their next poll as if nothing will change; see _CLAIM."""
    rows = (
        await db.execute(
            _CLAIM,
            {
                "after": after,
                "limit": limit,
                "min_s": schedule.min_s,
                "max_s": schedule.max_s,
                "factor": schedule.factor,
                "jitter": schedule.jitter,
                "deadline_s": schedule.deadline_s,
            },
        )
    ).all()
    # Epoch seconds: the driver builds one float per row faster than one datetime.
    now = datetime.fromtimestamp(rows[0][0], UTC)
    if rows[0][2] is None:  # nothing was due
        return Claim(now, [], [])
    return Claim(now, [ClaimedTask._make(row[2:]) for row in rows], [row[1] for row in rows])


# One statement writes a page: the tasks' rows, their clips and events. Rows go in as JSON documents
# read with json_to_recordset: encoding one (msgspec) costs a fraction of what the driver spends
# encoding a dozen typed arrays element by element.

_WRITE_PAGE = text(
    """
    WITH written AS (
        UPDATE tasks AS t SET
            status = v.status, upstream_status = v.upstream_status, progress = v.progress,
            fail_reason = v.fail_reason, last_payload = COALESCE(v.payload, t.last_payload),
            last_seq = v.last_seq, updated_at = v.updated_at, finished_at = v.finished_at,
            next_poll_at = v.next_poll_at, poll_interval_s = v.poll_interval_s,
            last_polled_at = v.last_polled_at, poll_count = v.poll_count,
            consecutive_errors = v.consecutive_errors, missing_count = v.missing_count,
            last_error = v.last_error, snapshot_digest = decode(v.snapshot_digest, 'base64'),
            notify_hook = v.notify_hook, notify_hook_source = v.notify_hook_source,
            relay_notify_hook = v.relay_notify_hook
        FROM json_to_recordset(CAST(:tasks AS json)) AS v(
            id bigint, status text, upstream_status text, progress smallint, fail_reason text, payload jsonb,
            last_seq integer, updated_at timestamptz, finished_at timestamptz, next_poll_at timestamptz,
            poll_interval_s float8, last_polled_at timestamptz, poll_count integer,
            consecutive_errors integer, missing_count integer, last_error text, snapshot_digest text,
            notify_hook text, notify_hook_source text, relay_notify_hook text
        )
        WHERE t.id = v.id
    ),
    clips_written AS (
        INSERT INTO clips (task_pk, clip_id, position, status, upstream_status, title, audio_url,
                           image_url, video_url, duration, error, created_at, updated_at)
        SELECT c.*, c.updated_at FROM json_to_recordset(CAST(:clips AS json)) AS c(
            task_pk bigint, clip_id text, position smallint, status text, upstream_status text,
            title text, audio_url text, image_url text, video_url text, duration float8, error text,
            updated_at timestamptz
        )
        ON CONFLICT (task_pk, clip_id) DO UPDATE SET
            status = excluded.status, upstream_status = excluded.upstream_status,
            title = excluded.title, audio_url = excluded.audio_url, image_url = excluded.image_url,
            video_url = excluded.video_url, duration = excluded.duration, error = excluded.error,
            updated_at = excluded.updated_at
    ),
    events_written AS (
        INSERT INTO task_events (task_pk, seq, at, type, from_status, to_status, source, clip_id, detail)
        SELECT e.* FROM json_to_recordset(CAST(:events AS json)) AS e(
            task_pk bigint, seq integer, at timestamptz, type text, from_status text, to_status text,
            source text, clip_id text, detail jsonb
        )
    )
    SELECT 1
    """
)

_encode = msgspec.json.Encoder().encode


def _raw_json(raw: bytes | None) -> msgspec.Raw | None:
    """The relay's JSON, embedded as is. jsonb refuses the NUL escape plain JSON allows; one such
    string must not block a whole page."""
    if raw is None:
        return None
    return msgspec.Raw(raw.replace(b"\\u0000", b"\\ufffd") if b"\\u0000" in raw else raw)


async def write_page(
    db: AsyncSession | AsyncConnection,
    tasks: Sequence[TaskState],
    clips: Sequence[tuple[int, ClipState]] = (),
    events: Sequence[EventRow] = (),
    *,
    at: datetime | None = None,
) -> None:
    """Write tasks back with their clips and events, in one statement."""
    task_rows = [
        {
            "id": s.pk,
            "status": s.status,
            "upstream_status": s.upstream_status,
            "progress": s.progress,
            "fail_reason": s.fail_reason,
            "payload": _raw_json(s.payload),
            "last_seq": s.last_seq,
            "updated_at": s.updated_at,
            "finished_at": s.finished_at,
            "next_poll_at": s.next_poll_at,
            "poll_interval_s": s.poll_interval_s,
            "last_polled_at": s.last_polled_at,
            "poll_count": s.poll_count,
            "consecutive_errors": s.consecutive_errors,
            "missing_count": s.missing_count,
            "last_error": s.last_error,
            "snapshot_digest": s.snapshot_digest,
            "notify_hook": s.notify_hook,
            "notify_hook_source": s.notify_hook_source,
            "relay_notify_hook": s.relay_notify_hook,
        }
        for s in tasks
    ]
    clip_rows = [
        {
            "task_pk": pk,
            "clip_id": c.clip_id,
            "position": c.position,
            "status": c.status,
            "upstream_status": c.upstream_status,
            "title": c.title,
            "audio_url": c.audio_url,
            "image_url": c.image_url,
            "video_url": c.video_url,
            "duration": c.duration,
            "error": c.error,
            "updated_at": c.updated_at,
        }
        for pk, c in clips
    ]
    event_rows = [
        {
            "task_pk": e.task_pk,
            "seq": e.seq,
            "at": at,
            "type": e.type,
            "from_status": e.from_status,
            "to_status": e.to_status,
            "source": e.source,
            "clip_id": e.clip_id,
            "detail": e.detail,
        }
        for e in events
    ]
    await db.execute(
        _WRITE_PAGE,
        {
            "tasks": _encode(task_rows).decode(),
            "clips": _encode(clip_rows).decode(),
            "events": _encode(event_rows).decode(),
        },
    )
