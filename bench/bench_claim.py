"""The fair webhook claim against a deep backlog for one host, next to a bare one-host claim.

    uv run python bench/bench_claim.py [--backlog 100000] [--claims 300]

A fresh database (DATABASE_URL's server, else an embedded PostgreSQL) gets `--backlog` due deliveries
to one host, then one new delivery to another host. Prints: whether that new delivery is in the first
claim (it must be: one claim round), the claim's EXPLAIN ANALYZE time, and the time per claim over
`--claims` claims of 8 rows from the backlog (as a host's free slots ask for them), next to a bare claim
of the same 8 rows (lock, lease, return) with no lanes, quotas or breaker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import fresh_database

from service.webhooks.repository import CLAIM_SESSION, Quotas, claim_due_deliveries

BACKLOG_HOOK = "http://backlog.example:8080/hook"
NEW_HOOK = "https://fresh.example/hook"
BARE = """
    UPDATE deliveries AS d SET next_attempt_at = now() + make_interval(secs => $2)
    WHERE d.ctid = ANY(ARRAY(
        SELECT ctid FROM deliveries WHERE client_key = 0 AND host = $3 AND next_attempt_at <= now()
        ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED))
    RETURNING d.id, d.task_pk, d.webhook_id, d.url, d.host, d.body, d.attempts, d.next_attempt_at
"""


async def seed(connection: asyncpg.Connection, backlog: int) -> None:
    await connection.execute(
        "INSERT INTO tasks (task_id, kind, status, next_poll_at)"
        " SELECT 'task-' || g, 'music', 'queued', 'infinity' FROM generate_series(1, $1::integer) AS g",
        backlog + 1,
    )
    # Bodies of a realistic size (a sunotrack body with two clips is about 1 KB).
    await connection.execute(
        """
        INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body, next_attempt_at)
        SELECT g, 2, 'msg_' || g, $1::text, convert_to(repeat('x', 1000), 'UTF8'),
               now() - interval '1 hour' + g * interval '10 ms'
        FROM generate_series(1, $2::integer) AS g
        """,
        BACKLOG_HOOK,
        backlog,
    )
    await connection.execute("VACUUM ANALYZE")
    await connection.execute(
        "INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body)"
        " VALUES ($1, 2, 'msg_new', $2, '{}')",
        backlog + 1,
        NEW_HOOK,
    )


async def explain_claim(connection: asyncpg.Connection) -> list[asyncpg.Record]:
    """EXPLAIN ANALYZE of the claim with the arguments claim_due_deliveries passes (taken from its call,
    so they cannot drift from the statement's)."""
    explained: list[asyncpg.Record] = []

    class Explaining:
        async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
            explained.extend(await connection.fetch("EXPLAIN (ANALYZE, BUFFERS) " + query, *args))
            return await connection.fetch(query, *args)

        async def execute(self, query: str, *args: object) -> str:
            return str(await connection.execute(query, *args))

    await claim_due_deliveries(
        Explaining(), limit=64, lease_s=3600, breaker_failures=20, probe_s=16, quotas=Quotas(8, 48)
    )
    return explained


async def timed(claim: object, claims: int) -> list[float]:
    took = []
    for _ in range(claims):
        started = time.perf_counter()
        await claim()  # type: ignore[operator]
        took.append((time.perf_counter() - started) * 1000)
    return took


async def run(args: argparse.Namespace) -> None:
    async with fresh_database() as url:
        connection = await asyncpg.connect(
            url.replace("+asyncpg", ""),
            server_settings={"jit": "off", "synchronous_commit": "off", **CLAIM_SESSION},
        )
        try:
            await seed(connection, args.backlog)
            load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
            print(f"backlog={args.backlog} to one host, 1 new delivery to another; load={load}")
            first = await claim_due_deliveries(
                connection, limit=64, lease_s=3600, breaker_failures=20, probe_s=16, quotas=Quotas(8, 48)
            )
            hosts = sorted({d.host for d in first.deliveries})
            print(f"first claim: {len(first.deliveries)} rows from {hosts}")
            plan = await explain_claim(connection)
            for row in plan:
                line = row[0]
                if line.startswith(("Planning Time", "Execution Time")):
                    print(f"EXPLAIN ANALYZE: {line}")
            backlog_host = first.deliveries[0].host if first.deliveries else ""

            async def fair() -> None:
                await claim_due_deliveries(
                    connection, limit=64, lease_s=3600, breaker_failures=20, probe_s=16, quotas=Quotas(8, 48)
                )

            async def bare() -> None:
                await connection.fetch(BARE, 8, 3600.0, backlog_host)

            fair_ms: list[float] = []
            bare_ms: list[float] = []
            # Taking turns, so both see the machine in the same mood.
            for _ in range(3):
                fair_ms += await timed(fair, args.claims // 3)
                bare_ms += await timed(bare, args.claims // 3)
            for name, values in (("fair claim of 8", fair_ms), ("bare claim of 8", bare_ms)):
                print(
                    f"{name}: median {statistics.median(values):.2f} ms, "
                    f"p90 {sorted(values)[int(0.9 * len(values))]:.2f} ms over {len(values)} claims"
                )
            print(f"fair / bare: {statistics.median(fair_ms) / statistics.median(bare_ms):.2f}")
        finally:
            await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--claims", type=int, default=300)
    asyncio.run(asyncio.wait_for(run(parser.parse_args()), 600))


if __name__ == "__main__":
    main()
