"""Webhook dispatcher benchmark: throughput next to a bare aiohttp POST loop, commit-to-receipt latency,
and the same latency for a fast receiver while a slow one has a backlog (fair delivery).

    uv run python bench/bench_webhooks.py [--deliveries 20000] [--rate 100] [--seconds 10]
                                          [--slow 300] [--slow-answer-s 5] [--fast 30] [--skip-fair]

Uses DATABASE_URL when set (a fresh database is created on that server and dropped afterwards), else an
embedded PostgreSQL (pgserver) in a temporary directory. The receivers are a separate process on
127.0.0.1 so they do not share the dispatcher's CPU. The single-receiver phases post to one port; the
fair-delivery phase has the slow receiver on that port and the fast one on a second (another host key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from sqlalchemy import func, insert, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import fresh_database, install_uvloop

from service.config import Settings
from service.db import create_engine, create_session_maker, transaction
from service.models import Delivery, Task
from service.runtime import open_runtime
from service.upstream.schemas import ClipView
from service.webhooks.bodies import TransitionNotice
from service.webhooks.jobs import start_dispatcher
from service.webhooks.outbox import enqueue_deliveries
from service.webhooks.signing import secret_keys, signature_header

# next_poll_at of a live task no poller should touch.
NEVER = datetime.max.replace(tzinfo=UTC)

SECRET = "whsec_" + "YmVuY2htYXJrLXNlY3JldC1mb3Itd2ViaG9va3M="
TIME_LIMIT_S = 300


# --- the receiver (its own process) -------------------------------------------------------------------


def run_receiver(port_out: Any, slow_answer_s: float) -> None:
    install_uvloop()
    received: list[int] = [0]
    receipts: dict[str, float] = {}
    slow = {"now": 0, "peak": 0, "answered": 0}

    async def count(request: web.Request) -> web.Response:
        await request.read()
        received[0] += 1
        return web.Response(text="ok")

    async def timed(request: web.Request) -> web.Response:
        at = time.time()
        body = json.loads(await request.read())
        receipts[f"{body['data']['task_id']}:{body['data']['seq']}"] = at
        received[0] += 1
        return web.Response(text="ok")

    async def slowly(request: web.Request) -> web.Response:
        await request.read()
        slow["now"] += 1
        slow["peak"] = max(slow["peak"], slow["now"])
        try:
            await asyncio.sleep(slow_answer_s)
        finally:
            slow["now"] -= 1
        slow["answered"] += 1
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        answer: dict[str, Any] = {"received": received[0], "slow": slow}
        if request.query.get("receipts"):
            answer["receipts"] = receipts
        return web.json_response(answer)

    async def reset(_: web.Request) -> web.Response:
        received[0] = 0
        receipts.clear()
        slow.update(peak=slow["now"], answered=0)
        return web.Response()

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/hook", count)
        app.router.add_post("/timed", timed)
        app.router.add_post("/slow", slowly)
        app.router.add_get("/stats", stats)
        app.router.add_post("/reset", reset)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # The same app on two ports: two host keys for the fair-delivery phase.
        for _ in range(2):
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
            await site.start()
            port_out.put(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(serve())


def transition(task_pk: int, task_id: str, seq: int, hook: str) -> TransitionNotice:
    return TransitionNotice(
        task_pk=task_pk,
        task_id=task_id,
        kind="music",
        seq=seq,
        status="in_progress",
        previous_status="queued",
        progress=seq % 100,
        fail_reason=None,
        clips=[
            ClipView(
                id=f"{task_id}-clip-{n}",
                status="in_progress",
                title="Benchmark song",
                audio_url=f"https://cdn.example/{task_id}-{n}.mp3",
            )
            for n in range(2)
        ],
        lyrics=None,
        metadata={"order": seq},
        at=datetime.now(UTC),
        notify_hook=hook,
        notify_format="sunotrack",
        relay_payload=None,
    )


async def add_tasks(settings: Settings, count: int, hook: str, prefix: str) -> list[tuple[int, str]]:
    assert settings.database_url is not None
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with transaction(create_session_maker(engine)) as session:
            # Live, so they carry a next_poll_at; no poller runs here.
            rows = [
                {
                    "task_id": f"{prefix}-{n}",
                    "kind": "music",
                    "status": "queued",
                    "notify_hook": hook,
                    "next_poll_at": NEVER,
                }
                for n in range(count)
            ]
            result = await session.execute(insert(Task).values(rows).returning(Task.id, Task.task_id))
            return [(pk, task_id) for pk, task_id in result]
    finally:
        await engine.dispose()


# --- phases -------------------------------------------------------------------------------------------


async def bare_post_loop(url: str, total: int, concurrency: int) -> float:
    """The ceiling: the same signed POSTs, no database, same concurrency and connector limit."""
    keys = secret_keys(Settings.from_env(SUNOTRACK_WEBHOOK_SECRET=SECRET).webhook_secrets)
    body = json.dumps({"type": "task.status_changed", "data": {"task_id": "x", "seq": 1}}).encode() * 4
    remaining = iter(range(total))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def worker() -> None:
            for n in remaining:
                timestamp = int(time.time())
                headers = {
                    "content-type": "application/json",
                    "webhook-id": f"msg_{n}",
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": signature_header(keys, f"msg_{n}", timestamp, body),
                }
                async with http.post(url, data=body, headers=headers, allow_redirects=False) as response:
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - started)


class ReceiverClient:
    """Asks the receiver process how much it got; one kept-alive session so asking costs little."""

    def __init__(self, base: str) -> None:
        self.base = base
        self._http = aiohttp.ClientSession()

    async def received(self) -> int:
        async with self._http.get(f"{self.base}/stats") as response:
            count: int = (await response.json())["received"]
            return count

    async def receipts(self) -> dict[str, float]:
        async with self._http.get(f"{self.base}/stats", params={"receipts": "1"}) as response:
            receipts: dict[str, float] = (await response.json())["receipts"]
            return receipts

    async def slow(self) -> dict[str, int]:
        async with self._http.get(f"{self.base}/stats") as response:
            slow: dict[str, int] = (await response.json())["slow"]
            return slow

    async def reset(self) -> None:
        async with self._http.post(f"{self.base}/reset") as response:
            response.raise_for_status()

    async def close(self) -> None:
        await self._http.close()


async def dispatcher_throughput(
    settings: Settings, receiver: ReceiverClient, total: int
) -> tuple[float, float]:
    """Queue `total` deliveries, then start a dispatcher; returns (sent/s, settled/s)."""
    hook = f"{receiver.base}/hook"
    tasks = await add_tasks(settings, 200, hook, "thr")
    async with open_runtime(settings) as runtime:
        per_task = -(-total // len(tasks))
        notices = [
            transition(pk, task_id, seq, hook) for seq in range(2, 2 + per_task) for pk, task_id in tasks
        ][:total]
        for start in range(0, len(notices), 1000):
            async with transaction(runtime.sessions) as session:
                await enqueue_deliveries(session, notices[start : start + 1000])
        await receiver.reset()

        started = time.perf_counter()
        dispatcher = await start_dispatcher(runtime)
        sent_at = settled_at = None
        deadline = started + TIME_LIMIT_S / 3
        while settled_at is None and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
            if sent_at is None and await receiver.received() >= total:
                sent_at = time.perf_counter()
            if sent_at is not None:
                async with transaction(runtime.sessions) as session:
                    query = select(func.count()).where(Delivery.status == "delivered")
                    if (await session.execute(query)).scalar_one() >= total:
                        settled_at = time.perf_counter()
        await dispatcher.stop()
    if sent_at is None or settled_at is None:
        raise SystemExit("the dispatcher did not finish within the time limit")
    return total / (sent_at - started), total / (settled_at - started)


async def commit_to_receipt(
    settings: Settings, receiver: ReceiverClient, rate: float, seconds: float
) -> list[float]:
    """Commit one transition every 1/rate s with a dispatcher running; ms from commit to receipt."""
    hook = f"{receiver.base}/timed"
    tasks = await add_tasks(settings, 100, hook, "lat")
    committed: dict[str, float] = {}
    total = int(rate * seconds)
    async with open_runtime(settings) as runtime:
        dispatcher = await start_dispatcher(runtime)
        await asyncio.sleep(0.5)  # the LISTEN connection is up
        await receiver.reset()
        loop = asyncio.get_running_loop()
        started = loop.time()
        for n in range(total):
            await asyncio.sleep(max(0.0, started + n / rate - loop.time()))
            pk, task_id = tasks[n % len(tasks)]
            seq = 2 + n // len(tasks)
            async with transaction(runtime.sessions) as session:
                await enqueue_deliveries(session, [transition(pk, task_id, seq, hook)])
            committed[f"{task_id}:{seq}"] = time.time()
        deadline = time.monotonic() + 10
        while await receiver.received() < total and time.monotonic() < deadline:  # noqa: ASYNC110 (polls another process)
            await asyncio.sleep(0.05)
        await dispatcher.stop()
    receipts = await receiver.receipts()
    return [(receipts[key] - at) * 1000 for key, at in committed.items() if key in receipts]


@dataclass(frozen=True)
class FairFigures:
    fast_ms: list[float]  # commit-to-receipt of each fast delivery received
    fast_expected: int
    slow_peak: int  # most slow requests in flight at once
    slow_answered: int  # slow answers while the fast ones were sent


async def fair_delivery(
    settings: Settings, receiver: ReceiverClient, second_base: str, args: argparse.Namespace
) -> FairFigures:
    """A backlog for a slow receiver, then fast-receiver transitions committed one by one."""
    slow_hook, fast_hook = f"{receiver.base}/slow", f"{second_base}/timed"
    slow_tasks = await add_tasks(settings, args.slow, slow_hook, "slow")
    fast_tasks = await add_tasks(settings, args.fast, fast_hook, "fast")
    committed: dict[str, float] = {}
    async with open_runtime(settings) as runtime:
        dispatcher = await start_dispatcher(runtime)
        await asyncio.sleep(0.5)  # the LISTEN connection is up
        await receiver.reset()
        async with transaction(runtime.sessions) as session:
            await enqueue_deliveries(session, [transition(pk, t, 2, slow_hook) for pk, t in slow_tasks])
        deadline = time.monotonic() + 10
        # Registered after: once the slow receiver's requests are in flight (as many as it will get).
        while time.monotonic() < deadline:
            before = (await receiver.slow())["now"]
            await asyncio.sleep(0.2)
            if before and (await receiver.slow())["now"] == before:
                break
        for pk, task_id in fast_tasks:
            async with transaction(runtime.sessions) as session:
                await enqueue_deliveries(session, [transition(pk, task_id, 2, fast_hook)])
            committed[f"{task_id}:2"] = time.time()
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + max(30, 3 * args.slow_answer_s)
        while await receiver.received() < len(fast_tasks) and time.monotonic() < deadline:  # noqa: ASYNC110 (polls another process)
            await asyncio.sleep(0.05)
        slow = await receiver.slow()
        await dispatcher.stop()
    receipts = await receiver.receipts()
    return FairFigures(
        fast_ms=[(receipts[key] - at) * 1000 for key, at in committed.items() if key in receipts],
        fast_expected=len(fast_tasks),
        slow_peak=slow["peak"],
        slow_answered=slow["answered"],
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(args: argparse.Namespace, loop_name: str) -> None:
    port_queue: Any = multiprocessing.get_context("spawn").Queue()
    receiver = multiprocessing.get_context("spawn").Process(
        target=run_receiver, args=(port_queue, args.slow_answer_s), daemon=True
    )
    receiver.start()
    try:
        client = ReceiverClient(f"http://127.0.0.1:{port_queue.get(timeout=30)}")
        second_base = f"http://127.0.0.1:{port_queue.get(timeout=30)}"
        async with fresh_database() as database_url:
            settings = Settings.from_env(
                DATABASE_URL=database_url,
                SUNOTRACK_WEBHOOK_SECRET=SECRET,
                SUNOTRACK_ALLOW_PRIVATE_HOOKS="true",
                SUNOTRACK_WEBHOOK_CONCURRENCY=str(args.concurrency),
                # No sweep in the measured path: only the LISTEN wake-up.
                SUNOTRACK_WEBHOOK_SWEEP_S="60",
            )
            load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
            print(f"loop={loop_name} concurrency={args.concurrency} deliveries={args.deliveries} load={load}")
            bare = await bare_post_loop(f"{client.base}/hook", args.deliveries, args.concurrency)
            sent, settled = await dispatcher_throughput(settings, client, args.deliveries)
            print(f"bare aiohttp POST loop:   {bare:8.0f} req/s")
            print(f"dispatcher, sent:         {sent:8.0f} deliveries/s  ({sent / bare:.2f} of bare)")
            print(f"dispatcher, settled (DB): {settled:8.0f} deliveries/s  ({settled / bare:.2f} of bare)")
            print(
                "  target: sent within 10% of 186fa20's (before fair delivery): run its bench_webhooks.py "
                "in a worktree, alternating turns with this one"
            )
            latencies = await commit_to_receipt(settings, client, args.rate, args.seconds)
            expected = int(args.rate * args.seconds)
            print(
                f"commit-to-receipt at {args.rate:.0f} transitions/s over {args.seconds:.0f} s: "
                f"received {len(latencies)}/{expected}, p50 {statistics.median(latencies):.1f} ms, "
                f"p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies):.1f} ms"
            )
            if not args.skip_fair:
                fair = await fair_delivery(settings, client, second_base, args)
                fast = fair.fast_ms or [math.inf]
                print(
                    f"fair delivery: {args.slow} to a receiver answering in {args.slow_answer_s:g} s, then "
                    f"{args.fast} to a fast one, committed one by one"
                )
                print(
                    f"  fast receiver commit-to-receipt: received {len(fair.fast_ms)}/{fair.fast_expected}, "
                    f"p50 {statistics.median(fast):.1f} ms, p95 {percentile(fast, 0.95):.1f} ms, "
                    f"max {max(fast):.1f} ms"
                )
                print(
                    f"  slow receiver meanwhile: at most {fair.slow_peak} requests in flight "
                    f"(of {args.concurrency}), {fair.slow_answered} answered"
                )
        await client.close()
    finally:
        receiver.kill()
        receiver.join()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--slow", type=int, default=300, help="deliveries to the slow receiver")
    parser.add_argument("--slow-answer-s", type=float, default=5.0)
    parser.add_argument("--fast", type=int, default=30, help="deliveries to the fast receiver")
    parser.add_argument("--skip-fair", action="store_true", help="single-receiver phases only")
    parser.add_argument("--no-uvloop", action="store_true", help="run the dispatcher on the asyncio loop")
    args = parser.parse_args()
    loop_name = "asyncio" if args.no_uvloop else install_uvloop()
    asyncio.run(asyncio.wait_for(run(args, loop_name), TIME_LIMIT_S))


if __name__ == "__main__":
    main()
