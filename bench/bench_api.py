"""The API's edge: registrations/s (single, 64 concurrent clients), tasks/s through the batch route,
and GET /api/v1/tasks/{id} at 16 concurrent clients, each beside a bare baseline from the same run (a
bare Litestar handler doing one asyncpg insert or select, served by the same uvicorn the same way), and
the peak RSS of the `sunotrack serve` process. Every figure is by a client's token (registrations take
from its rate bucket in Postgres, up to 64 at a time for the process to spend, a read finds it in the
process's token cache; the client's rate is high enough never to refuse); registrations and reads by the admin
token follow. `--reads`: the GET figures alone; `--no-analyze`: no ANALYZE before them.

The server runs its jobs meanwhile: BENCH_LIVE_TASKS (default 1,000) live tasks of the fake relay, on a
relay of their own (`live`), are polled every 3 s throughout, and the line under each figure says how
many polls/s the poller answered during it. The tasks the bench registers go to `default`, which has no
relay URL, so they add no polling: the background load stays the same from first figure to last.

Uses DATABASE_URL when set (a fresh database is created on that server and dropped afterwards), else an
embedded PostgreSQL. `sunotrack serve`, the fake relay and the bare app each run in a process of their
own; the load comes from wrk (Debian's `wrk`, driven by bench/wrk_load.lua), for both sides of each
ratio: a generator in C costs a few percent of a core where a Python client took most of one of the
box's two (docs/design.md, "The API benchmarks' load generator"). Without wrk it says so and stops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Load, fresh_database, install_uvloop, require_wrk, wrk_load

ADMIN = "bench-admin-token-0123456789"
RELAY_KEY = "bench-relay-key"
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
# --reads: only the GET figures (and their bare select), on 2,000 tasks each registered untimed.
READS_ONLY = "--reads" in sys.argv[1:]
# --no-analyze: the GET figures without the ANALYZE before them, as a new database filled in seconds
# serves them until autovacuum's first ANALYZE (docs/design.md, "Read figures").
ANALYZE = "--no-analyze" not in sys.argv[1:]
LIVE_TASKS = int(os.environ.get("BENCH_LIVE_TASKS", "1000"))
LIVE_POLL_S = 3
BATCH = 500
TARGETS = {
    "reg_s": 2_000.0,
    "reg_p99_ms": 50.0,
    "batch_tasks_s": 20_000.0,
    "get_s": 3_000.0,
    "get_p99_ms": 20.0,
}


# --- the bare baseline: its own process ------------------------------------------------------------


def bare_app(url: str) -> Any:
    import asyncpg  # noqa: PLC0415
    from litestar import Litestar, get, post  # noqa: PLC0415

    pool: dict[str, asyncpg.Pool] = {}

    async def start() -> None:
        pool["db"] = await asyncpg.create_pool(url, min_size=10, max_size=10)
        await pool["db"].execute(
            "CREATE TABLE IF NOT EXISTS bare (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " task_id text UNIQUE, kind text, created_at timestamptz DEFAULT now())"
        )

    @post("/bare", status_code=201)
    async def register(data: dict[str, Any]) -> dict[str, Any]:
        row = await pool["db"].fetchrow(
            "INSERT INTO bare (task_id, kind) VALUES ($1, 'music') RETURNING id, task_id, created_at",
            data["task_id"],
        )
        return dict(row)

    @post("/bare/batch", status_code=200)
    async def register_batch(data: dict[str, Any]) -> dict[str, Any]:
        ids = [item["task_id"] for item in data["tasks"]]
        rows = await pool["db"].fetch(
            "INSERT INTO bare (task_id, kind) SELECT unnest($1::text[]), 'music' RETURNING id, task_id",
            ids,
        )
        return {"items": [dict(row) for row in rows]}

    @get("/bare/{task_id:str}")
    async def read(task_id: str) -> dict[str, Any]:
        row = await pool["db"].fetchrow(
            "SELECT id, task_id, kind, created_at FROM bare WHERE task_id = $1", task_id
        )
        return dict(row) if row else {}

    return Litestar([register, register_batch, read], on_startup=[start])


def run_bare(port: int, url: str) -> None:
    import uvicorn  # noqa: PLC0415

    uvicorn.run(bare_app(url), host="127.0.0.1", port=port, access_log=False, log_level="warning")


# --- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Output to a file: an unread pipe would block a process that logs once it fills.
    log = open(f"/tmp/bench-api-{Path(argv[1]).name}-{os.getpid()}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_s(pid: int) -> float:
    """CPU seconds the process has used (user + system): what a call costs it whatever the box's load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_ready(session: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"{url}: the process ended with {process.returncode} (its log: /tmp/bench-api-*)"
            )
        try:
            async with session.get(url) as response:
                if response.status < 500:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"{url}: not ready after 60 s")


def say(message: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# --- load ---------------------------------------------------------------------------------------------


def expect(status: int, wanted: int, body: str) -> None:
    if status != wanted:
        raise SystemExit(f"unexpected {status} (wanted {wanted}): {body[:500]}")


@asynccontextmanager
async def processes(
    url: str,
) -> AsyncIterator[tuple[str, str, str, subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    relay_port, serve_port, bare_port = free_port(), free_port(), free_port()
    relay_url = f"http://127.0.0.1:{relay_port}"
    env = {
        "DATABASE_URL": url,
        "SUNOTRACK_ADMIN_TOKEN": ADMIN,
        # `default` has no relay URL: the bench's registrations are not polled. `live` is the fake
        # relay, whose tasks are polled every LIVE_POLL_S whatever they answer.
        "SUNOTRACK_RELAYS": "live",
        "SUNOTRACK_RELAY_LIVE_BASE_URL": relay_url,
        "SUNOTRACK_RELAY_LIVE_API_KEY": RELAY_KEY,
        "SUNOTRACK_POLL_MIN_INTERVAL_S": str(LIVE_POLL_S),
        "SUNOTRACK_POLL_MAX_INTERVAL_S": str(LIVE_POLL_S),
        "SUNO_API_KEY": RELAY_KEY,
        "SUNOTRACK_DATA_DIR": f"/tmp/bench-api-{uuid.uuid4().hex[:8]}",
        "SUNOTRACK_ALLOW_PRIVATE_HOOKS": "true",
    }
    # A stage lasts an hour: the live tasks stay live (queued) through the whole run.
    relay = start(["sunotrack", "fake-relay", "--port", str(relay_port), "--stage-s", "3600"], env)
    serve = start(["sunotrack", "serve", "--port", str(serve_port)], env)
    bare_url = url.replace("+asyncpg", "")
    bare = start([sys.executable, __file__, "--bare", str(bare_port), bare_url], env)
    try:
        yield f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{bare_port}", relay_url, serve, bare
    finally:
        for process in (bare, serve, relay):
            stop(process)


async def polls_total(http: aiohttp.ClientSession, api: str) -> float:
    async with http.get(f"{api}/metrics") as r:
        text = await r.text()
    lines = [line for line in text.splitlines() if line.startswith("sunotrack_polls_total")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


async def feed_settled(url: str) -> None:
    """Wait until the feed has numbered every event: a batch phase leaves tens of thousands for the
    sequencer, which would otherwise weigh on the figure after it."""
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        deadline = time.monotonic() + 120
        while await connection.fetchval("SELECT EXISTS (SELECT FROM task_events WHERE feed_id IS NULL)"):
            if time.monotonic() > deadline:
                raise SystemExit("the feed did not number the events within 120 s")
            await asyncio.sleep(0.2)
    finally:
        await connection.close()


async def analyzed(url: str) -> None:
    """Statistics as autovacuum would have them: the registration phases grow tasks and task_events
    from nothing to some 130,000 rows in 20 s, and a GET plan cached while they were empty lasts until
    their next ANALYZE: 170 GETs/s at p50 90 ms before it, 2,691/s at 6 ms after (docs/design.md,
    "Read figures")."""
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


async def seed_live(http: aiohttp.ClientSession, api: str, relay: str, admin: dict[str, str]) -> None:
    """LIVE_TASKS tasks submitted to the fake relay and registered on `live`; returns once the poller
    has answered each of them at least once."""
    relay_auth = {"Authorization": f"Bearer {RELAY_KEY}"}
    ids: list[str] = []
    for _ in range(LIVE_TASKS):
        async with http.post(f"{relay}/suno/submit/music", json={"prompt": "x"}, headers=relay_auth) as r:
            expect(r.status, 200, await r.text())
            ids.append((await r.json())["data"])
    for at in range(0, len(ids), BATCH):
        tasks = [{"task_id": task_id, "relay": "live"} for task_id in ids[at : at + BATCH]]
        async with http.post(f"{api}/api/v1/tasks/batch", json={"tasks": tasks}, headers=admin) as r:
            expect(r.status, 200, await r.text())
    deadline = time.monotonic() + 180
    while await polls_total(http, api) < LIVE_TASKS:
        if time.monotonic() > deadline:
            raise SystemExit("the poller did not poll the live tasks within 180 s")
        await asyncio.sleep(0.5)


async def task_ids(url: str, prefix: str, limit: int) -> list[str]:
    """Up to `limit` ids of the tasks wrk registered under `prefix`."""
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        rows = await connection.fetch(
            "SELECT task_id FROM tasks WHERE task_id LIKE $1 || '%' ORDER BY id LIMIT $2", prefix, limit
        )
    finally:
        await connection.close()
    if not rows:
        raise SystemExit(f"no task registered under {prefix!r}")
    return [row["task_id"] for row in rows]


async def bench() -> None:
    require_wrk()
    loop_name = install_uvloop()
    load_before = os.getloadavg()
    async with fresh_database() as url, processes(url) as (api, bare, relay, serve, bare_process):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_ready(http, f"{api}/healthz", serve)
            await wait_ready(http, f"{bare}/bare/none", serve)
            admin = {"Authorization": f"Bearer {ADMIN}"}
            await seed_live(http, api, relay, admin)
            async with http.post(
                f"{api}/api/v1/clients", json={"name": "bench", "rate": 1e6}, headers=admin
            ) as r:
                expect(r.status, 201, await r.text())
                client = {"Authorization": f"Bearer {(await r.json())['token']}"}
            client_token = client["Authorization"].removeprefix("Bearer ")
            run = uuid.uuid4().hex[:6]

            say("ready")
            figures: dict[str, Load] = {}
            polls: dict[str, float] = {}

            cpu_us: dict[str, float] = {}
            # What the poller's 1,000 live tasks cost the serve process when nothing else happens.
            await feed_settled(url)
            idle_cpu, idle_began = cpu_s(serve.pid), time.monotonic()
            await asyncio.sleep(3)
            background = (cpu_s(serve.pid) - idle_cpu) / (time.monotonic() - idle_began)

            async def measure(name: str, call: Callable[[], Awaitable[Load]]) -> None:
                await feed_settled(url)
                if name.startswith("GET") and ANALYZE:
                    await analyzed(url)
                say(f"measuring {name}")
                pid = bare_process.pid if name.startswith("bare") else serve.pid
                before, cpu_before, began = await polls_total(http, api), cpu_s(pid), time.monotonic()
                figures[name] = await call()
                elapsed = time.monotonic() - began
                polls[name] = (await polls_total(http, api) - before) / elapsed
                spent = cpu_s(pid) - cpu_before - (0 if pid == bare_process.pid else background * elapsed)
                cpu_us[name] = spent / figures[name].calls * 1e6

            def post(base: str, path: str, prefix: str, clients: int, token: str | None) -> Awaitable[Load]:
                return wrk_load(
                    base,
                    path,
                    mode="post",
                    connections=clients,
                    seconds=SECONDS,
                    expect=201,
                    token=token,
                    prefix=prefix,
                )

            def batch(base: str, path: str, prefix: str, token: str | None) -> Awaitable[Load]:
                return wrk_load(
                    base,
                    path,
                    mode="batch",
                    connections=4,
                    seconds=SECONDS,
                    expect=200,
                    token=token,
                    prefix=prefix,
                    batch=BATCH,
                )

            def read(base: str, path: str, ids: list[str], token: str | None) -> Awaitable[Load]:
                return wrk_load(
                    base,
                    path,
                    mode="get",
                    connections=16,
                    seconds=SECONDS,
                    expect=200,
                    token=token,
                    ids=ids,
                )

            async def register_for_reads(prefix: str, token: str) -> None:
                """2,000 tasks to read, registered untimed (--reads)."""
                auth = {"Authorization": f"Bearer {token}"}
                for at in range(0, 2000, BATCH):
                    tasks = [{"task_id": f"{prefix}-0-{n}"} for n in range(at, at + BATCH)]
                    async with http.post(
                        f"{api}/api/v1/tasks/batch", json={"tasks": tasks}, headers=auth
                    ) as r:
                        expect(r.status, 200, await r.text())

            if READS_ONLY:
                await register_for_reads(f"r{run}c", client_token)
                await register_for_reads(f"r{run}a", ADMIN)
            else:
                await measure("bare insert", lambda: post(bare, "/bare", f"b{run}", 64, None))
                await measure(
                    "registrations", lambda: post(api, "/api/v1/tasks", f"r{run}c", 64, client_token)
                )
                await measure("bare batch insert", lambda: batch(bare, "/bare/batch", f"y{run}", None))
                await measure(
                    "batch route", lambda: batch(api, "/api/v1/tasks/batch", f"x{run}", client_token)
                )
            registered = await task_ids(url, f"r{run}c-", 2000)
            async with http.post(
                f"{bare}/bare/batch", json={"tasks": [{"task_id": t} for t in registered]}
            ) as r:
                expect(r.status, 200, await r.text())
            await measure("bare select", lambda: read(bare, "/bare/", registered, None))
            await measure("GET task", lambda: read(api, "/api/v1/tasks/", registered, client_token))
            if not READS_ONLY:
                await measure(
                    "registrations, admin", lambda: post(api, "/api/v1/tasks", f"r{run}a", 64, ADMIN)
                )
            registered_by_admin = await task_ids(url, f"r{run}a-", 2000)
            await measure("GET task, admin", lambda: read(api, "/api/v1/tasks/", registered_by_admin, ADMIN))
            rss = peak_rss_mb(serve.pid)
    load_after = os.getloadavg()

    print(
        f"bench_api: {loop_name}, {SECONDS:g} s per figure, {LIVE_TASKS:,} live tasks polled every "
        f"{LIVE_POLL_S} s{'' if ANALYZE else ', no ANALYZE before the reads'}, "
        f"load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (2 cores)"
    )
    print(
        f"{'what':<22} {'per s':>10} {'p50 ms':>8} {'p99 ms':>8}  ratio  polls/s meanwhile"
        "  CPU µs per call (ratio)  wrk's CPU µs per call"
    )
    for what, bare_what in (
        ("registrations", "bare insert"),
        ("batch route", "bare batch insert"),
        ("GET task", "bare select"),
        ("registrations, admin", "bare insert"),
        ("GET task, admin", "bare select"),
    ):
        if what not in figures:
            continue
        for name in (bare_what, what):
            got = figures[name]
            ratio = "" if name == bare_what else f"{got.per_s / figures[bare_what].per_s:.2f}"
            cpu = "" if name == bare_what else f" ({cpu_us[name] / cpu_us[bare_what]:.1f}x)"
            print(
                f"{name:<22} {got.per_s:>10,.0f} {got.p50_ms:>8.1f} {got.p99_ms:>8.1f}"
                f"  {ratio:>5}  {polls[name]:>17,.0f}  {cpu_us[name]:>8,.0f}{cpu:<9}"
                f"  {got.generator_cpu_s / got.calls * 1e6:>8,.0f}"
            )
    print(f"(the serve process's CPU per call leaves out its {background * 100:.0f}% of a core while idle)")
    print(f"peak RSS of the serve process: {rss:.0f} MB")
    read = figures["GET task"]
    checks = []
    if not READS_ONLY:
        reg, batch_rate = figures["registrations"], figures["batch route"]
        checks += [
            (f"registrations >= {TARGETS['reg_s']:,.0f}/s", reg.per_s >= TARGETS["reg_s"]),
            (f"registration p99 <= {TARGETS['reg_p99_ms']:g} ms", reg.p99_ms <= TARGETS["reg_p99_ms"]),
            (
                f"batch >= {TARGETS['batch_tasks_s']:,.0f} tasks/s",
                batch_rate.per_s >= TARGETS["batch_tasks_s"],
            ),
        ]
    checks += [
        (f"GET >= {TARGETS['get_s']:,.0f}/s", read.per_s >= TARGETS["get_s"]),
        (f"GET p99 <= {TARGETS['get_p99_ms']:g} ms", read.p99_ms <= TARGETS["get_p99_ms"]),
        ("peak RSS <= 300 MB", rss <= 300),
    ]
    for label, met in checks:
        print(f"  {'met' if met else 'MISSED'}: {label}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        run_bare(int(sys.argv[2]), sys.argv[3])
        return
    asyncio.run(bench())


if __name__ == "__main__":
    main()
