"""Postgres time of the poller's claim (service.tracking.repository._CLAIM): one page of 800 due tasks
out of 20,000 live ones (and 100,000 finished), when no relay task is tracked by two clients and when
one in ten is, next to the claim as it was before clients and named relays (the baseline).

    uv run python bench/bench_poll_claim.py [--rounds 60]

Each claim runs in a transaction that is rolled back, so every round claims the same page; the
statements take turns, and the medians of their rounds are printed. Uses DATABASE_URL when set (a
fresh database on that server), else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import fresh_database

from service.db import create_engine
from service.models import LIVE
from service.tracking.repository import _CLAIM
from service.vocabulary import DEFAULT_RELAY

PAGE = 800
# The claim as it was before clients and named relays (one relay, one record per relay task): the same
# page locked and scheduled the same way, without the relay filter and the other clients' records.
BARE = text(
    f"""
    WITH due AS MATERIALIZED (
        SELECT ctid, id, next_poll_at, poll_interval_s
        FROM tasks
        WHERE {LIVE} AND id > 0 AND next_poll_at <= now()
        ORDER BY id
        LIMIT {PAGE}
        FOR UPDATE SKIP LOCKED
    ),
    claimed AS (
        UPDATE tasks AS t SET
            poll_interval_s = least(60, coalesce(nullif(t.poll_interval_s, 0), 3) * 1.5),
            next_poll_at = least(
                now() + make_interval(
                    secs => least(60, coalesce(nullif(t.poll_interval_s, 0), 3) * 1.5)
                        * (0.9 + 0.2 * random())
                ),
                greatest(t.created_at + make_interval(secs => 3600), now())
            ),
            last_polled_at = now(),
            poll_count = t.poll_count + 1
        WHERE t.ctid = ANY(ARRAY(SELECT ctid FROM due))
        RETURNING t.id, t.task_id, t.kind, t.last_error, t.snapshot_digest,
                  t.last_error IS NULL AND t.consecutive_errors = 0 AND t.missing_count = 0
                      AND now() < t.created_at + make_interval(secs => 3600) AS quiet
    )
    SELECT extract(epoch FROM now())::float8 AS now_epoch,
           greatest(0, extract(epoch FROM now() - due.next_poll_at))::float8 AS lag_s,
           claimed.*, due.poll_interval_s
    FROM (VALUES (1)) AS one LEFT JOIN (claimed JOIN due USING (id)) ON true
    """
)


async def seed(connection: AsyncConnection, *, shared_every: int) -> None:
    await connection.execute(text("TRUNCATE tasks, clients CASCADE"))
    await connection.execute(
        text(
            "INSERT INTO clients (name, token_sha256, webhook_secret, relay) "
            "VALUES ('a', 'a', 'whsec_a', 'default'), ('b', 'b', 'whsec_b', 'default')"
        )
    )
    await connection.execute(
        text(
            "INSERT INTO tasks (task_id, client_id, kind, status, last_seq, next_poll_at, poll_interval_s, "
            "shared) SELECT 'live-' || g, (SELECT id FROM clients WHERE name = 'a'), 'music', 'in_progress', "
            "1, now(), 3, :every > 0 AND g % :every = 0 FROM generate_series(1, 20000) AS g"
        ),
        {"every": shared_every},
    )
    # The other client's records of the shared ones: due in an hour, claimed as siblings.
    await connection.execute(
        text(
            "INSERT INTO tasks (task_id, client_id, kind, status, last_seq, next_poll_at, shared) "
            "SELECT task_id, (SELECT id FROM clients WHERE name = 'b'), 'music', 'in_progress', 1, "
            "now() + interval '1 hour', true FROM tasks WHERE shared"
        )
    )
    await connection.execute(
        text(
            "INSERT INTO tasks (task_id, kind, status, last_seq) "
            "SELECT 'done-' || g, 'music', 'complete', 1 FROM generate_series(1, 100000) AS g"
        )
    )
    await connection.commit()
    await connection.execute(text("ANALYZE tasks"))
    await connection.commit()


# The claim's parameters as claim_due_tasks passes them.
PARAMETERS = {
    "relay": DEFAULT_RELAY, "after": 0, "limit": PAGE, "min_s": 3.0, "max_s": 60.0, "factor": 1.5,
    "jitter": 0.1, "deadline_s": 3600.0,
}  # fmt: skip


async def timed(connection: AsyncConnection, claim: TextClause) -> tuple[float, int]:
    """The statement's round trip, its rows fetched (read alike for both: the driver's rows)."""
    started = time.perf_counter()
    claimed = len((await connection.execute(claim, PARAMETERS if claim is _CLAIM else {})).all())
    elapsed = time.perf_counter() - started
    await connection.rollback()
    return elapsed, claimed


async def main(rounds: int) -> None:
    async with fresh_database() as url:
        engine = create_engine(url, pool_size=1)
        async with engine.connect() as connection:
            print(f"claim of a page of {PAGE} due tasks (20,000 live, 100,000 finished), median of {rounds}:")
            for shared_every, label in ((0, "no shared relay task"), (10, "1 in 10 shared")):
                await seed(connection, shared_every=shared_every)
                times: dict[str, list[float]] = {"before": [], "claim": []}
                rows: dict[str, int] = {}
                for _ in range(rounds):
                    for name, claim in (("before", BARE), ("claim", _CLAIM)):
                        elapsed, rows[name] = await timed(connection, claim)
                        times[name].append(elapsed)
                before, claim = (statistics.median(times[name]) * 1000 for name in ("before", "claim"))
                print(
                    f"  {label:22} before {before:6.2f} ms ({rows['before']} rows)   "
                    f"claim {claim:6.2f} ms ({rows['claim']} rows with the siblings)   "
                    f"ratio {claim / before:.2f}",
                    flush=True,
                )
        await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    asyncio.run(main(parser.parse_args().rounds))
