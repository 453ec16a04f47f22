"""Queries over tasks, clips and events. Functions take the session first and never commit."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
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
