"""Recording what happens to a task: registration and every transition. Never commits."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.config import Settings
from service.errors import Conflict
from service.models import Task, TaskEvent
from service.tracking import repository


async def register_task(
    session: AsyncSession,
    *,
    task_id: str,
    kind: str,
    notify_hook: str | None,
    notify_format: str | None,
    metadata: dict[str, Any] | None,
    settings: Settings,
    now: datetime,
) -> tuple[Task, bool]:
    """Start tracking task_id; returns (task, created). Registering the same task again is idempotent."""
    created_pk = (
        await session.execute(
            pg_insert(Task)
            .values(
                task_id=task_id,
                kind=kind,
                status="submitted",
                notify_hook=notify_hook,
                notify_format=notify_format or "sunotrack",
                client_metadata=metadata,
                last_seq=1,
                created_at=now,
                updated_at=now,
                next_poll_at=now + timedelta(seconds=settings.poll_min_interval_s),
                poll_interval_s=settings.poll_min_interval_s,
            )
            .on_conflict_do_nothing(index_elements=[Task.task_id])
            .returning(Task.id)
        )
    ).scalar_one_or_none()

    if created_pk is not None:
        # The client just made this task: the registration event announces nothing, so no webhook.
        await session.execute(
            insert(TaskEvent).values(
                task_pk=created_pk,
                seq=1,
                at=now,
                type="transition",
                from_status=None,
                to_status="submitted",
                source="register",
            )
        )
        task = await repository.get_task(session, task_id)
        assert task is not None
        return task, True

    # A concurrent registration may still be committing: the row lock waits for it.
    existing = await repository.get_task(session, task_id, for_update=True)
    assert existing is not None
    if existing.kind != kind:
        raise Conflict(
            f"task_id {task_id!r} is already registered with kind {existing.kind!r}, not {kind!r}",
            extra={"task_id": task_id, "kind": existing.kind},
        )
    changed = False
    for attribute, value in (
        ("notify_hook", notify_hook),
        ("notify_format", notify_format),
        ("client_metadata", metadata),
    ):
        if value is not None and getattr(existing, attribute) != value:
            setattr(existing, attribute, value)
            changed = True
    if changed:
        existing.updated_at = now
        await session.flush()
    return existing, False
