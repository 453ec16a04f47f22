"""Relay front benchmark: client polls through `POST /suno/fetch` (batches of 50), answered from our
database, next to `/healthz` on the same server at the same rate; and what those polls cost the relay.

    uv run python bench/bench_relay_front.py [--tasks 1000] [--rate 20] [--seconds 10] [--batch 50]

The default rate is issue 13's target: 1,000 task polls/s (20 batch requests/s of 50), p99 < 20 ms.
`--rate 1000` offers 50,000 task polls/s to find where the server saturates. Beside the latencies it
prints the CPU time the sunotrack process and its Postgres backends spent per request (counted by
the kernel, so a loaded box inflates it less than it inflates latencies).

The tasks are submitted through the front (`POST /suno/submit/music`, with a notify_hook) and polled by
sunotrack to completion first, so the relay's counters over the window show exactly what the client's
polls cost it. The load is open-loop: requests go out on a fixed schedule, and each latency counts from
the moment its request was due (a slow answer delays no later request's clock). sunotrack runs as
`sunotrack serve` in its own process; the fake relay, the webhook receiver and the load generator share
this one. Uses DATABASE_URL when set (a fresh database on that server), else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgspec
from aiohttp import web
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import free_port, fresh_database, install_uvloop, wait_ready

from service.upstream.fake import Advance, FakeRelay

RELAY_KEY = "bench-relay-key"
ADMIN_TOKEN = "bench-admin-token-0123456789"
SECRET = "whsec_" + "YmVuY2htYXJrLXNlY3JldC1mb3Itd2ViaG9va3M="
TARGET_P99_MS = 20.0
ROOT = Path(__file__).resolve().parent.parent


async def start_receiver() -> tuple[web.AppRunner, str]:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/hook"


def start_server(database_url: str, relay_url: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SUNO_BASE_URL": relay_url,
        "SUNO_API_KEY": RELAY_KEY,
        "SUNOTRACK_ADMIN_TOKEN": ADMIN_TOKEN,
        "SUNOTRACK_WEBHOOK_SECRET": SECRET,
        "SUNOTRACK_ALLOW_PRIVATE_HOOKS": "true",
        "SUNOTRACK_POLL_MIN_INTERVAL_S": "0.2",
        "SUNOTRACK_POLL_MAX_INTERVAL_S": "1",
        "SUNOTRACK_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-c", "from service.cli import main; main()", "serve", "--port", str(port)]
    return subprocess.Popen(command, env=env, cwd=ROOT)


async def submit_all(http: aiohttp.ClientSession, base: str, count: int, hook: str) -> list[str]:
    body = msgspec.json.encode({"prompt": "harbor lights", "mv": "chirp-v4", "notify_hook": hook})
    limit = asyncio.Semaphore(32)

    async def one() -> str:
        async with limit, http.post(f"{base}/suno/submit/music", data=body) as response:
            answer = await response.read()
            if response.status != 200:
                raise SystemExit(f"submit failed: {response.status} {answer[:200]!r}")
            task_id: str = msgspec.json.decode(answer)["data"]
            return task_id

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def wait_complete(http: aiohttp.ClientSession, base: str, ids: list[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = 0
        for start in range(0, len(ids), 500):
            async with http.post(f"{base}/suno/fetch", json={"ids": ids[start : start + 500]}) as response:
                tasks = msgspec.json.decode(await response.read())["data"]
            done += sum(task["status"] == "SUCCESS" for task in tasks)
        if done == len(ids):
            return
        await asyncio.sleep(0.5)
    raise SystemExit("the tasks did not complete in 120 s")


async def open_loop(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    bodies: list[bytes] | None,
    rate: float,
    seconds: float,
) -> tuple[list[float], int, float]:
    """(latencies in ms, non-200 answers, seconds the run took) for rate*seconds requests sent on a
    fixed schedule."""
    total = int(rate * seconds)
    latencies: list[float] = []
    failures = 0
    start = time.perf_counter()

    async def one(n: int) -> None:
        nonlocal failures
        due = start + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        data = None if bodies is None else bodies[n % len(bodies)]
        async with http.request(method, url, data=data) as response:
            await response.read()
            if response.status != 200:
                failures += 1
        latencies.append((time.perf_counter() - due) * 1000)

    await asyncio.gather(*(one(n) for n in range(total)))
    return latencies, failures, time.perf_counter() - start


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"p50 {statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms, max {ordered[-1]:.1f} ms "
        f"({len(ordered)} requests)"
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc): load on the box does not inflate it
    the way it inflates latencies."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def database_cpu_seconds(database: str) -> float:
    """CPU time so far of the Postgres backends serving `database` (their process titles name it)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f" {database} ".encode() not in (proc / "cmdline").read_bytes():
                continue
            total += cpu_seconds(int(proc.name))
        except OSError:  # the process ended meanwhile
            continue
    return total


async def settle(pid: int, timeout_s: float = 120.0) -> None:
    """Wait until the process is back to idle (the completed tasks' webhooks delivered, their events
    numbered), so the windows measure the polls only."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(1)
        if cpu_seconds(pid) - before < 0.05:
            return
    raise SystemExit(f"sunotrack stayed busy for {timeout_s:.0f} s after the tasks completed")


def p99_of(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def run(args: argparse.Namespace) -> None:
    async with fresh_database() as database_url:
        database = make_url(database_url).database or ""
        relay = FakeRelay(api_key=RELAY_KEY, default_advance=Advance.PER_POLL, record_windows=False)
        relay_url = await relay.start()
        receiver, hook = await start_receiver()
        port = free_port()
        server = start_server(database_url, relay_url, port)
        base = f"http://127.0.0.1:{port}"
        # Idle connections are dropped before uvicorn's 5 s keep-alive ends them: reusing one the server
        # is closing fails the request.
        connector = aiohttp.TCPConnector(limit=args.connections, keepalive_timeout=2)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        try:
            async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
                await wait_ready(base, server)
                # A client's token, as a backend would use: its lookup is part of every request's cost.
                async with http.post(
                    f"{base}/api/v1/clients", json={"name": "bench", "rate": 100000}
                ) as made:
                    if made.status != 201:
                        raise SystemExit(f"client not created: {made.status} {await made.text()}")
                    http.headers["Authorization"] = f"Bearer {(await made.json())['token']}"
                started = time.perf_counter()
                ids = await submit_all(http, base, args.tasks, hook)
                print(
                    f"submitted {len(ids)} tasks through the front in {time.perf_counter() - started:.1f} s"
                )
                await wait_complete(http, base, ids)
                print(f"all complete; relay requests so far: {dict(relay.requests)}")

                await settle(server.pid)
                rng = random.Random(7)
                bodies = [
                    msgspec.json.encode({"ids": rng.sample(ids, args.batch), "action": "MUSIC"})
                    for _ in range(256)
                ]
                sample = await http.post(f"{base}/suno/fetch", data=bodies[0])
                answer_kb = len(await sample.read()) / 1024
                print(f"one batch answer: {answer_kb:.0f} KB ({args.batch} tasks)")

                for round_ in range(1, args.rounds + 1):
                    relay.reset_counters()
                    cpu_before = cpu_seconds(server.pid), database_cpu_seconds(database)
                    front, front_failed, front_s = await open_loop(
                        http, "POST", f"{base}/suno/fetch", bodies, args.rate, args.seconds
                    )
                    relay_requests = sum(relay.requests.values())
                    cpu_after = cpu_seconds(server.pid), database_cpu_seconds(database)
                    bare, bare_failed, bare_s = await open_loop(
                        http, "GET", f"{base}/healthz", None, args.rate, args.seconds
                    )
                    # What the process and its database spend with no request (the jobs' ticks), to
                    # leave out of the requests' share.
                    idle_before = cpu_seconds(server.pid), database_cpu_seconds(database)
                    await asyncio.sleep(args.seconds)
                    idle_process_s = (cpu_seconds(server.pid) - idle_before[0]) / args.seconds * front_s
                    idle_database_s = (
                        (database_cpu_seconds(database) - idle_before[1]) / args.seconds * front_s
                    )
                    cpu_per_request_ms = (cpu_after[0] - cpu_before[0] - idle_process_s) * 1000 / len(front)
                    db_per_request_ms = (cpu_after[1] - cpu_before[1] - idle_database_s) * 1000 / len(front)
                    print(f"round {round_}:")
                    print(
                        f"  POST /suno/fetch, batch {args.batch}, {args.rate:.0f}/s offered: "
                        f"{len(front) / front_s:.0f}/s done, {summary(front)}, {front_failed} not 200; "
                        f"{len(front) * args.batch / front_s:.0f} task polls/s"
                    )
                    print(
                        f"  sunotrack's CPU per batch request: {cpu_per_request_ms:.2f} ms "
                        f"(beyond its {idle_process_s / front_s * 100:.0f}% of a core with no request); "
                        f"Postgres' {db_per_request_ms:.2f} ms"
                    )
                    print(f"  relay requests during that window: {relay_requests}")
                    print(
                        f"  GET /healthz (bare baseline), same rate: {len(bare) / bare_s:.0f}/s done, "
                        f"{summary(bare)}, {bare_failed} not 200"
                    )
                    verdict = "meets" if p99_of(front) < TARGET_P99_MS and relay_requests == 0 else "MISSES"
                    print(f"  {verdict} the target (p99 < {TARGET_P99_MS:.0f} ms, 0 relay requests)")
        finally:
            server.terminate()
            server.wait(30)
            await receiver.cleanup()
            await relay.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="batch requests per second")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    print(f"event loop: {install_uvloop()}")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
