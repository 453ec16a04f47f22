"""The idle poller: what a tick costs Postgres while 1,000,000 live tasks wait and none is due, beside a
bare round trip (`SELECT 1`) on the same connection.

    uv run python bench/bench_idle.py [--tasks 1000000] [--keep NAME] [--rounds 5]

Seeds the live tasks with COPY (bench/seeding.py: next polls spread over an hour a day from now,
each task's registration numbered in the feed), then measures, in Postgres CPU time (/proc/<pid>/schedstat
of each of the server's processes: a parallel plan's workers too) and EXPLAIN ANALYZE execution time:
- the sweep: the claim an idle tick ran before the look-ahead (from the lowest id, nothing due);
- the watched claim: what a tick runs within a look-ahead (the tasks registered since: none);
- the look-ahead itself (min(next_poll_at) over the live tasks), run once per look-ahead, which
  reaches at most SUNOTRACK_POLL_MAX_INTERVAL_S (60 s: 120 ticks of 0.5 s);
and then the production Poller's drain, a minute of idle ticks (120, back to back) against ticks that
sweep every time, counting every Postgres process's CPU time (docs/design.md, "The idle poller").
Uses DATABASE_URL's server when set (it must run on this machine), else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import TextClause, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import fresh_database, install_uvloop
from seeding import seed_live, seeded

from service.config import Settings
from service.db import create_engine
from service.runtime import open_runtime
from service.tracking import repository
from service.tracking.jobs import Poller
from service.tracking.repository import UnchangedSchedule

TARGET_MS = 5.0
DAY_S = 86_400.0
TICKS_PER_LOOK_AHEAD = 120  # SUNOTRACK_POLL_MAX_INTERVAL_S / SUNOTRACK_POLL_TICK_S, the defaults


def cpu_ns(pid: int) -> int:
    """Time the process has spent on a CPU, in ns (the first field of schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def server_pids(postmaster: int) -> list[int]:
    """The postmaster and every process it started (backends, autovacuum, checkpointer...)."""
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            pids.append(int(stat.parent.name))
    return pids


def server_cpu_ns(postmaster: int) -> int:
    total = 0
    for pid in server_pids(postmaster):
        try:
            total += cpu_ns(pid)
        except OSError:
            continue  # ended meanwhile
    return total


async def postmaster_pid(db: AsyncConnection) -> int:
    directory = (await db.execute(text("SHOW data_directory"))).scalar_one()
    await db.commit()
    return int((Path(directory) / "postmaster.pid").read_text().split()[0])


async def cpu_ms(postmaster: int, call: Callable[[], Awaitable[object]], calls: int) -> float:
    """Postgres CPU ms per call of `call`, counted in every process of the server: a parallel plan's
    workers are processes of their own."""
    await call()  # warm: plans cached, pages read
    before = server_cpu_ns(postmaster)
    for _ in range(calls):
        await call()
    return (server_cpu_ns(postmaster) - before) / calls / 1e6


async def explain_ms(db: AsyncConnection, statement: TextClause, params: dict[str, Any]) -> float:
    """EXPLAIN ANALYZE's execution time, in a transaction rolled back (the claim writes nothing when
    nothing is due, but it is a data-modifying statement)."""
    async with db.begin():
        query = text(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement.text}")
        [plan] = (await db.execute(query, params)).scalar_one()  # json, decoded by the driver
        await db.rollback()
    return float(plan["Execution Time"])


def report(name: str, samples: list[float], bare: float | None, note: str) -> float:
    value = statistics.median(samples)
    ratio = "" if bare is None else f"  ({value / bare:,.0f}x the bare round trip)"
    print(f"  {name:<34} {value:10.3f} ms{ratio}  {note}", flush=True)
    return value


async def statements(args: argparse.Namespace, url: str) -> dict[str, float]:
    engine = create_engine(url, pool_size=2)
    schedule = UnchangedSchedule(min_s=3.0, max_s=60.0, factor=1.5, jitter=0.1, deadline_s=3600.0)
    try:
        async with engine.connect() as db:
            postmaster = await postmaster_pid(db)
            ahead = await repository.look_ahead(db, relay="default")
            await db.commit()
            assert ahead.due_in_s is not None, "no live task"
            assert ahead.due_in_s > 0, "a seeded task is due"
            mark = ahead.mark
            limit = 800

            async def sweep() -> None:
                async with db.begin():
                    claim = await repository.claim_due_tasks(db, after=0, limit=limit, schedule=schedule)
                    assert not claim.tasks

            async def watched() -> None:
                async with db.begin():
                    claim = await repository.claim_due_tasks(
                        db, after=0, limit=limit, schedule=schedule, since=mark
                    )
                    assert not claim.tasks

            async def looking() -> None:
                async with db.begin():
                    await repository.look_ahead(db, relay="default")

            async def bare() -> None:
                async with db.begin():
                    await db.execute(text("SELECT 1"))

            figures: dict[str, list[float]] = {name: [] for name in ("bare", "sweep", "watched", "look")}
            explained: dict[str, list[float]] = {name: [] for name in ("sweep", "watched", "look")}
            params = {
                "relay": "default",
                "after": 0,
                "limit": limit,
                "since": mark,
                **dataclasses.asdict(schedule),
            }
            for _ in range(args.rounds):
                # Taking turns: each round's figures share the machine's mood of the moment.
                figures["bare"].append(await cpu_ms(postmaster, bare, 2000))
                figures["sweep"].append(await cpu_ms(postmaster, sweep, 3))
                figures["watched"].append(await cpu_ms(postmaster, watched, 2000))
                figures["look"].append(await cpu_ms(postmaster, looking, 3))
                explained["sweep"].append(await explain_ms(db, repository._CLAIM, params))
                explained["watched"].append(await explain_ms(db, repository._CLAIM_WATCHED, params))
                explained["look"].append(await explain_ms(db, repository._LOOK_AHEAD, params))
    finally:
        await engine.dispose()

    print(f"Postgres CPU per statement (schedstat), median of {args.rounds} turns:", flush=True)
    bare_ms = report("bare round trip (SELECT 1)", figures["bare"], None, "")
    sweep_ms = report("sweep claim (before: every tick)", figures["sweep"], bare_ms, _each(figures["sweep"]))
    watched_ms = report("watched claim (now: a tick)", figures["watched"], bare_ms, _each(figures["watched"]))
    look_ms = report(
        "look-ahead (now: once per look-ahead)", figures["look"], bare_ms, _each(figures["look"])
    )
    print("EXPLAIN ANALYZE execution time, median:", flush=True)
    for name, label in (("sweep", "sweep claim"), ("watched", "watched claim"), ("look", "look-ahead")):
        report(label, explained[name], None, _each(explained[name]))
    amortised = watched_ms + look_ms / TICKS_PER_LOOK_AHEAD
    print(
        f"  a tick now, with its share of the look-ahead (1 in {TICKS_PER_LOOK_AHEAD}): {amortised:.3f} ms; "
        f"before: {sweep_ms:.1f} ms ({sweep_ms / amortised:,.0f}x)",
        flush=True,
    )
    return {"sweep": sweep_ms, "watched": watched_ms, "look": look_ms, "amortised": amortised}


class Sweeping(Poller):
    """The poller as it was: every tick sweeps the live tasks."""

    async def _since(self) -> int | None:
        return None


async def pollers(args: argparse.Namespace, settings: Settings) -> None:
    async with open_runtime(settings) as runtime:
        async with runtime.engine.connect() as db:
            postmaster = await postmaster_pid(db)
        relay = runtime.relay
        assert relay is not None
        print("The production Poller's drain, every Postgres process's CPU:", flush=True)
        for name, cls, ticks in (
            ("ticks now (a minute of them)", Poller, TICKS_PER_LOOK_AHEAD),
            ("ticks before (sweeping)", Sweeping, 5),
        ):
            poller = cls(settings, runtime.engine, relay)
            await poller.drain()  # connections opened, and the look-ahead's first run below counted
            poller._horizon = None
            before, started = server_cpu_ns(postmaster), time.perf_counter()
            for _ in range(ticks):
                assert await poller.drain() == 0
            cpu_ms = (server_cpu_ns(postmaster) - before) / ticks / 1e6
            wall_ms = (time.perf_counter() - started) / ticks * 1000
            await poller.stop()
            print(
                f"  {name:<34} {cpu_ms:10.3f} ms of Postgres CPU per tick, {wall_ms:.2f} ms wall", flush=True
            )


def _each(values: list[float]) -> str:
    return "(" + ", ".join(f"{value:.3f}" for value in values) + ")"


async def still_resting(dsn: str) -> None:
    """A kept database's tasks were seeded due a day later: once that comes near, a day later again."""
    db = await asyncpg.connect(dsn)
    try:
        if await db.fetchval("SELECT min(next_poll_at) < now() + interval '1 hour' FROM tasks"):
            print("  their next polls come near: moved a day ahead", flush=True)
            await db.execute("UPDATE tasks SET next_poll_at = next_poll_at + interval '1 day'")
            await db.execute("VACUUM ANALYZE tasks")
    finally:
        await db.close()


async def run(args: argparse.Namespace) -> None:
    async with fresh_database(args.keep) as url:
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        if await seeded(dsn, args.tasks):
            print(f"reusing the {args.tasks:,} live tasks seeded before", flush=True)
            await still_resting(dsn)
        else:
            print(f"seeding {args.tasks:,} live tasks, none due for a day, with COPY ...", flush=True)
            print(f"  seeded in {await seed_live(dsn, args.tasks, due_after_s=DAY_S, spread_s=3600):.1f} s")
        settings = Settings.from_env(DATABASE_URL=url, SUNO_BASE_URL="http://127.0.0.1:9", SUNO_API_KEY="k")
        print(
            f"sunotrack idle tick benchmark ({args.tasks:,} live tasks, none due; {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} before)",
            flush=True,
        )
        figures = await statements(args, url)
        await pollers(args, settings)
        print(f"  load average {os.getloadavg()[0]:.1f} after", flush=True)
        met = figures["amortised"] <= TARGET_MS
        print(f"  target: an idle tick costs Postgres <= {TARGET_MS:g} ms {'met' if met else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=1_000_000, help="live tasks, none due")
    parser.add_argument("--rounds", type=int, default=5, help="turns of each measurement")
    parser.add_argument("--keep", help="keep the seeded database under this name between runs")
    args = parser.parse_args()
    install_uvloop()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
