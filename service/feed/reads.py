"""The API's reads of the feed."""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import Client, Task, TaskEvent


class FeedRow(NamedTuple):
    event: TaskEvent
    task_id: str
    kind: str
    client: str | None


async def read_feed(
    session: AsyncSession, scope: ColumnElement[bool], *, after: int, limit: int
) -> list[FeedRow]:
    """Numbered events in scope (a condition on task_events.client_id) after feed id `after`, in feed
    order, each with its task's id, kind and client name."""
    query = (
        select(TaskEvent, Task.task_id, Task.kind, Client.name)
        .join(Task, Task.id == TaskEvent.task_pk)
        .outerjoin(Client, Client.id == TaskEvent.client_id)
        .where(TaskEvent.feed_id > after, scope)
        .order_by(TaskEvent.feed_id)
        .limit(limit)
    )
    return [FeedRow(*row) for row in await session.execute(query)]


async def feed_end(session: AsyncSession) -> int:
    """The highest feed id handed out so far (0 before any): where a stream with no Last-Event-ID starts."""
    last = await session.scalar(select(func.max(TaskEvent.feed_id)))
    return int(last or 0)
