"""Queries over tasks, clips and events. Functions take the session first and never commit."""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import ColumnElement, Row, Select, Table, select, text, union_all
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import aliased

from service.db import database_now, recordset, recordset_value, rows_as
from service.models import LIVE, TASK_TRANSITION, Client, Clip, Task, TaskEvent
from service.upstream.schemas import ClipContent, ClipView, Lyrics
from service.vocabulary import DEFAULT_RELAY, EventSource, TaskStatus


def owned_by(client_id: int | None) -> ColumnElement[bool]:
    """Tasks of this client, or the admin's (None): a condition the (client_id, id) index serves."""
    return Task.client_id.is_(None) if client_id is None else Task.client_id == client_id


async def get_task(
    session: AsyncSession, client_id: int | None, task_id: str, *, for_update: bool = False
) -> Task | None:
    """A client's task by its relay task id (client_id None: the admin's)."""
    query = select(Task).where(Task.task_id == task_id, owned_by(client_id))
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def lock_tasks(session: AsyncSession, relay: str, task_id: str) -> list[Task]:
    """Every client's record of this task id on this relay, locked, skipping those another
    transaction holds (a poll in flight)."""
    query = (
        select(Task)
        .where(Task.task_id == task_id, Task.relay == relay)
        .order_by(Task.id)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(query)).scalars())


async def tracks(session: AsyncSession, relay: str, task_id: str) -> bool:
    """Whether any client tracks this task id on this relay."""
    query = select(Task.id).where(Task.task_id == task_id, Task.relay == relay).limit(1)
    return (await session.execute(query)).first() is not None


async def client_names(session: AsyncSession, tasks: Sequence[Task]) -> dict[int, str]:
    """The names of these tasks' clients, by client id."""
    ids = {task.client_id for task in tasks if task.client_id is not None}
    if not ids:
        return {}
    rows = await session.execute(select(Client.id, Client.name).where(Client.id.in_(ids)))
    return {client_id: name for client_id, name in rows}


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


@dataclass(frozen=True, slots=True)
class TaskSearch:
    """GET /tasks filters; each None (or empty) filters nothing."""

    statuses: Sequence[str] = ()
    kind: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    updated_after: datetime | None = None
    task_id_prefix: str | None = None
    # Top-level keys whose values must be these strings: `metadata @> {...}`, served by ix_tasks_metadata.
    metadata: dict[str, str] | None = None


def _search(query: Select[Any], search: TaskSearch) -> Select[Any]:
    if search.statuses:
        query = query.where(Task.status.in_(search.statuses))
    if search.kind is not None:
        query = query.where(Task.kind == search.kind)
    if search.created_after is not None:
        query = query.where(Task.created_at > search.created_after)
    if search.created_before is not None:
        query = query.where(Task.created_at < search.created_before)
    if search.updated_after is not None:
        query = query.where(Task.updated_at > search.updated_after)
    if search.task_id_prefix is not None:
        # The prefix holds only [A-Za-z0-9_-]: `_` is the one LIKE wildcard to escape.
        query = query.where(Task.task_id.like(search.task_id_prefix.replace("_", "\\_") + "%", escape="\\"))
    if search.metadata:
        query = query.where(Task.client_metadata.contains(search.metadata))
    return query


async def list_tasks(
    session: AsyncSession,
    scope: ColumnElement[bool],
    search: TaskSearch,
    *,
    limit: int,
    before_pk: int | None,
) -> list[Task]:
    """Newest first by the identity key: a cursor of the last pk seen is stable while rows are added.
    `scope`: whose tasks the caller may see."""
    query = select(Task).where(scope).order_by(Task.id.desc()).limit(limit)
    if before_pk is not None:
        query = query.where(Task.id < before_pk)
    if len(search.statuses) > 1:
        # Newest first of each status from its own range of ix_tasks_status_id, then merged: with
        # `status IN (...)` the planner reads and sorts every match for a page (docs/design.md, "Search
        # and stats").
        each = replace(search, statuses=())
        newest = union_all(
            *(_search(query.where(Task.status == status), each) for status in search.statuses)
        ).subquery()
        merged = aliased(Task, newest)
        query = select(merged).order_by(merged.id.desc()).limit(limit)
        return list((await session.execute(query)).scalars())
    return list((await session.execute(_search(query, search))).scalars())


# Seconds the task spent in each status it went through, the current one up to now (a terminal status
# accrues nothing), as a JSON object: a column of the task's own row. The task's events are read by
# task_pk alone behind OFFSET 0, so no plan can scan ix_task_events_transitions_at instead: without
# column statistics (a new database filled in seconds) the planner took that partial index for tiny and
# read every transition per GET (docs/design.md, "Read figures").
_TIMELINE = f"""(SELECT jsonb_object_agg(to_status, seconds) FROM (
        SELECT to_status, sum(seconds)::float8 AS seconds FROM (
            SELECT to_status,
                   extract(epoch FROM coalesce(lead(at) OVER (ORDER BY seq),
                                               CASE WHEN tasks.next_poll_at IS NOT NULL THEN now() END) - at)
                       AS seconds
            FROM (SELECT seq, at, to_status, type, clip_id FROM task_events
                  WHERE task_pk = tasks.id ORDER BY seq OFFSET 0) AS events
            WHERE {TASK_TRANSITION}
        ) AS spans
        WHERE seconds IS NOT NULL
        GROUP BY to_status
    ) AS statuses)"""  # noqa: S608
# A clip as the task JSON shows it, built by Postgres: ClipView's fields, each its column (`id`: clip_id).
_CLIP_VIEW = ", ".join(
    f"'{name}', {'clip_id' if name == 'id' else name}" for name in ClipView.__struct_fields__
)


def task_view_columns(columns: Sequence[str], table: str) -> list[str]:
    """`columns` of `table` (an alias of tasks) as a task view row has them: JSON as text."""
    return [
        f"{table}.{name}::text AS {name}" if isinstance(_TASKS.c[name].type, JSONB) else f"{table}.{name}"
        for name in columns
    ]


def task_view_statement(columns: Sequence[str]) -> str:
    """GET /tasks/{task_id} in one statement, for the driver (docs/design.md, "GET a task in one
    statement"): `columns` of the task ($1: its task id; $2: its client's id, NULL for the admin's), its
    client's name (`client_name`), its clips as a JSON array of ClipView objects in position order
    (`clips`, NULL for none) and its timeline (`timeline`, NULL before its first transition). JSON comes
    as text, for msgspec to decode into the shapes it is shown in."""
    return (
        f"SELECT {', '.join(task_view_columns(columns, 'tasks'))}, "  # noqa: S608
        "(SELECT name FROM clients WHERE clients.id = tasks.client_id) AS client_name, "
        f"(SELECT json_agg(json_build_object({_CLIP_VIEW}) ORDER BY position)::text FROM clips "
        "WHERE task_pk = tasks.id) AS clips, "
        f"{_TIMELINE}::text AS timeline "
        "FROM tasks WHERE task_id = $1 AND client_id IS NOT DISTINCT FROM $2"
    )


def timeline_seconds(timeline: dict[str, float] | None) -> dict[str, float]:
    return {status: round(seconds, 3) for status, seconds in (timeline or {}).items()}


async def list_events(session: AsyncSession, task_pk: int, *, after_seq: int = 0) -> list[TaskEvent]:
    query = (
        select(TaskEvent)
        .where(TaskEvent.task_pk == task_pk, TaskEvent.seq > after_seq)
        .order_by(TaskEvent.seq)
    )
    return list((await session.execute(query)).scalars())


# --- the poller's and the recorder's statements --------------------------------------------------------
# Core statements over whole pages, never per-row ORM round trips (docs/design.md, "Pages, not rows").
# Every row below is declared once, as a struct whose field names are the columns it reads or writes;
# the statements' column lists are built from those fields (tests/test_rows.py holds them to the tables).

_TASKS: Table = Task.__table__  # type: ignore[assignment]
_CLIPS: Table = Clip.__table__  # type: ignore[assignment]
_EVENTS: Table = TaskEvent.__table__  # type: ignore[assignment]


class ClipState(ClipContent, kw_only=True):
    """A clips row as the recorder reads and writes it."""

    task_pk: int
    clip_id: str
    position: int
    status: str | None
    upstream_status: str | None
    updated_at: datetime


_CLIP_CONTENT = ClipContent.__struct_fields__


def clip_view(clip: ClipState | Clip) -> ClipView:
    """A stored clip (as the recorder holds it, or as the ORM loads it) as the task JSON shows it."""
    return ClipView(
        id=clip.clip_id,
        status=None if clip.status is None else TaskStatus(clip.status),
        **{name: getattr(clip, name) for name in _CLIP_CONTENT},
    )


class TaskIdentity(msgspec.Struct, kw_only=True):
    """The columns of a task the recorder reads and never writes."""

    id: int
    task_id: str
    kind: str
    created_at: datetime
    # NULL: the registration chose no format (webhooks.bodies.delivery_format).
    notify_format: str | None
    metadata: dict[str, Any] | None
    # Not a tasks column: its client's relay_hooks (None: the admin's task, or the client set none).
    client_relay_hooks: str | None = None


class TaskState(TaskIdentity, kw_only=True):
    """A task row as the recorder sees it; mutated in place, then written back. Always read under the
    row's lock (lock_task_states), held until the write-back: nobody can change it in between. The
    fields declared here (not TaskIdentity's) are what write_page writes."""

    status: str
    upstream_status: str | None
    progress: int | None
    fail_reason: str | None
    last_seq: int
    updated_at: datetime
    finished_at: datetime | None
    next_poll_at: datetime | None
    poll_interval_s: float | None
    last_polled_at: datetime | None
    poll_count: int
    consecutive_errors: int
    missing_count: int
    last_error: str | None
    snapshot_digest: bytes | None
    # A hook the relay reports may be adopted (tracking.service.relay_hook_news).
    notify_hook: str | None
    notify_hook_source: str | None
    relay_notify_hook: str | None
    lyrics: Lyrics | None
    # Written to task_answers when set (the relay's answer, as received), never read here.
    last_answer: msgspec.Raw | None = None
    clips: list[ClipState] = []


class EventRow(msgspec.Struct, frozen=True, kw_only=True):
    """A task_events row as the recorder appends it."""

    task_pk: int
    seq: int
    at: datetime
    type: str
    from_status: str | None
    to_status: str
    source: str
    clip_id: str | None
    detail: dict[str, Any] | None


class ClaimedTask(NamedTuple):
    """What the poller needs of a claimed task to poll it and to tell whether its answer is news;
    the rest is read (lock_task_states) only for the tasks whose answers are. A tuple: a page holds
    hundreds, and a tuple is the cheapest thing to build from a row."""

    id: int
    task_id: str
    kind: str
    last_error: str | None
    snapshot_digest: bytes | None
    # Nothing pending but the next answer: no error, no batch miss, deadline not reached.
    quiet: bool
    # Before the claim stretched it (the claim's own values are for an answer that changes nothing).
    poll_interval_s: float | None
    # How long the task had been due when claimed.
    lag_s: float


@dataclass(frozen=True, slots=True)
class PollClaim:
    """Due tasks locked by the caller's transaction, which must stay open until they are recorded."""

    now: datetime
    tasks: list[ClaimedTask]


# Not columns of tasks: the answer has a table of its own (task_answers).
_NOT_COLUMNS = ("clips", "client_relay_hooks", "last_answer")
_TASK_READ = tuple(name for name in TaskState.__struct_fields__ if name not in _NOT_COLUMNS)
_TASK_COLUMNS_WRITTEN = (
    "id",
    *(
        name
        for name in TaskState.__struct_fields__
        if name not in TaskIdentity.__struct_fields__ + _NOT_COLUMNS
    ),
)
_TASK_WRITTEN = (*_TASK_COLUMNS_WRITTEN, "last_answer")
_task_written = operator.attrgetter(*_TASK_WRITTEN)
_CLIP_COLUMNS = ClipState.__struct_fields__
_clip_rows = msgspec.json.Decoder(list[ClipState])


def _with_clips(alias: str) -> str:
    """The task's clips as one JSON array column. Riding along saves a statement per page, and avoids
    a `task_pk = ANY(array)` lookup (docs/design.md, "Clips ride along")."""
    fields = ", ".join(f"'{column}', c.{column}" for column in _CLIP_COLUMNS)
    return (
        f"(SELECT coalesce(json_agg(json_build_object({fields}) ORDER BY c.position), '[]')::text "  # noqa: S608
        f"FROM clips AS c WHERE c.task_pk = {alias}.id)"
    )


def _task_state(row: Row[Any]) -> TaskState:
    values = dict(row._mapping)
    del values["now"]
    values["clips"] = _clip_rows.decode(values["clips"])
    return msgspec.convert(values, TaskState)


_LOCK = (
    f"SELECT now() AS now, {', '.join(_TASK_READ)}, {_with_clips('tasks')} AS clips, "  # noqa: S608
    "(SELECT c.relay_hooks FROM clients AS c WHERE c.id = tasks.client_id) AS client_relay_hooks "
    "FROM tasks WHERE %s ORDER BY id FOR UPDATE OF tasks"
)
_LOCK_BY_PK = text(_LOCK % "id = ANY(CAST(:pks AS bigint[]))")
_LOCK_BY_TASK_ID = text(_LOCK % "task_id = ANY(CAST(:task_ids AS text[])) AND relay = :relay")


async def lock_task_states(
    session: AsyncSession, *, pks: Sequence[int] = (), relay: str = "", task_ids: Sequence[str] = ()
) -> tuple[datetime, list[TaskState]]:
    """Lock the given tasks (by pk, or every client's record of these task ids on `relay`), in id
    order so concurrent lockers cannot deadlock, and read them with their clips. Returns the
    transaction's now() too: every time written in this unit of work uses it."""
    query = _LOCK_BY_PK if pks else _LOCK_BY_TASK_ID
    params = {"pks": list(pks), "relay": relay, "task_ids": list(task_ids)}
    rows = (await session.execute(query, params)).all()
    if not rows:
        return await database_now(session), []
    return rows[0].now, [_task_state(row) for row in rows]


# The claim. Every claimed row is written once, here, already scheduled as if the relay's answer will
# change nothing (the common case): then recording that answer writes nothing at all. The row locks
# taken by `due` are the lease, held until the caller's transaction ends; a crashed process's locks go
# with its connection. It sweeps the live tasks in id order from a cursor (the last id the previous
# page claimed): docs/design.md, "The poller's claim". Within a look-ahead (look_ahead) it reads only
# the tasks registered since (`watched`): docs/design.md, "The idle poller".
_WATCHED = f"""
    registered AS MATERIALIZED (
        SELECT t.id, t.task_id, t.shared FROM tasks AS t
        WHERE t.id = ANY(ARRAY(
            -- Feed numbers are given in commit order: a registration committed after the look-ahead's
            -- snapshot is numbered above its mark, or not numbered yet.
            SELECT task_pk FROM task_events WHERE feed_id > :since AND source = '{EventSource.REGISTER.value}'
            UNION ALL
            SELECT task_pk FROM task_events WHERE feed_id IS NULL AND source = '{EventSource.REGISTER.value}'
        )) AND t.relay = :relay
    ),
    -- With the other clients' records of a shared one: the claim polls (and reschedules) them together.
    watched AS MATERIALIZED (
        SELECT id FROM registered
        UNION
        SELECT id FROM tasks
        WHERE task_id = ANY(ARRAY(SELECT task_id FROM registered WHERE shared)) AND relay = :relay
    ),"""  # noqa: S608


def _claim_sql(watched: str = "", scope: str = "") -> str:
    return f"""
    WITH {watched} due AS MATERIALIZED (
        SELECT ctid, id, task_id, shared, next_poll_at, poll_interval_s
        FROM tasks
        WHERE {LIVE} AND relay = :relay AND id > :after AND next_poll_at <= now() {scope}
        ORDER BY id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ),
    -- The other clients' records of a shared relay task among them, due or not: polled with it, so the
    -- relay is asked once per turn. Registration marks a new record shared when another client's
    -- exists; the claim marks the others. Rarely any: an empty array costs nothing. Live as the CHECK
    -- polled_while_live puts it, not as ix_tasks_live's predicate: a plan could then AND that index's
    -- every entry of the relay into the task id lookup (docs/design.md, "The poller's claim").
    siblings AS MATERIALIZED (
        SELECT ctid, id, next_poll_at, poll_interval_s
        FROM tasks
        WHERE task_id = ANY(ARRAY(SELECT task_id FROM due WHERE shared)) AND relay = :relay
            AND next_poll_at IS NOT NULL AND id NOT IN (SELECT id FROM due)
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
            poll_count = t.poll_count + 1,
            shared = t.shared OR t.task_id IN (SELECT task_id FROM due WHERE shared)
        -- The locked rows by their addresses, as one array: a TID scan whatever the table's size.
        WHERE t.ctid = ANY(ARRAY(SELECT ctid FROM due) || ARRAY(SELECT ctid FROM siblings))
        RETURNING t.id, t.task_id, t.kind, t.last_error, t.snapshot_digest,
                  t.last_error IS NULL AND t.consecutive_errors = 0 AND t.missing_count = 0
                      AND now() < t.created_at + make_interval(secs => :deadline_s) AS quiet
    ),
    locked AS (
        SELECT id, next_poll_at, poll_interval_s FROM due
        UNION ALL SELECT id, next_poll_at, poll_interval_s FROM siblings
    )
    -- One row even when nothing was due: it carries the clock.
    SELECT extract(epoch FROM now())::float8 AS now_epoch,
           greatest(0, extract(epoch FROM now() - locked.next_poll_at))::float8 AS lag_s,
           claimed.*, locked.poll_interval_s
    FROM (VALUES (1)) AS one LEFT JOIN (claimed JOIN locked USING (id)) ON true
    """  # noqa: S608


_CLAIM = text(_claim_sql())
_CLAIM_WATCHED = text(_claim_sql(_WATCHED, "AND id = ANY(ARRAY(SELECT id FROM watched))"))

# When the relay's next live task is due (NULL: none is live), and the feed's last number, in one
# snapshot: a registration this does not see is numbered above that mark (docs/design.md, "The idle
# poller"). Rows a page holds locked count with their committed (due) next_poll_at.
_LOOK_AHEAD = text(
    f"""
    SELECT extract(epoch FROM now())::float8 AS now_epoch,
           extract(epoch FROM (
               SELECT min(next_poll_at) FROM tasks WHERE {LIVE} AND relay = :relay
           ))::float8 AS next_epoch,
           (SELECT coalesce(max(feed_id), 0) FROM task_events WHERE feed_id IS NOT NULL) AS mark
    """  # noqa: S608
)


class LookAhead(NamedTuple):
    """How many seconds from now the relay's next live task is due (None: none is live; 0 or less:
    one is due, or held by a page in flight), and the feed's last number at that moment."""

    due_in_s: float | None
    mark: int


async def look_ahead(db: AsyncSession | AsyncConnection, *, relay: str) -> LookAhead:
    row = (await db.execute(_LOOK_AHEAD, {"relay": relay})).one()
    due_in_s = None if row.next_epoch is None else row.next_epoch - row.now_epoch
    return LookAhead(due_in_s, int(row.mark))


@dataclass(frozen=True, slots=True)
class UnchangedSchedule:
    """How the claim schedules a task whose answer will not change: the interval stretches by
    `factor` from at least `min_s` up to `max_s`, with +-`jitter`, never past the task's deadline."""

    min_s: float
    max_s: float
    factor: float
    jitter: float
    deadline_s: float


def claim_parameters(
    *, relay: str, after: int, limit: int, schedule: UnchangedSchedule, since: int | None = None
) -> dict[str, Any]:
    """The claim statement's parameters, by name (claim_due_tasks)."""
    return {"since": since, "relay": relay, "after": after, "limit": limit, **asdict(schedule)}


async def claim_due_tasks(
    db: AsyncSession | AsyncConnection,
    *,
    relay: str = DEFAULT_RELAY,
    after: int,
    limit: int,
    schedule: UnchangedSchedule,
    since: int | None = None,
) -> PollClaim:
    """Lock up to `limit` due tasks of `relay` with ids above `after` (skipping rows others hold,
    never waiting on them), with the other clients' records of the same relay tasks, and schedule
    their next poll as if nothing will change; see _CLAIM. `since`, a look-ahead's mark: only among
    the tasks registered after it (and the other records of the same relay tasks)."""
    result = await db.execute(
        _CLAIM if since is None else _CLAIM_WATCHED,
        claim_parameters(relay=relay, after=after, limit=limit, schedule=schedule, since=since),
    )
    rows = result.all()
    # Epoch seconds: the driver builds one float per row faster than one datetime.
    now = datetime.fromtimestamp(rows[0].now_epoch, UTC)
    if rows[0].id is None:  # nothing was due
        return PollClaim(now, [])
    return PollClaim(now, rows_as(list(result.keys()), rows, ClaimedTask))


# One statement writes a page: the tasks' rows, their clips and events. Rows go in as JSON documents
# read with json_to_recordset (docs/design.md, "Pages, not rows").
_CLIP_KEYS = ("task_pk", "clip_id")
_TASK_SET = ", ".join(f"{name} = {recordset_value(_TASKS, name, 'v')}" for name in _TASK_COLUMNS_WRITTEN[1:])
_CLIP_SET = ", ".join(f"{name} = excluded.{name}" for name in _CLIP_COLUMNS if name not in _CLIP_KEYS)
_CLIP_LIST = ", ".join(_CLIP_COLUMNS)
_EVENT_LIST = ", ".join(EventRow.__struct_fields__)
_WRITE_PAGE = text(
    f"""
    WITH written AS (
        UPDATE tasks AS t SET {_TASK_SET}
        FROM json_to_recordset(CAST(:tasks AS json))
            AS v({recordset(_TASKS, _TASK_COLUMNS_WRITTEN)}, last_answer text)
        WHERE t.id = v.id
        RETURNING t.id, v.last_answer
    ),
    answers_written AS (
        INSERT INTO task_answers (task_pk, answer)
        SELECT id, last_answer FROM written WHERE last_answer IS NOT NULL
        ON CONFLICT (task_pk) DO UPDATE SET answer = excluded.answer
    ),
    clips_written AS (
        INSERT INTO clips ({_CLIP_LIST}, created_at)
        SELECT {_CLIP_LIST}, updated_at
        FROM json_to_recordset(CAST(:clips AS json)) AS c({recordset(_CLIPS, _CLIP_COLUMNS)})
        ON CONFLICT ({", ".join(_CLIP_KEYS)}) DO UPDATE SET {_CLIP_SET}
    ),
    events_written AS (
        INSERT INTO task_events ({_EVENT_LIST})
        SELECT {_EVENT_LIST}
        FROM json_to_recordset(CAST(:events AS json)) AS e({recordset(_EVENTS, EventRow.__struct_fields__)})
    )
    SELECT 1
    """  # noqa: S608
)

_encode = msgspec.json.Encoder().encode


# A NUL escape: `\u0000` after an even number of backslashes (after an odd one it is text).
_NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def without_nul(document: bytes) -> bytes:
    """JSON as Postgres stores it: text and jsonb refuse NUL, which JSON (and a relay's answer) may
    hold; each becomes U+FFFD, so one such string does not fail a whole page. Scanned only in what is
    written (answers that changed): a miss costs one pass of a byte search."""
    if b"\\u0000" not in document:
        return document
    return _NUL_ESCAPE.sub(rb"\1\\ufffd", document)


def relay_json(raw: bytes | None) -> msgspec.Raw | None:
    """The relay's JSON, to be stored as received but for the NUL escape plain JSON allows, which
    Postgres refuses in any text once decoded (without_nul): one such string must not fail a poll."""
    return None if raw is None else msgspec.Raw(without_nul(raw))


async def write_page(
    db: AsyncSession | AsyncConnection,
    tasks: Sequence[TaskState],
    clips: Sequence[ClipState] = (),
    events: Sequence[EventRow] = (),
) -> None:
    """Write tasks back with their clips and events, in one statement."""
    task_rows = [dict(zip(_TASK_WRITTEN, _task_written(state), strict=True)) for state in tasks]
    await db.execute(
        _WRITE_PAGE,
        {
            "tasks": without_nul(_encode(task_rows)).decode(),
            "clips": without_nul(_encode(clips)).decode(),
            "events": without_nul(_encode(events)).decode(),
        },
    )


# --- the relay front's reads (api/relay_front.py) -------------------------------------------------------


class RelayView(msgspec.Struct, kw_only=True):
    """What the relay front renders of a task, field names being its columns: the relay's task object
    is our state written over the relay's last answer (`last_answer`)."""

    id: int
    task_id: str
    relay: str
    kind: str
    status: TaskStatus
    progress: int | None
    fail_reason: str | None
    finished_at: datetime | None
    notify_hook: str | None
    clips: list[ClipView]
    # The relay's last answer as it sent it (filled from its own column: see _RELAY_VIEWS).
    last_answer: str | None = None


# ClipView's fields from the clips row (its `id` is the row's clip_id).
_VIEW_CLIP = ", ".join(
    f"'{name}', c.{'clip_id' if name == 'id' else name}" for name in ClipView.__struct_fields__
)
_VIEW_TASK = ", ".join(
    f"'{name}', t.{name}" for name in RelayView.__struct_fields__ if name not in ("clips", "last_answer")
)
# A row per task: its small fields and clips as one JSON document, and the relay's answer as stored
# text beside it, which Postgres sends as it is; through a JSON function it would be parsed and printed
# again (docs/design.md, "The relay front's fetch").
_RELAY_VIEWS = text(
    f"""
    SELECT json_build_object({_VIEW_TASK}, 'clips', (
        SELECT coalesce(json_agg(json_build_object({_VIEW_CLIP}) ORDER BY c.position), '[]')
        FROM clips AS c WHERE c.task_pk = t.id
    ))::text AS view, a.answer AS last_answer
    FROM tasks AS t LEFT JOIN task_answers AS a ON a.task_pk = t.id
    WHERE t.task_id = ANY(CAST(:task_ids AS text[])) AND t.client_id IS NOT DISTINCT FROM :client_id
    """  # noqa: S608
)
_relay_view = msgspec.json.Decoder(RelayView)


async def relay_views(
    session: AsyncSession, client_id: int | None, task_ids: Sequence[str]
) -> dict[str, RelayView]:
    """These tasks of a client (None: the admin's), those tracked, by task_id, in one statement."""
    if not task_ids:
        return {}
    values = {"task_ids": list(task_ids), "client_id": client_id}
    views = {}
    for row in await session.execute(_RELAY_VIEWS, values):
        view = _relay_view.decode(row.view)
        view.last_answer = row.last_answer
        views[view.task_id] = view
    return views
