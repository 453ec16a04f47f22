"""Read-only figures over tasks, events and deliveries for GET /stats and the dashboard's charts.

The chart series take `scope`, a condition on tasks: whose tasks the caller may see.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Float, Subquery, TextClause, cast, func, select, text, true
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped

from service.models import (
    LIVE,
    TASK_TRANSITION,
    Delivery,
    DeliveryAttempt,
    DeliveryCount,
    Task,
    TaskCount,
    TaskEvent,
)
from service.tracking.repository import owned_by
from service.vocabulary import DeliveryStatus, TaskKind, TaskStatus

FINISHED = (TaskStatus.COMPLETE, TaskStatus.FAILED, TaskStatus.TIMED_OUT)
UNSETTLED = tuple(status for status in DeliveryStatus if status != DeliveryStatus.DELIVERED)
_HOUR = text("now() - interval '1 hour'")
_DAY = text("now() - interval '1 day'")


def _seconds(interval: Any) -> Any:
    return cast(func.extract("epoch", interval), Float)


def _zeros(keys: Any) -> dict[str, int]:
    return {str(key): 0 for key in keys}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def _percentiles(
    session: AsyncSession,
    value: Any,
    fractions: tuple[float, float],
    *where: ColumnElement[bool] | TextClause,
) -> tuple[float | None, float | None]:
    found = await session.scalar(
        select(func.percentile_cont(array(fractions)).within_group(value)).where(*where)
    )
    return (None, None) if found is None else (found[0], found[1])


# The counts tables' rows of backends gone (shard: the pid that wrote them), folded into shard 0 so that
# they stay a few rows per client. SKIP LOCKED: never waits on, nor deadlocks with, a writer or a fold.
_FOLD = """
    WITH gone AS (
        DELETE FROM {table} WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {table} AS c
            WHERE shard <> 0 AND NOT EXISTS (SELECT FROM pg_stat_activity AS a WHERE a.pid = c.shard)
            FOR UPDATE SKIP LOCKED))
        RETURNING {key}, n
    )
    INSERT INTO {table} AS c ({key}, shard, n)
    SELECT {key}, 0, sum(n) FROM gone GROUP BY {key} ORDER BY {key}
    ON CONFLICT ({key}, shard) DO UPDATE SET n = c.n + excluded.n
"""
FOLDS = [
    text(_FOLD.format(table="task_counts", key="client_key, status, kind")),
    text(_FOLD.format(table="delivery_counts", key="client_key")),
]


async def fold_counts(session: AsyncSession) -> None:
    for fold in FOLDS:
        await session.execute(fold)


def _keyed(column: Mapped[int], client_key: int | None) -> ColumnElement[bool]:
    """Rows of one client key (a counts or deliveries table's client_key column), or all (None)."""
    return true() if client_key is None else column == client_key


async def stats(session: AsyncSession, client_key: int | None) -> dict[str, Any]:
    """The GET /stats document (README, "Stats") of one client's tasks (client_key: its id, 0 for the
    admin's own), or of every client's (None). Counts come from the counts tables (a few rows per
    client), the windows from indexes: nothing here reads a row per task it counts, but the live ones."""
    await fold_counts(session)
    scope = true() if client_key is None else owned_by(client_key or None)
    counted = await session.execute(
        select(TaskCount.status, TaskCount.kind, func.sum(TaskCount.n))
        .where(_keyed(TaskCount.client_key, client_key))
        .group_by(TaskCount.status, TaskCount.kind)
    )
    by_status, by_kind = _zeros(TaskStatus), _zeros(TaskKind)
    for status, kind, n in counted:
        by_status[status] += int(n)
        by_kind[kind] += int(n)
    of_scope = _keyed(Delivery.client_key, client_key)
    # The few not delivered from ix_deliveries_unsettled; delivered: the rest of the kept total.
    deliveries = _zeros(DeliveryStatus)
    for status, n in await session.execute(
        select(Delivery.status, func.count())
        .where(Delivery.status.in_(UNSETTLED), of_scope)
        .group_by(Delivery.status)
    ):
        deliveries[status] = int(n)
    total = await session.scalar(
        select(func.coalesce(func.sum(DeliveryCount.n), 0)).where(
            _keyed(DeliveryCount.client_key, client_key)
        )
    )
    deliveries[DeliveryStatus.DELIVERED] = int(total or 0) - sum(deliveries.values())
    finished = _zeros(FINISHED)
    for status, n in await session.execute(
        select(Task.status, func.count())
        .where(scope, Task.finished_at > _HOUR, Task.status.in_(FINISHED))
        .group_by(Task.status)
    ):
        finished[status] = int(n)
    # One ordered set per figure, both fractions from it (two percentile_cont calls sort twice).
    ttc = _seconds(Task.finished_at - Task.created_at)
    p50, p95 = await _percentiles(
        session, ttc, (0.5, 0.95), scope, Task.status == TaskStatus.COMPLETE, Task.finished_at > _DAY
    )
    lag = func.greatest(0, _seconds(func.now() - Task.next_poll_at))
    lag50, lag99 = await _percentiles(session, lag, (0.5, 0.99), scope, text(LIVE))
    attempts = (
        await session.execute(
            select(
                func.count().label("tried"),
                func.count().filter(DeliveryAttempt.status_code.between(200, 299)).label("answered"),
            )
            .select_from(DeliveryAttempt)
            .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
            .where(DeliveryAttempt.at > _HOUR, of_scope)
        )
    ).one()
    oldest_pending = await session.scalar(
        select(func.min(Delivery.created_at)).where(Delivery.status == DeliveryStatus.PENDING, of_scope)
    )
    return {
        "tasks": {"by_status": by_status, "by_kind": by_kind},
        "finished_last_hour": finished,
        "time_to_complete_s": {"p50": _round(p50), "p95": _round(p95)},
        "deliveries": {
            "by_status": deliveries,
            "success_rate_last_hour": _round(attempts.answered / attempts.tried) if attempts.tried else None,
            "oldest_pending_at": oldest_pending,
        },
        "poll_lag_s": {"p50": _round(lag50), "p99": _round(lag99)},
    }


def _slots(unit: str, count: int) -> tuple[ColumnElement[Any], Subquery]:
    """The start of the last `count` whole `unit`s (minute, hour; the current one last), and those units'
    starts as a subquery (`at`): a chart series outer-joins its counts to it so that empty ones show 0."""
    current = func.date_trunc(unit, func.now())
    since = current - text(f"interval '{count - 1} {unit}s'")
    slots = select(func.generate_series(since, current, text(f"interval '1 {unit}'")).label("at"))
    return since, slots.subquery()


async def transitions_per_minute(
    session: AsyncSession, scope: ColumnElement[bool]
) -> list[tuple[datetime, int]]:
    """Task-level transitions in each of the last 60 minutes (the current one last), zeros included."""
    since, slots = _slots("minute", 60)
    minute = func.date_trunc("minute", TaskEvent.at).label("minute")
    counted = (
        select(minute, func.count().label("n"))
        .join(Task, Task.id == TaskEvent.task_pk)
        .where(text(TASK_TRANSITION))  # as written, so that ix_task_events_transitions_at serves it
        .where(TaskEvent.at > since, scope)
        .group_by(minute)
        .subquery()
    )
    rows = await session.execute(
        select(slots.c.at, func.coalesce(counted.c.n, 0))
        .select_from(slots.outerjoin(counted, counted.c.minute == slots.c.at))
        .order_by(slots.c.at)
    )
    return [(at, int(n)) for at, n in rows]


async def time_to_complete_by_hour(
    session: AsyncSession, scope: ColumnElement[bool]
) -> list[tuple[datetime, int, float | None, float | None]]:
    """Per hour of the last 24 (the current one last): tasks completed, and their p50/p95 seconds from
    registration to complete."""
    since, slots = _slots("hour", 24)
    hour = func.date_trunc("hour", Task.finished_at).label("hour")
    ttc = _seconds(Task.finished_at - Task.created_at)
    counted = (
        select(
            hour,
            func.count().label("n"),
            func.percentile_cont(0.5).within_group(ttc).label("p50"),
            func.percentile_cont(0.95).within_group(ttc).label("p95"),
        )
        .where(scope, Task.status == TaskStatus.COMPLETE, Task.finished_at >= since)
        .group_by(hour)
        .subquery()
    )
    rows = await session.execute(
        select(slots.c.at, func.coalesce(counted.c.n, 0), counted.c.p50, counted.c.p95)
        .select_from(slots.outerjoin(counted, counted.c.hour == slots.c.at))
        .order_by(slots.c.at)
    )
    return [(at, int(n), _round(p50), _round(p95)) for at, n, p50, p95 in rows]
