"""Chaos: 2,000 tasks through two deployments while processes are killed, the relay fails, Postgres
restarts and the receiver goes away. Nothing may be lost, nothing recorded twice.

In order: `kill -9` of one process in each deployment (another starts in its place), the relay
answering 500s, timing out and sending HTML for 15 s, Postgres stopped for 10 s, the receiver away for
30 s. Then every task's status and events, every delivery and every receipt are checked, and one line
reports the run: `tasks=N transitions=N delivered=N duplicates=N lost=0 recovery_s=N` (recovery: from
the end of the last fault until everything has caught up).

One deployment polls one relay dialect, so there are two: `fetch` and `v1`, each two `sunotrack serve`
processes sharing one database, both databases in one dedicated Postgres cluster (its own data
directory and socket, started and stopped by this test), polling one fake relay and delivering to one
verifying receiver. Each deployment gets 1,000 tasks of every kind: music that completes or fails,
lyrics, stems, and music the test cancels through the API.

The relay shows a task's next stage only once the database holds everything the current one records
(the test drives it, paced so that transitions keep coming through every fault): whatever a fault
swallowed, every stage is recorded, so each task's history is known exactly in advance.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from service.config import Settings
from service.db import create_engine, create_session_maker, transaction
from service.tracking.service import register_task
from service.upstream.fake import Advance, FakeRelay, FaultKind, Lifecycle
from tests.conftest import RELAY_KEY, TEST_ADMIN_TOKEN, TEST_WEBHOOK_SECRET, auth_headers
from tests.tracking.test_processes import Service
from tests.webhooks.conftest import Receiver

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

TASKS_PER_DEPLOYMENT = 1000
# Seconds after every task is registered: when each fault starts (or, on a slow machine, a few
# seconds after the previous one is over, whichever is later), and how long it lasts. The relay fails
# while the killed processes' replacements start.
KILL_AT = 4.0
RELAY_FAILS_AT, RELAY_FAILS_S = 6.0, 15.0
POSTGRES_DOWN_AT, POSTGRES_DOWN_S = 24.0, 10.0
RECEIVER_DOWN_AT, RECEIVER_DOWN_S = 38.0, 30.0
BETWEEN_FAULTS_S = 2.0
# A task's first stage changes between 0 and this many seconds in; each later one 1.5-3.5 s after the
# previous one was recorded. A fifth of the tasks (LATE) start only once the receiver is away, within
# LATE_STARTS_WITHIN: their changes are what it misses, and they are over before it is back, so what
# follows the last fault is catching up.
STARTS_WITHIN = 40.0
LATE = 0.2
LATE_STARTS_WITHIN = 12.0
STAGE_GAP = (1.5, 3.5)
CATCH_UP_TIMEOUT_S = 150.0

SERVICE_ENV = {
    "SUNO_API_KEY": RELAY_KEY,
    "SUNOTRACK_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
    "SUNOTRACK_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
    "SUNOTRACK_ALLOW_PRIVATE_HOOKS": "true",
    "SUNOTRACK_DB_POOL_SIZE": "9",
    "SUNOTRACK_POLL_MIN_INTERVAL_S": "0.25",
    "SUNOTRACK_POLL_MAX_INTERVAL_S": "2",
    "SUNOTRACK_POLL_TICK_S": "0.1",
    "SUNOTRACK_LEASE_S": "4",
    "SUNOTRACK_UPSTREAM_TIMEOUT_S": "1",
    "SUNOTRACK_WEBHOOK_TIMEOUT_S": "2",
    "SUNOTRACK_WEBHOOK_SWEEP_S": "0.5",
    # 1 + 20 attempts over ~49 s of delays: enough for a receiver that is away for 30 s.
    "SUNOTRACK_WEBHOOK_RETRY_SCHEDULE": "0.2,0.5,1,1,2,2,3,3,3,3,3,3,3,3,3,3,3,3,3,3",
    "SUNOTRACK_HOOK_BREAKER_PAUSE_S": "2",
    "SUNOTRACK_LOG_LEVEL": "warning",
}

# What registration reads of the settings: the first poll's delay.
SETTINGS = Settings.from_env(SUNOTRACK_POLL_MIN_INTERVAL_S=SERVICE_ENV["SUNOTRACK_POLL_MIN_INTERVAL_S"])
EventTuple = tuple[int, str, str | None, str, str, str | None]


# --- what each task is scripted to do ------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    lifecycle: Lifecycle
    kind: str
    # Per relay stage: the task status and the clip status it records (None: it has no clips).
    stages: tuple[tuple[str, str | None], ...]
    weight: int
    cancel: bool = False


_MUSIC = (("submitted", "submitted"), ("queued", "queued"), ("in_progress", "in_progress"))
SCRIPTS = (
    Script(Lifecycle.MUSIC_SUCCESS, "music", (*_MUSIC, ("complete", "complete")), weight=8),
    Script(Lifecycle.MUSIC_FAILURE, "music", (*_MUSIC, ("failed", "failed")), weight=3),
    Script(
        Lifecycle.LYRICS, "lyrics", (("submitted", None), ("in_progress", None), ("complete", None)), weight=4
    ),
    Script(
        Lifecycle.STEMS,
        "stems",
        (("queued", "queued"), ("in_progress", "in_progress"), ("complete", "complete")),
        weight=4,
    ),
    Script(Lifecycle.NEVER_FINISHES, "music", _MUSIC, weight=1, cancel=True),
)


def expected_history(script: Script, clip_ids: tuple[str, ...]) -> tuple[list[EventTuple], list[int]]:
    """The task's events, and the task's last seq once each relay stage is recorded."""
    events: list[EventTuple] = [(1, "transition", None, "submitted", "register", None)]
    status = "submitted"
    clips: dict[str, str | None] = dict.fromkeys(clip_ids)
    seq_after = []
    for task_status, clip_status in script.stages:
        if task_status != status:
            events.append((len(events) + 1, "transition", status, task_status, "poll", None))
            status = task_status
        for clip_id in clip_ids if clip_status is not None else ():
            if clips[clip_id] != clip_status:
                events.append((len(events) + 1, "transition", clips[clip_id], clip_status, "poll", clip_id))
                clips[clip_id] = clip_status
        seq_after.append(len(events))
    if script.cancel:
        events.append((len(events) + 1, "transition", status, "cancelled", "api", None))
    return events, seq_after


@dataclass
class Tracked:
    task_id: str
    script: Script
    events: list[EventTuple]
    seq_after: list[int]
    next_at: float  # when the relay may show the next stage (seconds after registration ended)
    gap: float
    late: float | None  # a late task's start, in seconds after the receiver went away
    stage: int = 0
    driven: bool = False  # the relay (or the API, for a cancel) has nothing more to do for it

    @property
    def final(self) -> str:
        return self.events[-1][3]

    def webhooks(self) -> dict[int, str]:
        """Every task-level transition but the registration: seq -> status."""
        return {
            seq: to
            for seq, type_, _, to, _, clip in self.events[1:]
            if type_ == "transition" and clip is None
        }


# --- the dedicated Postgres cluster ------------------------------------------------------------------------


class Cluster:
    """A Postgres of its own (pgserver's binaries, initdb + pg_ctl) on a unix socket in its own
    directory, so stopping it touches nobody else's server."""

    def __init__(self, root: Path) -> None:
        spec = importlib.util.find_spec("pgserver")
        assert spec is not None
        assert spec.submodule_search_locations
        # Found, not imported: importing pgserver fixes its runtime directory for the whole session.
        self._bin = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        self.data = root / "data"
        self.socket_dir = root / "run"
        self._log = self.socket_dir / "postgres.log"
        # initdb and postgres refuse to run as root.
        self._user = "nobody" if os.geteuid() == 0 else None
        self._cwd = root

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [str(self._bin / tool), "-D", str(self.data), *args],
            check=True,
            user=self._user,
            cwd=self._cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )

    def init(self) -> None:
        self._cwd.chmod(0o755)
        for directory in (self.data, self.socket_dir):
            directory.mkdir(mode=0o700)
            if self._user is not None:
                shutil.chown(directory, self._user)
        self._run("initdb", "--auth=trust", "--encoding=utf8", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-h '' -k {self.socket_dir} -c max_connections=100"
        self._run("pg_ctl", "-w", "-l", str(self._log), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-w", "-m", mode, "stop")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="st-chaos-", dir="/tmp"))
    server = Cluster(root)
    server.init()
    server.start()
    try:
        yield server
    finally:
        # A postgres left running would hold CI's output open and keep the run from finishing.
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


# --- the receiver ------------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the receiver accepted: by (task_id, seq), the webhook-ids and statuses it came with."""

    ids: defaultdict[tuple[str, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    statuses: defaultdict[tuple[str, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    receipts: int = 0
    invalid: int = 0

    async def answer(self, request: web.Request, _: int) -> web.StreamResponse:
        try:
            payload = Webhook(TEST_WEBHOOK_SECRET).verify(await request.read(), dict(request.headers))
        except WebhookVerificationError:
            self.invalid += 1
            return web.Response(status=400, text="bad signature")
        key = (payload["data"]["task_id"], payload["data"]["seq"])
        self.ids[key].add(request.headers["webhook-id"])
        self.statuses[key].add(payload["data"]["status"])
        self.receipts += 1
        return web.Response(text="ok")


# --- the two deployments -----------------------------------------------------------------------------------


class Database:
    """The test's own connection to one deployment's database, reopened after Postgres comes back."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection: Any = None
        self._turn = asyncio.Lock()  # the driver and the checks take turns on the one connection

    async def fetch(self, query: str) -> list[Any] | None:
        """The rows, or None while the database cannot be reached."""
        async with self._turn:
            return await self._fetch(query)

    async def _fetch(self, query: str) -> list[Any] | None:
        try:
            if self._connection is None or self._connection.is_closed():
                self._connection = await asyncpg.connect(self._url, timeout=2)
            return list(await self._connection.fetch(query, timeout=10))
        # Whatever state an outage or a timeout left the connection in: start over with a new one.
        except (
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.InternalClientError,
        ):
            if self._connection is not None:
                self._connection.terminate()
                self._connection = None
            return None

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


@dataclass
class Deployment:
    dialect: str
    url: str
    env: dict[str, str]
    database: Database
    logs: Path
    services: list[Service] = field(default_factory=list)
    tasks: dict[str, Tracked] = field(default_factory=dict)
    started: int = 0

    def start_service(self) -> Service:
        self.started += 1
        service = Service(self.env, self.logs / f"{self.dialect}-{self.started}.log")
        self.services.append(service)
        return service

    def api(self, n: int) -> str:
        return self.services[n % len(self.services)].base_url


async def ready(http: aiohttp.ClientSession, service: Service, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not await service.ready(http):
        assert time.monotonic() < deadline, "a service did not become ready"
        await asyncio.sleep(0.05)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        headers=auth_headers(), timeout=aiohttp.ClientTimeout(total=10), raise_for_status=False
    ) as session:
        yield session


async def create_database(cluster: Cluster, name: str) -> str:
    admin = await asyncpg.connect(cluster.url("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return cluster.url(name)


async def register(url: str, deployment: Deployment, hook: str) -> None:
    """Every task in one transaction, through the function the API's registration calls (the API
    path itself is the registration benchmark's subject: here it would only lengthen the run)."""
    engine = create_engine(url.replace("postgresql://", "postgresql+asyncpg://"), pool_size=1)
    try:
        async with transaction(create_session_maker(engine)) as session:
            for task in deployment.tasks.values():
                await register_task(
                    session, task_id=task.task_id, kind=task.script.kind, notify_hook=hook,
                    notify_format=None, metadata=None, settings=SETTINGS,
                )  # fmt: skip
    finally:
        await engine.dispose()


async def cancel(http: aiohttp.ClientSession, deployment: Deployment, task: Tracked) -> None:
    """DELETE until one answers 200, through whichever process is up (the client's retry)."""
    for attempt in range(1000):
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.delete(f"{deployment.api(attempt)}/api/v1/tasks/{task.task_id}") as response:
                if response.status == 200:
                    task.driven = True
                    return
        await asyncio.sleep(0.3)
    raise AssertionError(f"could not cancel {task.task_id}")


async def drive(
    relay: FakeRelay, deployments: list[Deployment], clock: Callable[[], float], http: aiohttp.ClientSession
) -> None:
    """Show each task's next relay stage once its current one is recorded and its time has come."""
    cancels: set[asyncio.Task[None]] = set()
    while any(not task.driven for deployment in deployments for task in deployment.tasks.values()):
        for deployment in deployments:
            rows = await deployment.database.fetch("SELECT task_id, last_seq FROM tasks")
            if rows is None:
                continue  # Postgres is down: nothing can be recorded either
            last_seq = {row["task_id"]: row["last_seq"] for row in rows}
            for task in deployment.tasks.values():
                if (
                    task.driven
                    or clock() < task.next_at
                    or last_seq[task.task_id] < task.seq_after[task.stage]
                ):
                    continue
                if task.stage + 1 < len(task.script.stages):
                    relay.advance(task.task_id)
                    task.stage += 1
                    task.next_at = clock() + task.gap
                elif task.script.cancel:
                    task.next_at = float("inf")
                    cancels.add(asyncio.create_task(cancel(http, deployment, task)))
                else:
                    task.driven = True
        await asyncio.sleep(0.25)
    await asyncio.gather(*cancels)


@dataclass
class Evidence:
    """That each fault really happened and bit, and when the last one ended."""

    killed: list[int] = field(default_factory=list)  # the victims' exit statuses
    relay_failures: dict[str, int] = field(default_factory=dict)  # requests each failure answered
    postgres_started: list[Any] = field(default_factory=list)  # pg_postmaster_start_time() around the stop
    over_at: float = 0.0


async def inject_faults(
    deployments: list[Deployment],
    cluster: Cluster,
    relay: FakeRelay,
    receiver: Receiver,
    http: aiohttp.ClientSession,
    clock: Callable[[], float],
) -> Evidence:
    evidence = Evidence()

    async def at(moment: float) -> None:
        await asyncio.sleep(max(0.0, moment - clock()))

    async def next_fault(planned: float) -> None:
        await at(max(planned, clock() + BETWEEN_FAULTS_S))

    # kill -9 one process of each deployment mid-run, and start another in its place; while those
    # start, the relay fails.
    await at(KILL_AT)
    victims = [deployment.services.pop(0) for deployment in deployments]
    for victim in victims:
        victim.process.send_signal(signal.SIGKILL)
    for victim in victims:
        evidence.killed.append(await asyncio.to_thread(victim.process.wait, 10))
        victim.close()
    replacements = [deployment.start_service() for deployment in deployments]

    # The relay answers 500s, then times out, then sends an HTML page, a second each, in turn.
    await next_fault(RELAY_FAILS_AT)
    failing_since = clock()
    failures = {
        "500": functools.partial(relay.inject, FaultKind.HTTP_ERROR, status=500),
        "timeout": functools.partial(relay.inject, FaultKind.LATENCY, latency_s=1.5),
        "garbage": functools.partial(relay.inject, FaultKind.GARBAGE),
    }
    for second in range(int(RELAY_FAILS_S)):
        relay.clear_faults()
        name = list(failures)[second % len(failures)]
        fault = failures[name]()
        await at(failing_since + second + 1)
        evidence.relay_failures[name] = evidence.relay_failures.get(name, 0) + fault.hits
    relay.clear_faults()

    # A process starting while Postgres is down stops at once (DATABASE_URL unreachable): the
    # replacements are up first.
    await asyncio.gather(*(ready(http, replacement) for replacement in replacements))
    await next_fault(POSTGRES_DOWN_AT)
    evidence.postgres_started.append(await postmaster_start(deployments[0]))
    await asyncio.to_thread(cluster.stop)
    await asyncio.sleep(POSTGRES_DOWN_S)
    await asyncio.to_thread(cluster.start)
    evidence.postgres_started.append(await postmaster_start(deployments[0]))

    await next_fault(RECEIVER_DOWN_AT)
    await receiver.stop()
    for deployment in deployments:
        for task in deployment.tasks.values():
            if task.late is not None:
                task.next_at = clock() + task.late
    await asyncio.sleep(RECEIVER_DOWN_S)
    await receiver.start()
    evidence.over_at = clock()
    return evidence


async def postmaster_start(deployment: Deployment) -> Any:
    rows = await deployment.database.fetch("SELECT pg_postmaster_start_time() AS started")
    assert rows is not None
    return rows[0]["started"]


async def caught_up(deployments: list[Deployment], ledger: Ledger) -> bool:
    """Every task in its final status with all its events, every webhook delivered and received."""
    for deployment in deployments:
        rows = await deployment.database.fetch(
            "SELECT (SELECT count(*) FROM tasks WHERE next_poll_at IS NOT NULL) "
            "+ (SELECT count(*) FROM deliveries WHERE status <> 'delivered') AS open, "
            "(SELECT count(*) FROM deliveries) AS deliveries"
        )
        expected = sum(len(task.webhooks()) for task in deployment.tasks.values())
        if rows is None or rows[0]["open"] != 0 or rows[0]["deliveries"] != expected:
            return False
    return len(ledger.ids) == sum(len(t.webhooks()) for d in deployments for t in d.tasks.values())


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.2)


async def test_nothing_is_lost_through_kills_restarts_and_outages(
    cluster: Cluster, http: aiohttp.ClientSession, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(14)
    ledger = Ledger()
    relay = FakeRelay(api_key=RELAY_KEY, default_advance=Advance.MANUAL, record_windows=False)
    receiver = Receiver(behaviour=ledger.answer)
    deployments: list[Deployment] = []
    try:
        await relay.start()
        await receiver.start()
        weighted = [script for script in SCRIPTS for _ in range(script.weight)]
        for dialect in ("fetch", "v1"):
            url = await create_database(cluster, f"chaos_{dialect}")
            env = {**os.environ, **SERVICE_ENV, "DATABASE_URL": url, "SUNO_BASE_URL": relay.base_url}
            deployment = Deployment(
                dialect, url, env | {"SUNO_API_DIALECT": dialect}, Database(url), tmp_path
            )
            for n in range(TASKS_PER_DEPLOYMENT):
                script = weighted[n % len(weighted)]
                task_id = relay.add_task(lifecycle=script.lifecycle)
                events, seq_after = expected_history(script, relay.clip_ids(task_id))
                late = rng.uniform(0, LATE_STARTS_WITHIN) if rng.random() < LATE else None
                start_at = float("inf") if late is not None else rng.uniform(0, STARTS_WITHIN)
                gap = rng.uniform(*STAGE_GAP)
                deployment.tasks[task_id] = Tracked(task_id, script, events, seq_after, start_at, gap, late)
            deployments.append(deployment)
        # All four at once: in each database, the migration lock makes its two processes take turns.
        await asyncio.gather(
            *(ready(http, deployment.start_service()) for deployment in deployments for _ in range(2))
        )
        await asyncio.gather(
            *(register(deployment.url, deployment, receiver.url) for deployment in deployments)
        )

        began = time.monotonic()

        def clock() -> float:
            return time.monotonic() - began

        driver = asyncio.create_task(drive(relay, deployments, clock, http))
        evidence = await inject_faults(deployments, cluster, relay, receiver, http, clock)

        async def all_caught_up() -> bool:
            if driver.done():
                driver.result()  # a driver that failed says why now, not at the timeout
            return await caught_up(deployments, ledger)

        await wait_for(all_caught_up, CATCH_UP_TIMEOUT_S, "every task and webhook to catch up")
        recovery_s = clock() - evidence.over_at
        await driver

        for deployment in deployments:
            for service in deployment.services:
                assert service.process.poll() is None, f"a {deployment.dialect} service died: see {service}"
        transitions = delivered = 0
        for deployment in deployments:
            events = await deployment.database.fetch(
                "SELECT t.task_id, t.status, e.seq, e.type, e.from_status, e.to_status, e.source, e.clip_id "
                "FROM tasks t JOIN task_events e ON e.task_pk = t.id ORDER BY t.task_id, e.seq"
            )
            deliveries = await deployment.database.fetch(
                "SELECT t.task_id, d.event_seq, d.webhook_id, d.status FROM deliveries d "
                "JOIN tasks t ON t.id = d.task_pk"
            )
            assert events is not None
            assert deliveries is not None
            found: defaultdict[str, list[EventTuple]] = defaultdict(list)
            status: dict[str, str] = {}
            for row in events:
                status[row["task_id"]] = row["status"]
                found[row["task_id"]].append(
                    (
                        row["seq"],
                        row["type"],
                        row["from_status"],
                        row["to_status"],
                        row["source"],
                        row["clip_id"],
                    )
                )
            outbox = {
                (row["task_id"], row["event_seq"]): (row["webhook_id"], row["status"]) for row in deliveries
            }
            for task in deployment.tasks.values():
                assert status[task.task_id] == task.final, (deployment.dialect, task)
                assert found[task.task_id] == task.events, (deployment.dialect, task)
                for seq, to_status in task.webhooks().items():
                    key = (task.task_id, seq)
                    webhook_id, delivery_status = outbox.pop(key)
                    assert delivery_status == "delivered", key
                    # At least once, signed; any duplicate under the same webhook-id.
                    assert ledger.ids[key] == {webhook_id}, key
                    assert ledger.statuses[key] == {to_status}, key
                    transitions += 1
                    delivered += 1
            assert outbox == {}, f"deliveries nobody expected: {list(outbox)[:5]}"
        assert ledger.invalid == 0
        assert len(ledger.ids) == delivered

        # Each fault bit: the victims died of SIGKILL, Postgres really restarted, every kind of relay
        # failure answered requests, and deliveries failed to connect while the receiver was away.
        assert evidence.killed == [-signal.SIGKILL] * len(deployments)
        assert evidence.postgres_started[1] > evidence.postgres_started[0]
        assert min(evidence.relay_failures.values()) > 0, evidence.relay_failures
        for deployment in deployments:
            refused = await deployment.database.fetch(
                "SELECT count(*) AS n FROM delivery_attempts WHERE error_class = 'connect'"
            )
            assert refused is not None
            assert refused[0]["n"] > 0, deployment.dialect

        with capsys.disabled():
            tasks = sum(len(deployment.tasks) for deployment in deployments)
            duplicates, lost = ledger.receipts - delivered, transitions - delivered
            print(
                f"\ntasks={tasks} transitions={transitions} delivered={delivered} duplicates={duplicates} "
                f"lost={lost} recovery_s={recovery_s:.1f}"
            )
    finally:
        for deployment in deployments:
            for service in deployment.services:
                service.close()
            await deployment.database.close()
        await receiver.stop()
        await relay.stop()
