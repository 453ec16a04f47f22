"""Crashes, leases, lost LISTEN connections and the circuit breaker."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import asyncpg
from aiohttp import web
from sqlalchemy import select, text
from standardwebhooks import Webhook

from service.config import Settings
from service.db import SessionMaker, transaction
from service.metrics import REGISTRY
from service.models import HookHost
from service.webhooks.repository import claim_due_deliveries as claim_due
from tests.conftest import TEST_WEBHOOK_SECRET
from tests.webhooks.conftest import (
    Receiver,
    add_task,
    attempts,
    deliveries,
    enqueue,
    leased,
    notice,
    running_dispatcher,
    settled,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


async def test_a_claim_left_by_a_crashed_process_is_sent_once_its_lease_expires(
    database_url: str, make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    pk = await add_task(sessions, "task-1", receiver.url)
    await enqueue(sessions, [notice(pk, receiver.url)])
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        claim = await claim_due(connection, limit=10, lease_s=1.0, breaker_failures=20, probe_s=1)
    finally:
        await connection.close()
    assert len(claim.deliveries) == 1
    claimed_at = time.time()

    async with running_dispatcher(make_settings()):
        [row] = await settled(sessions, 1)

    assert receiver.ids() == [claim.deliveries[0].webhook_id]
    assert receiver.received[0].at - claimed_at >= 0.9
    assert (row.status, row.attempts) == ("delivered", 1)
    assert [a.attempt for a in await attempts(sessions, row.id)] == [1]


async def test_kill_9_between_claim_and_answer_resends_with_the_same_webhook_id(
    database_url: str, make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    """A real dispatcher process is SIGKILLed while its POST is in flight; a new one sends it again."""
    got_first = asyncio.Event()

    async def hang_first(_: web.Request, call: int) -> web.StreamResponse:
        if call == 1:
            got_first.set()
            await asyncio.sleep(60)
        return web.Response(text="ok")

    receiver.behaviour = hang_first
    pk = await add_task(sessions, "task-1", receiver.url)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SUNOTRACK_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
        "SUNOTRACK_ALLOW_PRIVATE_HOOKS": "true",
        "SUNOTRACK_LEASE_S": "1",
        "SUNOTRACK_WEBHOOK_TIMEOUT_S": "60",
        "SUNOTRACK_WEBHOOK_SWEEP_S": "0.2",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.webhooks.dispatcher_process", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        # Its log lines share stdout with the ready line.
        while (line := await asyncio.wait_for(process.stdout.readline(), 30)) != b"ready\n":
            assert line, "the dispatcher process exited before it was ready"
        await enqueue(sessions, [notice(pk, receiver.url)])
        await asyncio.wait_for(got_first.wait(), 10)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()

    async with running_dispatcher(make_settings(SUNOTRACK_LEASE_S="1")):
        [row] = await settled(sessions, 1)

    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == row.webhook_id
    assert first.body == second.body == row.body
    assert Webhook(TEST_WEBHOOK_SECRET).verify(second.body, second.headers)
    assert (row.status, row.attempts) == ("delivered", 1)


async def test_the_dispatcher_survives_its_database_connections_being_killed(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    """LISTEN, claim and write connections all die; the sweep is a minute away, so only reconnecting
    and listening again can get the next delivery out in time."""
    pk = await add_task(sessions, "task-1", receiver.url)

    async def backends() -> dict[str, int]:
        async with transaction(sessions) as session:
            query = text(
                "SELECT application_name, pid FROM pg_stat_activity"
                " WHERE application_name LIKE 'sunotrack-%' AND datname = current_database()"
            )
            return {name: pid for name, pid in await session.execute(query)}

    async with running_dispatcher(make_settings(SUNOTRACK_WEBHOOK_SWEEP_S="60")):
        await enqueue(sessions, [notice(pk, receiver.url, seq=2)])
        await settled(sessions, 1)
        old = await backends()
        assert set(old) == {"sunotrack-listen", "sunotrack-webhooks-claim", "sunotrack-webhooks-write"}
        async with transaction(sessions) as session:
            for pid in old.values():
                await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

        async def listening_again() -> bool:
            pid = (await backends()).get("sunotrack-listen")
            return pid is not None and pid != old["sunotrack-listen"]

        await wait_until(listening_again, what="a new LISTEN connection")
        await enqueue(sessions, [notice(pk, receiver.url, seq=3)])
        await settled(sessions, 2, timeout=5)
    assert len(receiver.received) == 2


async def test_the_circuit_breaker_pauses_a_failing_host_then_probes_it(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    up = asyncio.Event()

    async def down_until_up(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(text="ok") if up.is_set() else web.Response(status=500)

    receiver.behaviour = down_until_up
    settings = make_settings(
        SUNOTRACK_HOOK_BREAKER_FAILURES="3",
        SUNOTRACK_HOOK_BREAKER_PAUSE_S="1",
        SUNOTRACK_WEBHOOK_TIMEOUT_S="0.5",
        SUNOTRACK_WEBHOOK_CONCURRENCY="2",
        SUNOTRACK_WEBHOOK_RETRY_SCHEDULE=",".join(["0.05"] * 10),
    )
    pks = [await add_task(sessions, f"task-{n}", receiver.url) for n in range(5)]

    async def host() -> HookHost | None:
        async with transaction(sessions) as session:
            return await session.get(HookHost, f"http://127.0.0.1:{receiver.port}")

    async def paused() -> bool:
        row = await host()
        return row is not None and row.paused_until is not None

    async with running_dispatcher(settings):
        await enqueue(sessions, [notice(pk, receiver.url) for pk in pks])
        await wait_until(paused, what="the host to be paused")
        paused_at = time.time()

        async def gauge_shows_it() -> bool:
            return REGISTRY.get_sample_value("sunotrack_webhook_hosts_paused") == 1

        await wait_until(gauge_shows_it, what="the paused-hosts gauge")
        # Sends claimed before the pause was committed may still land; after that, silence.
        failed_calls = len(receiver.received)
        await asyncio.sleep(0.5)
        # Paused: the retries due meanwhile wait instead of burning attempts.
        assert len(receiver.received) == failed_calls
        up.set()
        rows = await settled(sessions, 5, timeout=10)

    # The threshold, plus what was claimed before the pause was written (results are flushed in batches).
    assert failed_calls >= 3
    assert {row.status for row in rows} == {"delivered"}
    assert sum(row.attempts for row in await deliveries(sessions)) == failed_calls + 5
    assert receiver.received[failed_calls].at - paused_at >= 0.9
    # The probe went alone: every other attempt after the pause started once its answer was in.
    successes = sorted(
        [a for row in rows for a in await attempts(sessions, row.id) if a.status_code == 200],
        key=lambda a: a.at,
    )
    probe, *rest = successes
    assert all(later.at >= probe.at + timedelta(milliseconds=probe.duration_ms or 0) for later in rest)
    # A host that answers again has no failure streak left to show.
    assert await host() is None


async def test_a_paused_host_does_not_hold_up_other_hosts(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    async with transaction(sessions) as session:
        await session.execute(
            text(
                "INSERT INTO hook_hosts (host, consecutive_failures, paused_until)"
                " VALUES (:host, 50, now() + interval '1 hour')"
            ),
            {"host": f"http://localhost:{receiver.port}"},
        )
    paused_hook = f"http://localhost:{receiver.port}/paused"
    paused_pk = await add_task(sessions, "task-paused", paused_hook)
    pk = await add_task(sessions, "task-1", receiver.url)
    async with running_dispatcher(make_settings()):
        await enqueue(sessions, [notice(paused_pk, paused_hook), notice(pk, receiver.url)])

        async def one_delivered() -> bool:
            return [row.status for row in await deliveries(sessions)] == ["pending", "delivered"]

        await wait_until(one_delivered, what="the healthy host's delivery")
    held, _ = await deliveries(sessions)
    assert held.attempts == 0
    assert held.next_attempt_at is not None
    async with transaction(sessions) as session:
        until = (await session.execute(select(HookHost.paused_until))).scalar_one()
    assert held.next_attempt_at == until
    healthy = (await deliveries(sessions))[1]
    assert receiver.ids() == [healthy.webhook_id]


async def test_stop_releases_the_rows_claimed_ahead_with_the_unsent_ones(
    make_settings: Callable[..., Settings], sessions: SessionMaker
) -> None:
    """A lone fast lane holds rows claimed ahead of its slots; on stop none of them goes out and all
    of them are due again at once, for another process, like the sends cut short."""
    in_flight = 0
    let_go = asyncio.Event()

    async def stalls(_: web.Request, call: int) -> web.StreamResponse:
        nonlocal in_flight
        if call > 100:
            in_flight += 1
            await let_go.wait()
        return web.Response(text="ok")

    receiver = await Receiver(stalls).start()
    settings = make_settings(SUNOTRACK_LEASE_S="30", SUNOTRACK_WEBHOOK_TIMEOUT_S="15")
    pks = [await add_task(sessions, f"task-{n}", receiver.url) for n in range(30)]
    try:
        async with running_dispatcher(settings) as dispatcher:
            await enqueue(sessions, [notice(pk, receiver.url, seq=s) for s in range(2, 12) for pk in pks])

            async def forty_stalled() -> bool:
                return in_flight == 40

            async def rows_claimed_ahead() -> bool:
                return await leased(sessions) > 40

            await wait_until(forty_stalled, what="40 requests stalled")
            await wait_until(rows_claimed_ahead, what="rows claimed ahead")
            await dispatcher.stop()  # the 40 stalled sends are cut short after the stop's grace
        assert len(receiver.received) == 140
        assert await leased(sessions) == 0
        rows = await deliveries(sessions)
        assert sum(row.status == "delivered" for row in rows) == 100
        assert {row.attempts for row in rows if row.status != "delivered"} == {0}
    finally:
        let_go.set()
        await receiver.stop()


async def test_a_row_claimed_ahead_goes_out_only_while_its_lease_covers_the_send(
    make_settings: Callable[..., Settings], sessions: SessionMaker
) -> None:
    """Every request must reach the receiver with its whole timeout (2 s) left on its lease (3 s), or
    another process could claim it again mid-send. Four requests stall 1.5 s with the lane's four
    slots, while rows claimed ahead wait behind them: those go back instead of out."""
    lease_left: list[float] = []

    async def stalls_a_while(request: web.Request, call: int) -> web.StreamResponse:
        async with transaction(sessions) as session:
            query = text(
                "SELECT extract(epoch FROM next_attempt_at - now()) FROM deliveries WHERE webhook_id = :id"
            )
            lease_left.append(
                float((await session.execute(query, {"id": request.headers["webhook-id"]})).scalar_one())
            )
        if 60 < call <= 64:
            await asyncio.sleep(1.5)
        return web.Response(text="ok")

    receiver = await Receiver(stalls_a_while).start()
    # Four slots for the lane alone (6 for its client less a share of 2), four rows claimed ahead.
    settings = make_settings(
        SUNOTRACK_LEASE_S="3",
        SUNOTRACK_WEBHOOK_TIMEOUT_S="2",
        SUNOTRACK_WEBHOOK_CONCURRENCY="8",
        SUNOTRACK_HOOK_HOST_CONCURRENCY="2",
    )
    pks = [await add_task(sessions, f"task-{n}", receiver.url) for n in range(20)]
    try:
        async with running_dispatcher(settings):
            await enqueue(sessions, [notice(pk, receiver.url, seq=s) for s in range(2, 7) for pk in pks])
            rows = await settled(sessions, 100, timeout=30)
    finally:
        await receiver.stop()

    assert min(lease_left) >= 2.0, sorted(lease_left)[:8]
    assert Counter(receiver.ids()) == Counter({row.webhook_id: 1 for row in rows})
    assert {(row.status, row.attempts) for row in rows} == {("delivered", 1)}
