"""Task endpoints: register, read, list, history."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import FromQuery, JSONBody, QueryParameter
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send
from sqlalchemy.ext.asyncio import AsyncSession

from service.api import AppRuntime, DbSession, TaskIdPath, TaskOwner, task_scope
from service.api.auth import REGISTERS, ClientQuery, Owner, rate_limited, request_owner
from service.api.connection import AUTOCOMMIT, request_connection, scope_runtime
from service.api.schemas import (
    INT32_MAX,
    METADATA_MAX_BYTES,
    TASK_ID_MAX_LENGTH,
    TASK_ID_PATTERN,
    TASK_VIEW_COLUMNS,
    BatchItem,
    BatchOut,
    EventList,
    RegisterBatch,
    RegisterTask,
    TaskOut,
    TaskPage,
    decode_cursor,
    encode_cursor,
    event_out,
    parse_time,
    task_out,
    task_view_out,
)
from service.clients.service import known_relay, take_up_to
from service.errors import Conflict, InvalidInput, NotFound, ServiceError
from service.models import Task
from service.runtime import Runtime
from service.tracking import repository
from service.tracking.service import (
    Registration,
    TaskRow,
    cancel_task,
    poll_task,
    register_again,
    register_tasks,
)
from service.vocabulary import EventSource, TaskKind, TaskStatus
from service.webhooks.ssrf import check_hook_url


class TaskAnswer(Response[TaskOut]):
    """A task as JSON, for the two hot routes: the body encoded once and the two ASGI messages built
    here, with the headers Litestar gives a struct (content-type, content-length), without its
    header mutations and checks on the way (docs/design.md, "The layers of a request")."""

    def to_asgi_response(self, *_args: Any, **_kwargs: Any) -> ASGIResponse:
        assert self.status_code is not None  # each route gives its own
        return _Answer(self.status_code, _encode(self.content))


_encode = msgspec.json.Encoder().encode


class _Answer(ASGIResponse):
    """The two messages alone: none of ASGIResponse's other state is set or read."""

    __slots__ = ("messages",)

    def __init__(self, status_code: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        self.messages = (
            {"type": "http.response.start", "status": status_code, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, body = self.messages
        await send(start)  # type: ignore[arg-type]
        await send(body)  # type: ignore[arg-type]


async def load_task_out(session: AsyncSession, owner: Owner, task: Task) -> TaskOut:
    clips = await repository.clips_by_task(session, [task.id])
    names = await repository.client_names(session, [task]) if owner.shows_client else None
    return task_out(task, clips[task.id], names)


def registered_out(owner: Owner, task: TaskRow) -> TaskOut:
    return task_view_out(task, shows_client=owner.shows_client, timeline=False)


def not_tracked(task_id: str) -> NotFound:
    return NotFound(f"task {task_id!r} is not tracked", extra={"task_id": task_id})


async def require_task(session: AsyncSession, owner: Owner, task_id: str) -> Task:
    """The owner's task of this id: another client's is as unknown as one nobody registered."""
    task = await repository.get_task(session, owner.client_id, task_id)
    if task is None:
        raise not_tracked(task_id)
    return task


async def check_registration(runtime: Runtime, data: RegisterTask, owner: Owner) -> None:
    """What the struct cannot say about a registration: 400s naming the field."""
    if data.metadata is not None and len(msgspec.json.encode(data.metadata)) > METADATA_MAX_BYTES:
        raise InvalidInput(f"metadata: must encode to at most {METADATA_MAX_BYTES} bytes of JSON")
    # The client's own relay too: it may have left the configuration since the client was made.
    known_relay(runtime.settings, data.relay or owner.relay)
    if data.notify_hook is not None:
        await check_hook_url(data.notify_hook, allow_private=runtime.settings.allow_private_hooks)


@post(
    "/api/v1/tasks",
    status_code=201,
    summary="Start tracking a relay task",
    opt={REGISTERS: True},
)
async def create_task(
    request: Request[Any, Any, Any], data: JSONBody[RegisterTask], owner: TaskOwner
) -> Response[TaskOut]:
    """A new task is one statement by the driver, committed on its own, together with the other single
    registrations of its client waiting at the same moment (docs/design.md, "Registration in one
    statement", "Registrations grouped into one statement"); only a task registered before takes a
    transaction, its row locked while its hook, format or metadata is replaced."""
    runtime = scope_runtime(request.scope)
    await check_registration(runtime, data, owner)
    registration = Registration(
        data.task_id, data.kind, data.notify_hook, data.notify_format, data.metadata, data.relay
    )
    db = request_connection(request)
    # The group's statement takes a pooled connection of its own: a request waiting for it holds none.
    await db.release()
    task = await runtime.registrar.register(
        registration, client_id=owner.client_id, default_relay=owner.relay
    )
    if task is not None:
        return TaskAnswer(registered_out(owner, task), status_code=201)
    # The insert found it registered (tasks are never deleted): lock it and apply what changed.
    driver = await db.driver()
    async with driver.transaction():
        task = await register_again(driver.fetch, owner.client_id, registration)
    return TaskAnswer(registered_out(owner, task), status_code=200)


@post("/api/v1/tasks/batch", status_code=200, summary="Start tracking up to 500 relay tasks at once")
async def register_batch(
    request: Request[Any, Any, Any],
    data: JSONBody[RegisterBatch],
    owner: TaskOwner,
) -> BatchOut:
    """Each item answers as the single route would, in request order, all in one transaction. A client
    takes one registration per valid item from its rate bucket: those the bucket cannot cover now are
    429 items, and a batch it covers none of is a 429 (docs/design.md, "The batch route")."""
    runtime = scope_runtime(request.scope)
    items: list[BatchItem | None] = [None] * len(data.tasks)
    valid: list[tuple[int, RegisterTask]] = []
    for index, raw in enumerate(data.tasks):
        try:
            registration = msgspec.convert(raw, RegisterTask)
            await check_registration(runtime, registration, owner)
        except (msgspec.ValidationError, ServiceError) as refused:
            given = raw.get("task_id") if isinstance(raw, dict) else None
            status = refused.status_code if isinstance(refused, ServiceError) else 400
            detail = refused.detail if isinstance(refused, ServiceError) else f"tasks[{index}]: {refused}"
            given = given if isinstance(given, str) else None
            items[index] = BatchItem(task_id=given, status_code=status, detail=detail)
        else:
            valid.append((index, registration))
    granted = len(valid)
    db = request_connection(request)
    if owner.caller.client_id is not None and valid:
        # Before the registrations' transaction: the bucket's row lock is held for this statement only.
        granted, wait_s = await take_up_to(
            db, owner.caller.client_id, len(valid), default_rate=runtime.settings.client_rate
        )
        if granted == 0:
            raise rate_limited(owner.caller, wait_s)
    for index, registration in valid[granted:]:
        detail = f"client {owner.caller.name!r} is over its registration rate"
        items[index] = BatchItem(task_id=registration.task_id, status_code=429, detail=detail)
    registering = valid[:granted]
    driver = await db.driver()
    async with driver.transaction():
        results = await register_tasks(
            driver.fetch,
            [
                Registration(r.task_id, r.kind, r.notify_hook, r.notify_format, r.metadata, r.relay)
                for _index, r in registering
            ],
            client_id=owner.client_id,
            default_relay=owner.relay,
            settings=runtime.settings,
        )
    for (index, registration), result in zip(registering, results, strict=True):
        if isinstance(result, Conflict):
            items[index] = BatchItem(task_id=registration.task_id, status_code=409, detail=result.detail)
            continue
        task, created = result
        out = registered_out(owner, task)
        items[index] = BatchItem(task_id=task["task_id"], status_code=201 if created else 200, task=out)
    return BatchOut(items=[item for item in items if item is not None])


_READ_TASK = repository.task_view_statement(TASK_VIEW_COLUMNS)


@get("/api/v1/tasks/{task_id:str}", summary="One task with its clips and the time it spent in each status")
async def read_task(
    request: Request[Any, Any, Any], task_id: TaskIdPath, client: ClientQuery = None
) -> Response[TaskOut]:
    """One statement by the driver, no session, no dependencies (docs/design.md, "GET a task in one
    statement", "Read figures")."""
    owner = await request_owner(request, client)
    row = await request_connection(request).fetchrow(_READ_TASK, task_id, owner.client_id)
    if row is None:
        raise not_tracked(task_id)
    return TaskAnswer(task_view_out(row, shows_client=owner.shows_client), status_code=200)


TimeQuery = Annotated[
    str | None,
    QueryParameter(
        description="RFC 3339 time with its UTC offset", max_length=64, schema_extra={"format": "date-time"}
    ),
]
METADATA_PREFIX = "metadata."
METADATA_FILTERS_MAX = 8
METADATA_KEY_MAX = 128
METADATA_VALUE_MAX = 1024


def metadata_filters(request: Request[Any, Any, Any]) -> dict[str, str] | None:
    """`metadata.<key>=<value>` query parameters: string equality on top-level keys."""
    wanted: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if not name.startswith(METADATA_PREFIX):
            continue
        key = name.removeprefix(METADATA_PREFIX)
        if not 1 <= len(key) <= METADATA_KEY_MAX or len(value) > METADATA_VALUE_MAX:
            raise InvalidInput(
                f"{name}: the key takes 1-{METADATA_KEY_MAX} characters, "
                f"the value at most {METADATA_VALUE_MAX}"
            )
        if "\x00" in key or "\x00" in value:
            raise InvalidInput(f"{name}: may not contain NUL")
        if key in wanted:
            raise InvalidInput(f"{name}: given twice")
        wanted[key] = value
    if len(wanted) > METADATA_FILTERS_MAX:
        raise InvalidInput(f"metadata: at most {METADATA_FILTERS_MAX} metadata.<key> filters")
    return wanted or None


def aware(name: str, value: str | None) -> datetime | None:
    return None if value is None else parse_time(name, value)


@get(
    "/api/v1/tasks",
    summary="Tasks, newest first, with keyset pagination",
    opt={AUTOCOMMIT: True},
    description=(
        "Filters combine (AND). `status` may repeat. `metadata.<key>=<value>` (up to 8) matches tasks whose "
        "metadata has that top-level key with that string value, e.g. `metadata.order_id=A-1001`."
    ),
)
async def list_tasks(
    *,
    request: Request[Any, Any, Any],
    session: DbSession,
    owner: TaskOwner,
    status: Annotated[list[TaskStatus] | None, QueryParameter(max_items=len(TaskStatus))] = None,
    kind: FromQuery[TaskKind | None] = None,
    created_after: TimeQuery = None,
    created_before: TimeQuery = None,
    updated_after: TimeQuery = None,
    task_id_prefix: Annotated[
        str | None, QueryParameter(min_length=1, max_length=TASK_ID_MAX_LENGTH, pattern=TASK_ID_PATTERN)
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, QueryParameter(max_length=64)] = None,
) -> TaskPage:
    search = repository.TaskSearch(
        statuses=status or (),
        kind=kind,
        created_after=aware("created_after", created_after),
        created_before=aware("created_before", created_before),
        updated_after=aware("updated_after", updated_after),
        task_id_prefix=task_id_prefix,
        metadata=metadata_filters(request),
    )
    tasks = await repository.list_tasks(
        session,
        task_scope(owner),
        search,
        limit=limit + 1,
        before_pk=decode_cursor("t", cursor) if cursor else None,
    )
    page, more = tasks[:limit], len(tasks) > limit
    clips = await repository.clips_by_task(session, [task.id for task in page])
    names = await repository.client_names(session, page) if owner.shows_client else None
    return TaskPage(
        items=[task_out(task, clips[task.id], names) for task in page],
        next_cursor=encode_cursor("t", page[-1].id) if more else None,
    )


@get("/api/v1/tasks/{task_id:str}/events", summary="A task's history in seq order", opt={AUTOCOMMIT: True})
async def list_task_events(
    task_id: TaskIdPath,
    session: DbSession,
    owner: TaskOwner,
    after: Annotated[
        int, QueryParameter(ge=0, le=INT32_MAX, description="Only events with a greater seq")
    ] = 0,
) -> EventList:
    task = await require_task(session, owner, task_id)
    events = await repository.list_events(session, task.id, after_seq=after)
    return EventList(items=[event_out(event) for event in events])


@post("/api/v1/tasks/{task_id:str}/refresh", status_code=200, summary="Poll the relay for this task now")
async def refresh_task_now(
    task_id: TaskIdPath, session: DbSession, runtime: AppRuntime, owner: TaskOwner
) -> TaskOut:
    """A terminal task is returned as it is: polling stopped for good. 502 when the relay fails."""
    await poll_task(
        session,
        runtime.relays,
        task_id,
        source=EventSource.API,
        settings=runtime.settings,
        client_id=owner.client_id,
    )
    return await load_task_out(session, owner, await require_task(session, owner, task_id))


@delete(
    "/api/v1/tasks/{task_id:str}", status_code=200, summary="Stop tracking: status cancelled, history kept"
)
async def cancel_task_now(
    task_id: TaskIdPath, session: DbSession, runtime: AppRuntime, owner: TaskOwner
) -> TaskOut:
    """Idempotent for a cancelled task; 409 for one that already finished otherwise. The relay is not
    told (it has no cancel endpoint)."""
    await cancel_task(session, task_id, client_id=owner.client_id, settings=runtime.settings)
    return await load_task_out(session, owner, await require_task(session, owner, task_id))


TASK_ROUTES = [
    create_task,
    register_batch,
    read_task,
    list_tasks,
    list_task_events,
    refresh_task_now,
    cancel_task_now,
]
