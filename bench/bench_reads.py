"""Reads at a million tasks: GET task, status-filtered lists, /stats and the order id lookup, through the
real server, each beside the same SQL over bare asyncpg in the same run.

    uv run python bench/bench_reads.py [--tasks 1000000] [--requests 500] [--keep NAME] [--explain]

Seeds (bench/seeding.py, COPY) 1,000,000 tasks over 30 days, eight clients and three kinds (1% live),
3,000,000 events, ~560,000 deliveries; starts `sunotrack serve --role api` as its own process (nothing
is polled or delivered) and times, from this process on loopback:
- GET /api/v1/tasks/{task_id} with each task's own client token, sequentially and from 16 concurrent
  clients (BENCH_SECONDS each, 5 by default);
- GET /api/v1/tasks?status=X for a live status (in_progress, 0.5%, all among the newest), a rare one
  (cancelled, 1.5%) and a common one (complete, 91%): the first page, and for the last two a keyset page
  90% of the way down, as the admin (every client), as the biggest client (30%) and a small one (3%);
- GET /api/v1/stats as the admin and as the biggest client (30% of the tasks);
- GET /api/v1/tasks?metadata.order_id=X (issue 12).
Targets (issue 14): GET task p99 <= 10 ms, list p99 <= 20 ms, /stats <= 100 ms (its p99 here); issue 12:
metadata lookup p99 < 20 ms. --keep NAME keeps the seeded database (and the embedded server's
directory) for the next run; --explain prints EXPLAIN ANALYZE of every /stats statement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import api_server, concurrent, fresh_database, install_uvloop, keep_name, summary, timed
from seeding import ADMIN_TOKEN, SEARCH_SQL, Plan, client_token, ensure_seeded, order_id

from service import stats
from service.api.schemas import encode_cursor
from service.db import create_engine

TIME_LIMIT_S = 1800
CONCURRENCY = 16
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
BIG_CLIENT = 1  # 30% of the tasks
SMALL_CLIENT = 8  # 3%
LISTS = (
    ("in_progress", False),
    ("cancelled", False),
    ("cancelled", True),
    ("complete", False),
    ("complete", True),
)
TARGETS = {"task": 10.0, "list": 20.0, "stats": 100.0, "search": 20.0}
TASK_SQL = "SELECT * FROM tasks WHERE task_id = $1 AND client_id IS NOT DISTINCT FROM $2"
CLIPS_SQL = "SELECT * FROM clips WHERE task_pk = ANY($1::bigint[]) ORDER BY task_pk, position"
TIMELINE_SQL = """
    SELECT to_status, sum(seconds)::float8 FROM (
        SELECT to_status, extract(epoch FROM coalesce(lead(at) OVER (ORDER BY seq),
                                                      CASE WHEN $2 THEN now() END) - at) AS seconds
        FROM task_events WHERE task_pk = $1 AND type = 'transition' AND clip_id IS NULL
    ) AS spans WHERE seconds IS NOT NULL GROUP BY to_status
"""


def list_sql(client: bool, keyset: bool) -> str:
    where = ["status = $1"]
    if client:
        where.append("client_id = $3")
    if keyset:
        where.append(f"id < ${4 if client else 3}")
    return f"SELECT * FROM tasks WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT $2"


async def stats_statements(url: str, client_id: int | None) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements GET /stats runs for this scope (None: the admin's, every client), as sent."""
    engine = create_engine(url, pool_size=1)
    sent: list[tuple[str, tuple[Any, ...]]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: Any) -> None:
        sent.append((statement, tuple(parameters or ())))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        async with AsyncSession(engine) as session:
            await stats.stats(session, client_id)
    finally:
        await engine.dispose()
    return [(sql, params) for sql, params in sent if sql.lstrip().upper().startswith(("SELECT", "WITH"))]


async def measure(url: str, count: int, requests: int, explain: bool) -> int:
    dsn = await ensure_seeded(url, count)
    plan = Plan(count)
    rng = random.Random(7)
    rows: dict[str, tuple[dict[str, float], dict[str, float] | None, float]] = {}
    notes: list[str] = []
    db = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=CONCURRENCY, max_size=CONCURRENCY)
    tokens = {None: ADMIN_TOKEN} | {n: client_token(n) for n in range(1, 9)}
    try:
        async with api_server(url, ADMIN_TOKEN) as (base, _server), aiohttp.ClientSession() as http:
            headers = {client: {"Authorization": f"Bearer {token}"} for client, token in tokens.items()}

            async def get_json(path: str, client: int | None, params: Any = None) -> Any:
                async with http.get(f"{base}{path}", headers=headers[client], params=params) as response:
                    body = await response.json()
                    assert response.status == 200, body
                    return body

            # GET task: a random task, read with its own client's token; bare: the route's statements.
            async def read_task() -> int:
                n = rng.randrange(count)
                await get_json(f"/api/v1/tasks/{plan.task_id(n)}", plan.client(n))
                return 1

            async def bare_task(db: asyncpg.Connection | asyncpg.Pool = db) -> int:
                n = rng.randrange(count)
                task = await db.fetchrow(TASK_SQL, plan.task_id(n), plan.client(n))
                assert task is not None
                await db.fetch(CLIPS_SQL, [task["id"]])
                await db.fetch(TIMELINE_SQL, task["id"], task["next_poll_at"] is not None)
                return 1

            async def bare_task_pooled() -> int:
                async with pool.acquire() as connection:
                    return await bare_task(connection)

            rows["GET /tasks/{id}, sequential"] = (
                summary(await timed(read_task, requests)),
                summary(await timed(bare_task, requests)),
                TARGETS["task"],
            )
            for name, call in (("app", read_task), ("bare", bare_task_pooled)):
                per_s, latencies = await concurrent(CONCURRENCY, SECONDS, call)
                figures = summary(latencies)
                notes.append(
                    f"GET /tasks/{{id}}, {CONCURRENCY} concurrent clients, {name}: {per_s:,.0f}/s,"
                    f" p50 {figures['p50']:.2f} ms, p99 {figures['p99']:.2f} ms"
                )

            # Status-filtered lists: first page and one 90% of the way down the list.
            for status, deep in LISTS:
                for client in (None, BIG_CLIENT, SMALL_CLIENT):
                    before = count // 10 if deep else None
                    params: dict[str, Any] = {"status": status}
                    if before is not None:
                        params["cursor"] = encode_cursor("t", before)
                    sql = list_sql(client is not None, deep)
                    args: list[Any] = [status, 51]
                    if client is not None:
                        args.append(client)
                    if before is not None:
                        args.append(before)

                    async def listed(params: dict[str, Any] = params, client: int | None = client) -> None:
                        await get_json("/api/v1/tasks", client, params)

                    async def bare_list(sql: str = sql, args: list[Any] = args) -> None:
                        await db.fetch(sql, *args)

                    who = "admin" if client is None else f"client-{client}"
                    label = f"GET /tasks?status={status}, {who}, {'deep page' if deep else 'page 1'}"
                    rows[label] = (
                        summary(await timed(listed, requests // 2)),
                        summary(await timed(bare_list, requests // 2)),
                        TARGETS["list"],
                    )

            # /stats: the app's route, and the statements it sends (recorded from service.stats) replayed.
            for client in (None, BIG_CLIENT):
                statements = await stats_statements(url, client)

                async def read_stats(client: int | None = client) -> None:
                    await get_json("/api/v1/stats", client)

                async def bare_stats(statements: list[tuple[str, tuple[Any, ...]]] = statements) -> None:
                    for sql, sql_args in statements:
                        await db.fetch(sql, *sql_args)

                who = "admin" if client is None else f"client-{client}"
                rows[f"GET /stats, {who}"] = (
                    summary(await timed(read_stats, max(20, requests // 10))),
                    summary(await timed(bare_stats, max(20, requests // 10))),
                    TARGETS["stats"],
                )
                if explain:
                    print(f"\n/stats statements, {who}:")
                    for sql, sql_args in statements:
                        plan_rows = await db.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *sql_args)
                        print("  ", " ".join(sql.split())[:160])
                        for line in plan_rows:
                            print("      ", line[0])

            # Issue 12: the order id lookup.
            async def by_order() -> None:
                n = rng.randrange(count)
                body = await get_json("/api/v1/tasks", None, {"metadata.order_id": order_id(n)})
                assert len(body["items"]) == 1, body

            async def bare_order() -> None:
                found = await db.fetch(
                    SEARCH_SQL, json.dumps({"order_id": order_id(rng.randrange(count))}), 51
                )
                assert len(found) == 1

            rows["GET /tasks?metadata.order_id=X, admin"] = (
                summary(await timed(by_order, requests)),
                summary(await timed(bare_order, requests)),
                TARGETS["search"],
            )
    finally:
        await pool.close()
        await db.close()
    return report(count, requests, rows, notes)


def report(
    count: int,
    requests: int,
    rows: dict[str, tuple[dict[str, float], dict[str, float] | None, float]],
    notes: list[str],
) -> int:
    with open("/proc/loadavg") as loadavg:
        load_now = loadavg.read().split()[0]
    print(f"\n{count:,} tasks; sequential requests on loopback ({requests:,} for GET task and the lookup,")
    print(f"{requests // 2:,} per list, {max(20, requests // 10)} per /stats); ms; load average {load_now}")
    print(f"{'':52} {'p50':>7} {'p95':>7} {'p99':>7} | {'bare p50':>8} {'p99':>7} | {'target p99':>10}")
    missed = 0
    for name, (app, bare, target) in rows.items():
        ok = app["p99"] <= target
        missed += not ok
        line = f"{name:52} " + " ".join(f"{app[k]:7.2f}" for k in ("p50", "p95", "p99"))
        if bare is not None:
            line += f" | {bare['p50']:8.2f} {bare['p99']:7.2f}"
        print(f"{line} | {target:>7.0f} {'ok' if ok else 'MISSED'}")
    for note in notes:
        print(note)
    print("all targets met" if not missed else f"{missed} target(s) missed")
    return 1 if missed else 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--keep", type=keep_name, help="keep the seeded database under this name, reuse it")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of /stats' statements")
    args = parser.parse_args()
    async with fresh_database(args.keep) as url:
        return await asyncio.wait_for(measure(url, args.tasks, args.requests, args.explain), TIME_LIMIT_S)


if __name__ == "__main__":
    print(f"loop: {install_uvloop()}")
    raise SystemExit(asyncio.run(main()))
