"""What one registration statement costs Postgres, A/B: two databases migrated to the head, B changed by
the SQL statements of a file (one per `;` at a line's end), each seeded with the same tasks, measured in
alternating turns. A turn runs the registration statement (`tracking.service._REGISTER_ONE`, or the
batch's `_REGISTER` with BATCH > 0 tasks a call, in a transaction) CALLS times over CONNS asyncpg
connections, and prints the CPU its backends used per task (from /proc: whatever the box's load, the
figure that moves least), and the rate; at the end the medians, each turn's B over its A (quartiles)
and whether each side's kept counts still match its tasks.

    uv run python bench/bench_registration_sql.py CHANGES.sql [turns]

Env: CONNS (16), CALLS (3,000), BATCH (0: single registrations), SEED (60,000 tasks), ADMIN_B=1 (B
registers as the admin, A as a client: CHANGES.sql may then be `SELECT 1`), STATEMENT_A / STATEMENT_B (a
file whose text that side runs instead of the service's statement, with the same parameters: a changed
statement against the service's, each with its schema). Uses DATABASE_URL's server when set, else
embedded PostgreSQL (bench.harness.fresh_database).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import fresh_database, install_uvloop
from service.tracking.service import _REGISTER, _REGISTER_ONE

SEED = int(os.environ.get("SEED", "60000"))
CALLS = int(os.environ.get("CALLS", "3000"))
CONNS = int(os.environ.get("CONNS", "16"))
BATCH = int(os.environ.get("BATCH", "0"))
ADMIN_B = bool(os.environ.get("ADMIN_B"))
STATEMENTS = {
    side: Path(os.environ[f"STATEMENT_{side}"]).read_text() if os.environ.get(f"STATEMENT_{side}") else None
    for side in ("A", "B")
}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def prepare(url: str, changes: list[str]) -> str:
    dsn = url.replace("+asyncpg", "")
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "INSERT INTO clients (name, token_sha256, webhook_secret, relay) "
            "VALUES ('bench', 'x', 'x', 'default')"
        )
        await connection.execute(
            "INSERT INTO tasks (task_id, client_id, kind, status, last_seq, next_poll_at) "
            "SELECT 'seed-' || g, (SELECT id FROM clients), 'music', 'submitted', 1, "
            "now() + interval '1 day' FROM generate_series(1, $1) g",
            SEED,
        )
        for statement in changes:
            await connection.execute(statement)
        await connection.execute("VACUUM ANALYZE tasks")
    finally:
        await connection.close()
    return dsn


async def turn(dsn: str, side: str) -> tuple[float, float]:
    connections = [await asyncpg.connect(dsn) for _ in range(CONNS)]
    client_id = None if side == "B" and ADMIN_B else await connections[0].fetchval("SELECT id FROM clients")
    pids = [await connection.fetchval("SELECT pg_backend_pid()") for connection in connections]
    size = max(BATCH, 1)
    run = time.time_ns()
    statement = STATEMENTS[side] or (_REGISTER if BATCH else _REGISTER_ONE)

    async def register(connection: asyncpg.Connection, n: int) -> None:
        ids = [f"r-{side}-{run}-{n}-{i}" for i in range(size)]
        if BATCH:
            async with connection.transaction():
                nulls = [None] * size
                await connection.fetch(
                    statement, ids, ["music"] * size, ["default"] * size, nulls, nulls, nulls, client_id, 5.0
                )
        else:
            await connection.fetch(statement, ids[0], "music", "default", None, None, None, client_id, 5.0)

    for k, connection in enumerate(connections):  # each connection's plan cached before the clock starts
        for n in range(6):
            await register(connection, -(k * 10 + n + 1))
    calls = iter(range(CALLS))

    async def work(connection: asyncpg.Connection) -> None:
        for n in calls:
            await register(connection, n)

    before, began = sum(cpu_s(pid) for pid in pids), time.monotonic()
    await asyncio.gather(*(work(connection) for connection in connections))
    elapsed, used = time.monotonic() - began, sum(cpu_s(pid) for pid in pids) - before
    for connection in connections:
        await connection.close()
    return used / (CALLS * size) * 1e6, CALLS * size / elapsed


async def bench(changes: list[str], turns: int) -> None:
    async with fresh_database() as url_a, fresh_database() as url_b:
        dsns = {"A": await prepare(url_a, []), "B": await prepare(url_b, changes)}
        figures: dict[str, list[float]] = {"A": [], "B": []}
        for n in range(turns):
            for side in ("A", "B") if n % 2 == 0 else ("B", "A"):
                us, rate = await turn(dsns[side], side)
                figures[side].append(us)
                print(
                    f"{side} turn {n}: {us:,.0f} µs of Postgres CPU a task, {rate:,.0f} tasks/s, "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        a, b = statistics.median(figures["A"]), statistics.median(figures["B"])
        print(f"median: A {a:,.0f} µs, B {b:,.0f} µs (B/A {b / a:.2f})")
        # Each turn's B over its A, measured back to back: the box's load moves both alike.
        paired = sorted(b / a for a, b in zip(figures["A"], figures["B"], strict=True))
        if len(paired) >= 4:
            low, mid, high = statistics.quantiles(paired, n=4)
            print(f"B/A turn by turn: quartiles {low:.2f} / {mid:.2f} / {high:.2f}, B cheaper in ", end="")
            print(f"{sum(ratio < 1 for ratio in paired)} of {len(paired)}")
        for side, dsn in dsns.items():
            print(f"{side}: {await counted(dsn)}")


async def counted(dsn: str) -> str:
    """Whether the side's kept counts still match its tasks (a changed statement must keep them exact)."""
    connection = await asyncpg.connect(dsn)
    try:
        tasks = await connection.fetchval("SELECT count(*) FROM tasks")
        kept = await connection.fetchval("SELECT coalesce(sum(n), 0)::bigint FROM task_counts")
    finally:
        await connection.close()
    return f"{tasks:,} tasks, {kept:,} counted" + ("" if tasks == kept else " (COUNTS DIFFER)")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    text = Path(sys.argv[1]).read_text()
    changes = [part.strip() for part in text.split(";\n") if part.strip()]
    install_uvloop()
    asyncio.run(bench(changes, int(sys.argv[2]) if len(sys.argv) > 2 else 4))


if __name__ == "__main__":
    main()
