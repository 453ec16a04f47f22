"""The global event feed: a page at a time (GET /events) or as it happens (GET /events/stream, SSE)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Request, get
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from sqlalchemy import ColumnElement

from service.api import AppRuntime, DbSession, TaskOwner, event_scope
from service.api.schemas import INT64_MAX, FeedEventOut, FeedPage, feed_event_out
from service.db import transaction
from service.errors import InvalidInput
from service.feed import reads
from service.feed.watcher import FeedWatcher
from service.runtime import Runtime

STREAM_KEEPALIVE_S = 15.0
STREAM_BATCH = 200
FeedAfter = Annotated[
    int,
    QueryParameter(
        ge=0,
        le=INT64_MAX,
        schema_extra={"maximum": INT64_MAX},
        description="Only events with a greater feed id (the previous page's next_after)",
    ),
]
_encode = msgspec.json.Encoder().encode


def _page(rows: list[reads.FeedRow]) -> list[FeedEventOut]:
    return [feed_event_out(row.event, row.task_id, row.kind, row.client) for row in rows]


@get("/api/v1/events", summary="Every event of the caller's tasks in commit order (a pull feed)")
async def list_feed(
    session: DbSession,
    owner: TaskOwner,
    after: FeedAfter = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> FeedPage:
    items = _page(await reads.read_feed(session, event_scope(owner), after=after, limit=limit))
    return FeedPage(items=items, next_after=items[-1].id if items else after)


def resume_after(header: str | None) -> int | None:
    if not header:
        return None
    if not (header.isascii() and header.isdigit() and int(header) <= INT64_MAX):
        raise InvalidInput("Last-Event-ID: must be a feed id (an integer from 0 to 2^63-1)")
    return int(header)


async def _stream(
    runtime: Runtime, watcher: FeedWatcher, scope: ColumnElement[bool], after: int
) -> AsyncIterator[ServerSentEventMessage]:
    while not watcher.closed:
        changed = watcher.changed
        async with transaction(runtime.sessions) as session:
            rows = await reads.read_feed(session, scope, after=after, limit=STREAM_BATCH)
        for item in _page(rows):
            after = item.id
            yield ServerSentEventMessage(data=_encode(item).decode(), event="task.event", id=item.id)
        if len(rows) == STREAM_BATCH:
            continue
        try:
            await asyncio.wait_for(changed.wait(), STREAM_KEEPALIVE_S)
        except TimeoutError:
            yield ServerSentEventMessage(data=None, comment="keep-alive")


@get(
    "/api/v1/events/stream",
    summary="The same feed as Server-Sent Events, resumable with Last-Event-ID",
    description=(
        "Each event: `id:` its feed id, `event: task.event`, `data:` the event JSON (as in GET /events). "
        "A comment line every 15 s keeps idle connections open. Without Last-Event-ID the stream starts "
        "with what happens next."
    ),
)
async def stream_feed(
    request: Request[Any, Any, Any],
    runtime: AppRuntime,
    session: DbSession,
    owner: TaskOwner,
    last_event_id: Annotated[
        str | None,
        HeaderParameter(
            name="Last-Event-ID",
            max_length=19,
            pattern=r"^[0-9]*$",
            description="Resume after this feed id",
        ),
    ] = None,
) -> ServerSentEvent:
    after = resume_after(last_event_id)
    if after is None:
        after = await reads.feed_end(session)
    watcher: FeedWatcher = request.app.state.feed_watcher
    return ServerSentEvent(_stream(runtime, watcher, event_scope(owner), after))


EVENT_ROUTES = [list_feed, stream_feed]
