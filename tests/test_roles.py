"""`serve --role all|api|worker` and SUNOTRACK_DB_POOL_SIZE: what each role runs, answers and connects."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from service.app import create_app
from service.cli import main
from service.config import ConfigError, Role, Settings
from service.runtime import engine_pool_size
from service.upstream.fake import FakeRelay, Lifecycle
from tests.api.test_tasks import db_rows
from tests.conftest import RELAY_KEY, TEST_WEBHOOK_SECRET, LiveServer, auth_headers, free_port, wait_until
from tests.webhooks.conftest import Receiver

# Every connection a sunotrack process opens carries one of these application names.
OURS = "application_name LIKE 'sunotrack%'"


@pytest.fixture
def with_relay(make_settings: Callable[..., Settings], relay: FakeRelay) -> Callable[..., Settings]:
    def build(**overrides: str) -> Settings:
        return make_settings(SUNO_BASE_URL=relay.base_url, SUNO_API_KEY=RELAY_KEY, **overrides)

    return build


async def scalar(database_url: str, query: str) -> int:
    ((value,),) = await db_rows(database_url, query)
    return int(value)


async def connections(database_url: str) -> int:
    """How many connections sunotrack processes hold to the test's database right now."""
    query = f"SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND {OURS}"
    return await scalar(database_url, query)


async def test_the_api_role_answers_every_route_and_runs_no_jobs(
    with_relay: Callable[..., Settings], live_server: Callable[..., LiveServer], relay: FakeRelay
) -> None:
    api = live_server(with_relay(), role="api")
    everything = live_server(with_relay(), role="all")

    assert api.runtime.scheduler.get_jobs() == []
    # The control: the same settings in role `all` tick the poller and sweep the webhooks.
    assert len(everything.runtime.scheduler.get_jobs()) == 2
    async with httpx.AsyncClient(base_url=api.base_url, headers=auth_headers()) as client:
        task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
        assert (await client.post("/api/v1/tasks", json={"task_id": task_id})).status_code == 201
        assert (await client.post(f"/api/v1/tasks/{task_id}/refresh")).json()["clips"] != []
        for path in ("/api/v1/tasks", "/api/v1/deliveries", "/schema/openapi.json", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200, path


async def test_the_worker_role_answers_only_health_and_metrics(
    with_relay: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    worker = live_server(with_relay(SUNOTRACK_CALLBACK_TOKEN="cb-token-0123456789"), role="worker")

    async with httpx.AsyncClient(base_url=worker.base_url, headers=auth_headers()) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        for path in ("/api/v1/tasks", "/api/v1/deliveries", "/schema", "/schema/openapi.json"):
            assert (await client.get(path)).status_code == 404, path
        refused = await client.post("/api/v1/callbacks/suno/cb-token-0123456789", json={"task_id": "x"})
        assert refused.status_code == 404
    assert len(worker.runtime.scheduler.get_jobs()) == 2


async def test_an_api_and_a_worker_on_one_database_track_a_task_to_its_webhooks(
    with_relay: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    relay: FakeRelay,
    receiver: Receiver,
) -> None:
    api = live_server(with_relay(), role="api")
    live_server(with_relay(), role="worker")
    task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)

    async with httpx.AsyncClient(base_url=api.base_url, headers=auth_headers()) as client:
        body = {"task_id": task_id, "notify_hook": receiver.url}
        assert (await client.post("/api/v1/tasks", json=body)).status_code == 201

        async def delivered() -> bool:
            items = (await client.get(f"/api/v1/tasks/{task_id}/deliveries")).json()["items"]
            return len(items) == 3 and all(item["status"] == "delivered" for item in items)

        await wait_until(delivered, timeout=30, what="the worker to poll the task and deliver its webhooks")
        assert (await client.get(f"/api/v1/tasks/{task_id}")).json()["status"] == "complete"
    verifier = Webhook(TEST_WEBHOOK_SECRET)
    statuses = sorted(verifier.verify(r.body, r.headers)["data"]["seq"] for r in receiver.received)
    assert statuses == [4, 7, 10]


def test_the_pool_size_is_shared_out_by_role(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(SUNOTRACK_DB_POOL_SIZE="12")
    pooled = make_settings(SUNOTRACK_DB_POOL_SIZE="12", SUNOTRACK_DB_TRANSACTION_POOLER="true")

    # The event feed's LISTEN comes off every role's budget, the dispatcher's claim, result and LISTEN
    # connections off that of a role running jobs; behind a transaction pooler nothing LISTENs.
    assert {role: engine_pool_size(settings, role) for role in ("all", "api", "worker")} == {
        "all": 8, "api": 11, "worker": 8,
    }  # fmt: skip
    assert engine_pool_size(pooled, "api") == 12


async def test_a_busy_process_never_holds_more_connections_than_its_pool_size(
    with_relay: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    relay: FakeRelay,
    receiver: Receiver,
    database_url: str,
) -> None:
    """Role `all` with a budget of 7 (3 for the dispatcher, 1 for the event feed's LISTEN, 3 in the
    engine's pool of which the poller keeps 2) while it polls 200 tasks, delivers their webhooks and
    answers 32 clients at once: sampled throughout, the count reaches the budget and never passes it."""
    server = live_server(with_relay(SUNOTRACK_DB_POOL_SIZE="7"), role="all")
    task_ids = [relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS) for _ in range(200)]
    seen: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            seen.append(await connections(database_url))

    sampler = asyncio.create_task(sample())
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=60) as client:
        limit = asyncio.Semaphore(32)

        async def register(task_id: str) -> int:
            async with limit:
                body = {"task_id": task_id, "notify_hook": receiver.url}
                return (await client.post("/api/v1/tasks", json=body)).status_code

        assert set(await asyncio.gather(*(register(task_id) for task_id in task_ids))) == {201}

        async def all_delivered() -> bool:
            query = "SELECT count(*) FROM deliveries WHERE status = 'delivered'"
            return await scalar(database_url, query) == 3 * len(task_ids)

        await wait_until(all_delivered, timeout=60, what="every task's webhooks delivered")
    done.set()
    await sampler

    assert max(seen) == 7, sorted(set(seen))


@pytest.mark.parametrize(
    ("env", "role", "message"),
    [
        (
            {"SUNOTRACK_DB_TRANSACTION_POOLER": "true"},
            "worker",
            "SUNOTRACK_DB_TRANSACTION_POOLER=true needs --role api",
        ),
        (
            {"SUNOTRACK_DB_TRANSACTION_POOLER": "true"},
            "all",
            "SUNOTRACK_DB_TRANSACTION_POOLER=true needs --role api",
        ),
        ({"SUNOTRACK_DB_POOL_SIZE": "5"}, "all", "SUNOTRACK_DB_POOL_SIZE=5 is too small for --role all"),
        (
            {"SUNOTRACK_DB_POOL_SIZE": "5"},
            "worker",
            "SUNOTRACK_DB_POOL_SIZE=5 is too small for --role worker",
        ),
        (
            {
                "SUNOTRACK_DB_POOL_SIZE": "6",
                "SUNOTRACK_RELAYS": "slow",
                "SUNOTRACK_RELAY_SLOW_BASE_URL": "http://127.0.0.1:9",
            },
            "worker",
            r"SUNOTRACK_DB_POOL_SIZE=6 is too small for --role worker: it needs at least 7 \(3 for the "
            r"webhook dispatcher, one for the event feed's LISTEN, one for each relay's poller, one for "
            r"the rest\)",
        ),
    ],
)
def test_a_role_its_settings_cannot_run_is_refused_naming_the_variable(
    make_settings: Callable[..., Settings], env: dict[str, str], role: Role, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        create_app(make_settings(**env), role=role)
    # The api role runs with either.
    create_app(make_settings(**env), role="api")


def test_serve_knows_only_the_three_roles(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--role", "scheduler"])

    assert exited.value.code == 2
    assert "invalid choice: 'scheduler'" in capsys.readouterr().err


def serve_command(role: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", "from service.cli import main; main()", "serve", "--role", role]
    with log.open("wb") as output:
        return subprocess.Popen(
            [*command, "--port", str(port)], env=env, stdout=output, stderr=subprocess.STDOUT
        )


async def test_the_serve_command_runs_a_worker_without_an_admin_token(
    database_url: str, relay: FakeRelay, tmp_path: Path
) -> None:
    """A worker serves no API, so it needs no admin token; a setting it cannot run with stops it
    before it starts, with one line naming the variable."""
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("SUNOTRACK_")},
        "DATABASE_URL": database_url,
        "SUNO_BASE_URL": relay.base_url,
        "SUNO_API_KEY": RELAY_KEY,
        "SUNOTRACK_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
        "SUNOTRACK_LOG_LEVEL": "warning",
    }
    refused = serve_command(
        "worker", free_port(), env | {"SUNOTRACK_DB_POOL_SIZE": "3"}, tmp_path / "refused.log"
    )
    assert await asyncio.to_thread(refused.wait, 30) == 2
    assert (tmp_path / "refused.log").read_text().strip().splitlines() == [
        "sunotrack: SUNOTRACK_DB_POOL_SIZE=3 is too small for --role worker: it needs at least 6 (3 for the "
        "webhook dispatcher, one for the event feed's LISTEN, one for the poller, one for the rest)"
    ]

    port = free_port()
    process = serve_command("worker", port, env, tmp_path / "worker.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def ready() -> bool:
                assert process.poll() is None, (tmp_path / "worker.log").read_text()
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=60, what="the worker to answer /readyz")
            assert (await client.get("/api/v1/tasks")).status_code == 404
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) in (0, -signal.SIGTERM)
