"""GET /tasks/{id}'s statement on a new database filled in seconds (docs/design.md, "Read figures"):
before the first ANALYZE its plan must still read one task's rows, not every task's. Autovacuum is off
on the tables, so the window lasts the whole test."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from service.api.schemas import TASK_VIEW_COLUMNS
from service.config import Settings
from service.tracking import repository
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


def task_rows_read(node: dict[str, Any]) -> int:
    """Rows of tasks, or entries of its indexes, the plan's scans read, kept or filtered out, over every
    loop."""
    read = 0
    if node.get("Relation Name") == "tasks" or "_tasks_" in node.get("Index Name", ""):
        kept = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
        read += int(kept * node["Actual Loops"])
    return read + sum(task_rows_read(child) for child in node.get("Plans", []))


def numbered(sql: str) -> tuple[str, list[str]]:
    """SQLAlchemy's named parameters as the driver's numbered ones (`::` casts are not parameters), and
    the names in their order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return re.sub(r"(?<!:):(\w+)", number, sql), names


async def test_a_claim_reads_the_tasks_it_claims_not_every_live_one(
    database_url: str, make_settings: Callable[..., Settings]
) -> None:
    """The poller's claim as its prepared statement runs it after five (the generic plan), over 3,000 due
    live tasks, one in ten shared: it reads about the page it claims. The lookup of the shared ones'
    other records once read every live task's index entry, shared or not, whatever the backlog
    (docs/design.md, "The poller's claim")."""
    settings = make_settings()
    claim, names = numbered(repository._CLAIM.text)
    values = {
        "relay": DEFAULT_RELAY,
        "after": 0,
        "limit": CLAIMED,
        "min_s": 1.0,
        "max_s": 60.0,
        "factor": 1.5,
        "jitter": 0.1,
        "deadline_s": 3600.0,
    }
    connection = await asyncpg.connect(_driver_url(database_url))
    try:
        await connection.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")
        for at in range(0, TASKS, BATCH):
            registrations = [Registration(f"t{n}", "music") for n in range(at, at + BATCH)]
            await register_new(connection.fetch, registrations, settings=settings)
        await connection.execute("UPDATE tasks SET shared = true WHERE id % 10 = 0")
        await connection.execute("ANALYZE tasks")
        await connection.execute("SET plan_cache_mode = force_generic_plan")
        plan = await connection.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {claim}", *(values[name] for name in names)
        )
    finally:
        await connection.close()
    # 50 due rows found, updated by their addresses and returned, the 5 shared ones' records looked up:
    # about 160 read. Every live task's index entry, as the lookup once did, would be 3,000 more.
    assert task_rows_read(json.loads(plan)[0]["Plan"]) <= 4 * CLAIMED
