"""GET /tasks/{id}'s statement on a new database filled in seconds (docs/design.md, "Read figures"):
before the first ANALYZE its plan must still read one task's rows, not every task's. Autovacuum is off
on the tables, so the window lasts the whole test."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect

from service.api.schemas import TASK_VIEW_COLUMNS
from service.config import Settings
from service.tracking import repository
from service.tracking.repository import UnchangedSchedule
from service.tracking.service import Registration, register_new
from service.vocabulary import DEFAULT_RELAY
from tests.conftest import _driver_url

TASKS = 3000
BATCH = 500
CLAIMED = 50


def event_rows_read(node: dict[str, Any]) -> int:
    """Rows of task_events the plan's scans read, kept or filtered out, over every loop."""
    read = 0
    if node.get("Relation Name") == "task_events":
        kept = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
        read += int(kept * node["Actual Loops"])
    return read + sum(event_rows_read(child) for child in node.get("Plans", []))


@pytest.mark.parametrize("prepared", ["while empty", "after the fill"])
async def test_a_get_reads_one_task_before_the_first_analyze(
    database_url: str, make_settings: Callable[..., Settings], prepared: str
) -> None:
    """`while empty`: the plan cached by a connection that served GETs before the fill (Postgres keeps a
    generic plan after five runs); `after the fill`: the generic plan made then, with no statistics."""
    settings = make_settings()
    statement = repository.task_view_statement(TASK_VIEW_COLUMNS)
    connection = await asyncpg.connect(_driver_url(database_url))
    try:
        for table in ("tasks", "task_events", "clips", "clients"):
            await connection.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        await connection.execute(f"PREPARE read_task(text, bigint) AS {statement}")
        if prepared == "while empty":
            for _ in range(10):
                await connection.execute("EXECUTE read_task('none', NULL)")
        for at in range(0, TASKS, BATCH):
            registrations = [Registration(f"t{n}", "music") for n in range(at, at + BATCH)]
            await register_new(connection.fetch, registrations, settings=settings)
        if prepared == "after the fill":
            await connection.execute("SET plan_cache_mode = force_generic_plan")
        plan = await connection.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE read_task('t1234', NULL)"
        )
        assert await connection.fetchval("SELECT count(*) FROM pg_stats WHERE tablename = 'task_events'") == 0
    finally:
        await connection.close()
    # The task's one event (its registration), not the 3,000 tasks' (the partial index of transitions).
    assert event_rows_read(json.loads(plan)[0]["Plan"]) == 1


def siblings_rows_read(node: dict[str, Any], within: bool = False) -> int:
    """Rows of tasks, or entries of its indexes, that the claim's lookup of shared tasks' other records
    (its `siblings` CTE) read, kept or filtered out, over every loop."""
    within = within or node.get("Subplan Name") == "CTE siblings"
    read = 0
    if within and (node.get("Relation Name") == "tasks" or "_tasks_" in node.get("Index Name", "")):
        kept = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
        read += int(kept * node["Actual Loops"])
    return read + sum(siblings_rows_read(child, within) for child in node.get("Plans", []))


async def test_a_claim_looks_up_the_shared_tasks_other_records_by_task_id_alone(
    database_url: str, make_settings: Callable[..., Settings]
) -> None:
    """The poller's claim as its prepared statement runs it after five (the generic plan), before the
    first ANALYZE, over 3,000 due live tasks, one in ten shared: the shared ones' other records are
    found through the task id index alone. Tested for liveness as `ix_tasks_live`'s predicate, the lookup
    ANDed that index's every entry into it, a read that grows with the backlog (docs/design.md, "The
    poller's claim")."""
    settings = make_settings()
    # The statement as the driver gets it from SQLAlchemy: numbered parameters, in this order.
    claim = repository._CLAIM.compile(dialect=asyncpg_dialect())
    schedule = UnchangedSchedule(min_s=1.0, max_s=60.0, factor=1.5, jitter=0.1, deadline_s=3600.0)
    values = repository.claim_parameters(relay=DEFAULT_RELAY, after=0, limit=CLAIMED, schedule=schedule)
    connection = await asyncpg.connect(_driver_url(database_url))
    try:
        await connection.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")
        for at in range(0, TASKS, BATCH):
            registrations = [Registration(f"t{n}", "music") for n in range(at, at + BATCH)]
            await register_new(connection.fetch, registrations, settings=settings)
        await connection.execute("UPDATE tasks SET shared = true WHERE id % 10 = 0")
        await connection.execute("SET plan_cache_mode = force_generic_plan")
        plan = await connection.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {claim.string}",
            *(values[name] for name in claim.positiontup or ()),
        )
    finally:
        await connection.close()
    # The 5 shared ones among the 50 claimed: their index entries and rows, about 10.
    assert siblings_rows_read(json.loads(plan)[0]["Plan"]) <= CLAIMED
