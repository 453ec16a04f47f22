"""Figures for operators: GET /stats and the dashboard's chart series."""

from __future__ import annotations

from datetime import datetime

import msgspec
from litestar import get

from service import stats
from service.api import DbSession, TaskOwner, task_scope


class TaskCounts(msgspec.Struct):
    by_status: dict[str, int]
    by_kind: dict[str, int]


class Finished(msgspec.Struct):
    complete: int
    failed: int
    timed_out: int


class P50P95(msgspec.Struct):
    p50: float | None
    p95: float | None


class DeliveryFigures(msgspec.Struct):
    by_status: dict[str, int]
    success_rate_last_hour: float | None
    oldest_pending_at: datetime | None


class P50P99(msgspec.Struct):
    p50: float | None
    p99: float | None


class StatsOut(msgspec.Struct):
    tasks: TaskCounts
    finished_last_hour: Finished
    time_to_complete_s: P50P95
    deliveries: DeliveryFigures
    poll_lag_s: P50P99


class MinuteCount(msgspec.Struct):
    at: datetime
    count: int


class HourTimes(msgspec.Struct):
    at: datetime
    count: int
    p50: float | None
    p95: float | None


class StatsSeries(msgspec.Struct):
    transitions_per_minute: list[MinuteCount]
    time_to_complete_s: list[HourTimes]


@get(
    "/api/v1/stats",
    summary="Tasks, finishes, completion times, deliveries and poll lag of the caller's tasks",
    description=(
        "time_to_complete_s: registration to complete, tasks completed in the last 24 h. "
        "success_rate_last_hour: the share of the last hour's webhook attempts answered 2xx (null: none). "
        "poll_lag_s: how overdue the live tasks' next polls are right now."
    ),
)
async def read_stats(session: DbSession, owner: TaskOwner) -> StatsOut:
    client_key = None if owner.every_client else (owner.client_id or 0)
    return msgspec.convert(await stats.stats(session, client_key), StatsOut)


@get(
    "/api/v1/stats/series",
    summary="Task transitions per minute (last hour) and time to complete per hour (24 h)",
)
async def read_series(session: DbSession, owner: TaskOwner) -> StatsSeries:
    scope = task_scope(owner)
    minutes = await stats.transitions_per_minute(session, scope)
    hours = await stats.time_to_complete_by_hour(session, scope)
    return StatsSeries(
        transitions_per_minute=[MinuteCount(at, count) for at, count in minutes],
        time_to_complete_s=[HourTimes(at, count, p50, p95) for at, count, p50, p95 in hours],
    )


STATS_ROUTES = [read_stats, read_series]
