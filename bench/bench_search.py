"""Search benchmark: GET /api/v1/tasks?metadata.order_id=X on 1,000,000 tasks, through the real server.

    uv run python bench/bench_search.py [--tasks 1000000] [--requests 1000] [--keep NAME]

Seeds the tasks with COPY (bench/seeding.py; metadata {"order_id", "shop", "customer"}), starts
`sunotrack serve --role api` as its own process (nothing is polled), and times sequential lookups of
random order ids from one client on 127.0.0.1. Baselines in the same run: the same lookup as bare SQL
over asyncpg, and GET /api/v1/tasks/{task_id} (a unique-index lookup through the same stack).
Target: p99 < 20 ms.
Uses DATABASE_URL when set (a fresh database on that server, dropped afterwards), else an embedded
PostgreSQL in a temporary directory; with --keep, the database (and the embedded server's directory)
stays for the next run, which reuses the seeded tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import api_server, fresh_database, install_uvloop, keep_name, summary, timed
from seeding import ADMIN_TOKEN, SEARCH_SQL, admins_task, ensure_seeded, order_id

TOKEN = ADMIN_TOKEN
TARGET_P99_MS = 20.0
TIME_LIMIT_S = 900


async def measure(url: str, count: int, requests: int) -> int:
    dsn = await ensure_seeded(url, count, history=False)
    rng = random.Random(7)
    db = await asyncpg.connect(dsn)
    try:
        async with (
            api_server(url, TOKEN) as (base, _server),
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        ):

            async def by_metadata() -> None:
                order = order_id(rng.randrange(count))
                async with http.get(f"{base}/api/v1/tasks", params={"metadata.order_id": order}) as response:
                    body = await response.json()
                    assert response.status == 200, body
                    assert len(body["items"]) == 1, body

            async def by_task_id() -> None:
                task_id = f"task-{admins_task(rng, count):07d}"
                async with http.get(f"{base}/api/v1/tasks/{task_id}") as response:
                    await response.read()
                    assert response.status == 200

            async def bare_sql() -> None:
                found = await db.fetch(
                    SEARCH_SQL, json.dumps({"order_id": order_id(rng.randrange(count))}), 51
                )
                assert len(found) == 1

            plan = await db.fetch(
                "EXPLAIN (ANALYZE, COSTS OFF) " + SEARCH_SQL, json.dumps({"order_id": order_id(42)}), 51
            )
            print("plan of the lookup:")
            for line in plan:
                print("   ", line[0])
            results = {
                "GET /tasks?metadata.order_id=X": summary(await timed(by_metadata, requests)),
                "bare SQL, same lookup (asyncpg)": summary(await timed(bare_sql, requests)),
                "GET /tasks/{task_id} (unique index)": summary(await timed(by_task_id, requests)),
            }
    finally:
        await db.close()
    print(f"\n{count:,} tasks, {requests:,} sequential requests each, one client on loopback (ms)")
    print(f"{'':38} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}")
    for name, figures in results.items():
        print(f"{name:38} " + " ".join(f"{figures[k]:7.2f}" for k in ("p50", "p95", "p99", "max")))
    p99 = results["GET /tasks?metadata.order_id=X"]["p99"]
    ok = p99 < TARGET_P99_MS
    bare = results["bare SQL, same lookup (asyncpg)"]["p99"]
    print(
        f"\nmetadata lookup p99 {p99:.2f} ms (bare SQL {bare:.2f} ms): target < {TARGET_P99_MS:.0f} ms:",
        end=" ",
    )
    print("met" if ok else "NOT MET")
    return 0 if ok else 1


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--keep", type=keep_name, help="keep the seeded database under this name, reuse it")
    args = parser.parse_args()
    async with fresh_database(args.keep) as url:
        return await asyncio.wait_for(measure(url, args.tasks, args.requests), TIME_LIMIT_S)


if __name__ == "__main__":
    print(f"loop: {install_uvloop()}")
    raise SystemExit(asyncio.run(main()))
