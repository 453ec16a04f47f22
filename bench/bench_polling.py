"""Poller benchmark: task polls/s over 20,000 active tasks that do not change, next to a bare fetch loop
(same client, same fake relay, same batch size) in the same run; recorded transitions/s; peak RSS.

    uv run python bench/bench_polling.py [--tasks 20000] [--changing 10000] [--seconds 5] [--rounds 3]

Uses DATABASE_URL when set (a fresh database is created on that server and dropped afterwards), else an
embedded PostgreSQL (pgserver) in a temporary directory. The fake relay runs in its own process on
127.0.0.1 (its own event loop, though on a small box it shares the cores with the poller and Postgres);
both measurements fetch from it through one RelayClient built the way the app builds it. The poller
is the production one (start_pollers: one on an APScheduler tick), with both poll intervals at 1 ms so every
task is always due.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import fresh_database, install_uvloop

from service.cli import configure_logging, tune_gc
from service.config import Settings
from service.db import SessionMaker, transaction
from service.metrics import POLLS
from service.runtime import Runtime, open_runtime
from service.tracking.jobs import start_pollers
from service.upstream.client import RelayClient
from service.upstream.fake import Advance, FakeRelay, Lifecycle

RELAY_KEY = "bench-relay-key"
# For 20,000 tasks; longer in proportion for more (their first pass is the slow part).
TIME_LIMIT_S = 300
# The hook the steady tasks' relay answers name: adopted on their first poll, then the same each time.
STEADY_HOOK = "https://orders.example.com/hooks/suno?order="
TARGETS = {"polls": 5_000.0, "ratio": 0.5, "transitions": 2_000.0, "rss_mb": 300.0}


# --- the fake relay (its own process) -----------------------------------------------------------------


def run_relay(steady: list[str], changing: list[str], port_out: Any) -> None:
    install_uvloop()

    async def serve() -> None:
        relay = FakeRelay(api_key=RELAY_KEY, record_windows=False)
        for task_id in steady:
            # Streaming with both clips, as a real in-progress song: ~6.5 KB per task in a batch answer,
            # naming the notify_hook its client submitted it with (registered here without one).
            relay.add_task(
                task_id, stages=["IN_PROGRESS"], advance=Advance.MANUAL, notify_hook=STEADY_HOOK + task_id
            )
        for task_id in changing:
            relay.add_task(task_id, Lifecycle.MUSIC_SUCCESS)
        await relay.start("127.0.0.1", 0)
        port_out.put(relay.base_url)
        await asyncio.Event().wait()

    asyncio.run(serve())


# --- helpers ------------------------------------------------------------------------------------------


async def register_all(sessions: SessionMaker, task_ids: list[str]) -> None:
    """What registration writes (task row due now, event seq 1), in two statements instead of 20,000."""
    async with transaction(sessions) as session:
        await session.execute(
            text(
                "INSERT INTO tasks (task_id, kind, status, last_seq, next_poll_at, poll_interval_s) "
                "SELECT unnest(CAST(:ids AS text[])), 'music', 'submitted', 1, now(), 0.001"
            ),
            {"ids": task_ids},
        )
        await session.execute(
            text(
                "INSERT INTO task_events (task_pk, seq, type, from_status, to_status, source) "
                "SELECT id, 1, 'transition', NULL, 'submitted', 'register' FROM tasks "
                "WHERE task_id = ANY(CAST(:ids AS text[]))"
            ),
            {"ids": task_ids},
        )


async def scalar(sessions: SessionMaker, sql: str, **params: Any) -> Any:
    async with sessions() as session:
        return (await session.execute(text(sql), params)).scalar_one()


async def wait_until(check: Callable[[], Any], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("the poller did not get there in time")
        await asyncio.sleep(0.05)


async def bare_loop(relay: RelayClient, task_ids: list[str], seconds: float, workers: int) -> float:
    """The client alone, shaped like the poller (`workers` loops, one batch request each at a time)
    but with no database: fetch_batch over every task, again and again."""
    size = relay.batch_size
    chunks = [task_ids[i : i + size] for i in range(0, len(task_ids), size)]
    polled = 0
    started = time.perf_counter()

    async def loop(n: int) -> None:
        nonlocal polled
        while time.perf_counter() - started < seconds:
            for chunk in chunks[n::workers]:
                answer = await relay.fetch_batch(chunk)
                if answer.errors or answer.missing:
                    raise RuntimeError(
                        f"bare loop: {len(answer.errors)} errors, {len(answer.missing)} missing"
                    )
                polled += len(answer.snapshots)
                if time.perf_counter() - started >= seconds:
                    return

    async with asyncio.TaskGroup() as group:
        for n in range(workers):
            group.create_task(loop(n))
    return polled / (time.perf_counter() - started)


def time_limit_s(tasks: int) -> float:
    return TIME_LIMIT_S * max(1.0, tasks / 20_000)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the run ------------------------------------------------------------------------------------------


async def run(
    args: argparse.Namespace, base_url: str, loop_name: str, steady: list[str], changing: list[str]
) -> None:
    async with fresh_database() as database_url:
        settings = Settings.from_env(
            DATABASE_URL=database_url,
            SUNO_BASE_URL=base_url,
            SUNO_API_KEY=RELAY_KEY,
            SUNOTRACK_POLL_MIN_INTERVAL_S="0.001",
            SUNOTRACK_POLL_MAX_INTERVAL_S="0.001",
            SUNOTRACK_POLL_TICK_S="0.5",
            SUNOTRACK_LEASE_S="30",
            # The relay's hooks are adopted without a DNS lookup (the bench has no resolver to ask).
            SUNOTRACK_ALLOW_PRIVATE_HOOKS="true",
        )
        # The app's own resources (engine, HTTP session, relay client, started scheduler).
        async with open_runtime(settings) as runtime:
            await measure(args, runtime, loop_name, steady, changing)


async def measure(
    args: argparse.Namespace, runtime: Runtime, loop_name: str, steady: list[str], changing: list[str]
) -> None:
    settings = runtime.settings
    relay = runtime.relay
    assert relay is not None
    print(
        f"sunotrack polling benchmark ({loop_name}, batch size {settings.poll_batch_size}, "
        f"{settings.upstream_concurrency} requests in flight, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} before, fake relay in its own process)",
        flush=True,
    )
    tune_gc()  # what `sunotrack serve` does to the process: both loops get it
    workers = settings.upstream_concurrency
    await bare_loop(relay, steady, 1.0, workers)  # warm the connection pool and both processes
    first_pass = await first_poller_pass(runtime, steady)
    # Bare loop and poller take turns, so each pair shares the machine's mood of the moment (on this
    # kind of VM the bare loop alone was seen to vary from 20,000 to 31,000/s between runs).
    bares: list[float] = []
    polls: list[float] = []
    for _ in range(args.rounds):
        bares.append(await bare_loop(relay, steady, args.seconds, workers))
        polls.append(await poller_window(runtime, args.seconds))
    bare, poller = sum(bares) / len(bares), sum(polls) / len(polls)
    window = f"{args.rounds} windows of {args.seconds:g} s, taking turns"
    report("bare fetch loop", bare, f"task polls/s   ({len(steady):,} tasks; {window}: {_each(bares)})")
    report(
        "poller",
        poller,
        f"task polls/s   ({len(steady):,} active unchanging tasks: {_each(polls)}; the first pass, "
        f"where each task's first answer is a change, went at {first_pass:,.0f}/s)",
    )
    ratios = ", ".join(f"{p / b:.0%}" for p, b in zip(polls, bares, strict=True))
    print(f"  ratio poller / bare  {poller / bare:10.0%} (each turn: {ratios})", flush=True)

    transitions, events, elapsed = await measure_transitions(runtime, changing)
    report(
        "transitions",
        transitions,
        f"task-level transitions/s   ({events:,.0f} events/s with the clips' own; "
        f"{len(changing):,} songs from submitted to complete in {elapsed:.1f} s)",
    )
    rss = peak_rss_mb()
    report("peak RSS", rss, "MB (this process: poller, client, harness)")
    print(f"  load average         {os.getloadavg()[0]:10.1f} after", flush=True)
    verdicts = [
        ("task polls/s >= 5,000", poller >= TARGETS["polls"]),
        ("poller >= 50% of bare loop", poller / bare >= TARGETS["ratio"]),
        ("transitions/s >= 2,000", transitions >= TARGETS["transitions"]),
        ("peak RSS <= 300 MB", rss <= TARGETS["rss_mb"]),
    ]
    print("  targets: " + "; ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in verdicts))


def report(name: str, value: float, unit: str) -> None:
    print(f"  {name:<20} {value:10,.0f} {unit}", flush=True)


async def first_poller_pass(runtime: Runtime, steady: list[str]) -> float:
    """Register the steady tasks and poll each once (a change: its first answer); returns tasks/s."""
    sessions = runtime.sessions
    await register_all(sessions, steady)
    [poller] = await start_pollers(runtime)
    started = time.perf_counter()
    await wait_until(lambda: _all_polled(sessions), time_limit_s(len(steady)) / 4)
    first_pass = len(steady) / (time.perf_counter() - started)
    await poller.stop()
    return first_pass


async def poller_window(runtime: Runtime, seconds: float) -> float:
    """Task polls/s over tasks that never change, from the poller's first answers for `seconds`.

    Counted by the poller's own counter, in this process: a `sum(poll_count)` scanned the whole table
    inside the window, taking Postgres's CPU and holding back the pruning that keeps the claim's
    updates HOT, more so the larger the table (docs/design.md, "Polls at 200,000 tasks: the row's
    width")."""
    [poller] = await start_pollers(runtime)
    start = polls_answered()
    await wait_until(lambda: _answered_more_than(start), TIME_LIMIT_S / 4)
    before = polls_answered()
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    polls = (polls_answered() - before) / (time.perf_counter() - started)
    await poller.stop()
    return polls


def polls_answered() -> float:
    """sunotrack_polls_total over every endpoint: the tasks the relay answered about."""
    samples = (sample for metric in POLLS.collect() for sample in metric.samples)
    return sum(sample.value for sample in samples if sample.name.endswith("_total"))


async def _answered_more_than(value: float) -> bool:
    return polls_answered() > value


def _each(values: list[float]) -> str:
    return ", ".join(f"{value:,.0f}" for value in values)


async def measure_transitions(runtime: Runtime, changing: list[str]) -> tuple[float, float, float]:
    """Songs whose every poll sees the next stage: task-level transitions/s, all events/s, seconds."""
    sessions = runtime.sessions
    async with transaction(sessions) as session:
        # The steady ones rest (live, so they keep a next_poll_at).
        await session.execute(text("UPDATE tasks SET next_poll_at = 'infinity'"))
    await register_all(sessions, changing)
    [poller] = await start_pollers(runtime)
    started = time.perf_counter()
    await wait_until(lambda: _all_finished(sessions), TIME_LIMIT_S / 4)
    elapsed = time.perf_counter() - started
    await poller.stop()
    counted = (
        "SELECT count(*) FROM task_events e JOIN tasks t ON t.id = e.task_pk "
        "WHERE t.task_id LIKE 'song-%' AND e.source = 'poll'"
    )
    task_level = await scalar(sessions, counted + " AND e.clip_id IS NULL")
    events = await scalar(sessions, counted)
    return task_level / elapsed, events / elapsed, elapsed


async def _all_polled(sessions: SessionMaker) -> bool:
    return bool(await scalar(sessions, "SELECT count(*) FROM tasks WHERE poll_count = 0") == 0)


async def _all_finished(sessions: SessionMaker) -> bool:
    return bool(await scalar(sessions, "SELECT count(*) FROM tasks WHERE next_poll_at < 'infinity'") == 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=20_000, help="active unchanging tasks")
    parser.add_argument("--changing", type=int, default=10_000, help="songs taken from submitted to complete")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed window")
    parser.add_argument("--rounds", type=int, default=3, help="turns of bare loop and poller")
    parser.add_argument("--no-uvloop", action="store_true", help="run on the asyncio loop")
    args = parser.parse_args()
    configure_logging("info")  # as `sunotrack serve` runs by default

    steady = [f"steady-{n:06d}" for n in range(args.tasks)]
    changing = [f"song-{n:06d}" for n in range(args.changing)]
    context = multiprocessing.get_context("spawn")
    port_out = context.Queue()
    relay = context.Process(target=run_relay, args=(steady, changing, port_out), daemon=True)
    relay.start()
    try:
        base_url = port_out.get(timeout=60)
        loop_name = "asyncio" if args.no_uvloop else install_uvloop()
        limit_s = time_limit_s(args.tasks)
        asyncio.run(asyncio.wait_for(run(args, base_url, loop_name, steady, changing), limit_s))
    finally:
        relay.terminate()
        relay.join(10)


if __name__ == "__main__":
    main()
