"""Fair delivery: per-host shares of the request slots, claims taken across hosts in turns, slow hosts
on half a share, and failing hosts' retries spread out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
from aiohttp import web
from sqlalchemy import select, text

from service.config import Settings
from service.db import SessionMaker, transaction
from service.models import Delivery, HookHost
from service.webhooks.bodies import TransitionNotice
from service.webhooks.hosts import MIN_SAMPLES
from service.webhooks.repository import Blocked, Quotas, claim_due_deliveries
from tests.conftest import TEST_WEBHOOK_SECRET, LiveServer, auth_headers
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


class Gauge:
    """How many requests a receiver is answering at once, and the most it ever was."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.at_arrival: list[int] = []
        self.answered = 0

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        self.now += 1
        self.peak = max(self.peak, self.now)
        self.at_arrival.append(self.now)
        try:
            yield
        finally:
            self.now -= 1


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# Two receivers, each behind its own share of 8 of the 64 request slots.
SHARES = {
    "SUNOTRACK_LEASE_S": "30",
    "SUNOTRACK_WEBHOOK_TIMEOUT_S": "15",
    "SUNOTRACK_WEBHOOK_CONCURRENCY": "64",
    "SUNOTRACK_HOOK_HOST_CONCURRENCY": "8",
    "SUNOTRACK_WEBHOOK_SWEEP_S": "1",
}


async def newcomer_webhooks(
    sessions: SessionMaker, fast: Receiver, fast_pks: list[int], committed: dict[str, float]
) -> None:
    """One webhook for each of the newcomer's tasks, committed one by one; returns once all arrived."""
    for n, pk in enumerate(fast_pks):
        await enqueue(sessions, [notice(pk, fast.url, task_id=f"fast-{n}")])
        committed[f"fast-{n}"] = time.time()
        await asyncio.sleep(0.02)

    async def fast_has_all() -> bool:
        return len(fast.received) == len(fast_pks)

    await wait_until(fast_has_all, timeout=10, what="the fast receiver's webhooks")


def backlog(url: str, name: str, pks: list[int]) -> list[TransitionNotice]:
    """Ten transitions (seq 2-11) of each task, to `url`: a backlog the host's share cannot take at once."""
    return [
        notice(pk, url, task_id=f"{name}-{n}", seq=seq) for seq in range(2, 12) for n, pk in enumerate(pks)
    ]


def assert_fast_in_time_and_each_sent_once(
    fast: Receiver, committed: dict[str, float], receivers: list[Receiver], rows: list[Delivery]
) -> None:
    """The newcomer's p95 commit-to-receipt under 1 s; every row delivered once, on its first attempt."""
    receipts = {json.loads(r.body)["data"]["task_id"]: r.at for r in fast.received}
    latencies = [receipts[task_id] - at for task_id, at in committed.items()]
    assert percentile(latencies, 0.95) < 1.0, sorted(latencies)
    for receiver in receivers:
        sent = Counter(receiver.ids())
        assert set(sent) == {row.webhook_id for row in rows if row.url == receiver.url}
        assert set(sent.values()) == {1}
    assert {(row.status, row.attempts) for row in rows} == {("delivered", 1)}


async def test_a_slow_receiver_does_not_delay_a_fast_one_and_loses_or_repeats_nothing(
    make_settings: Callable[..., Settings], sessions: SessionMaker
) -> None:
    """300 deliveries to a receiver taking 5 s per answer, then 30 to a fast one, one commit each.

    With the whole pool of request slots (64) open to the first host, the fast receiver would wait a
    full 5 s round. Once the fast one has everything, the slow one answers its first round, then
    speeds up so the test need not wait 190 s for the rest: every delivery must arrive exactly once,
    each on its first attempt (waiting for a share burns none).
    """
    gauge = Gauge()
    fast_again = asyncio.Event()

    async def five_seconds(_: web.Request, __: int) -> web.StreamResponse:
        with gauge.request():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fast_again.wait(), 5)
            gauge.answered += 1
            return web.Response(text="ok")

    slow = await Receiver(five_seconds).start()
    fast = await Receiver().start()
    settings = make_settings(**SHARES)
    slow_pks = [await add_task(sessions, f"slow-{n}", slow.url) for n in range(30)]
    fast_pks = [await add_task(sessions, f"fast-{n}", fast.url) for n in range(30)]
    committed: dict[str, float] = {}
    try:
        async with running_dispatcher(settings):
            await enqueue(sessions, backlog(slow.url, "slow", slow_pks))

            async def slow_host_full() -> bool:
                return gauge.now == 8

            await wait_until(slow_host_full, what="the slow host's share in flight")
            await newcomer_webhooks(sessions, fast, fast_pks, committed)
            assert gauge.answered == 0  # the slow host's first round was still out meanwhile
            # A slow host never goes over its share, even alone (once fast again, it may).
            assert gauge.peak == 8

            async def first_slow_round() -> bool:
                return gauge.answered >= 8

            await wait_until(first_slow_round, timeout=10, what="the slow host's first answers")
            fast_again.set()
            rows = await settled(sessions, 330, timeout=60)
    finally:
        await slow.stop()
        await fast.stop()

    assert len(rows) == 330
    assert_fast_in_time_and_each_sent_once(fast, committed, [slow, fast], rows)


async def test_a_lone_fast_host_takes_the_free_slots_and_turning_slow_with_them_delays_no_newcomer(
    make_settings: Callable[..., Settings], sessions: SessionMaker
) -> None:
    """Work-conserving shares: a host alone with a backlog gets more than its share while it answers
    fast. The worst case: from its 101st request on it takes 5 s per answer, with its extra slots out.
    A newcomer registered then must still get its webhooks within a second (a share of the client's
    slots stays free), and nothing is lost or repeated."""
    gauge = Gauge()
    fast_again = asyncio.Event()

    async def turns_slow(_: web.Request, call: int) -> web.StreamResponse:
        with gauge.request():
            if call > 100:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fast_again.wait(), 5)
            gauge.answered += 1
            return web.Response(text="ok")

    turning = await Receiver(turns_slow).start()
    fast = await Receiver().start()
    settings = make_settings(**SHARES)
    turning_pks = [await add_task(sessions, f"turning-{n}", turning.url) for n in range(30)]
    fast_pks = [await add_task(sessions, f"fast-{n}", fast.url) for n in range(30)]
    committed: dict[str, float] = {}
    try:
        async with running_dispatcher(settings):
            await enqueue(sessions, backlog(turning.url, "turning", turning_pks))

            async def stuck_with_its_extra_slots() -> bool:
                return len(turning.received) > 100 and gauge.now == 40

            # 40: the client's 48 slots (three quarters of 64) less one share of 8.
            await wait_until(stuck_with_its_extra_slots, what="the turned host's 40 requests in flight")
            await newcomer_webhooks(sessions, fast, fast_pks, committed)
            assert gauge.answered == 100  # the turned host's slow round was still out meanwhile
            assert gauge.peak == 40
            fast_again.set()
            rows = await settled(sessions, 330, timeout=60)
    finally:
        await turning.stop()
        await fast.stop()

    assert_fast_in_time_and_each_sent_once(fast, committed, [turning, fast], rows)


async def test_a_slow_host_gets_half_a_share_until_it_recovers(
    make_settings: Callable[..., Settings],
    sessions: SessionMaker,
    live_server: Callable[..., LiveServer],
) -> None:
    gauge = Gauge()
    recovered = asyncio.Event()

    async def slowish(_: web.Request, __: int) -> web.StreamResponse:
        with gauge.request():
            if not recovered.is_set():
                await asyncio.sleep(0.3)
            return web.Response(text="ok")

    receiver = await Receiver(slowish).start()
    settings = make_settings(
        SUNOTRACK_HOOK_HOST_CONCURRENCY="4",
        SUNOTRACK_HOOK_SLOW_S="0.15",
        SUNOTRACK_LEASE_S="30",
        SUNOTRACK_WEBHOOK_TIMEOUT_S="5",
    )
    host = f"http://127.0.0.1:{receiver.port}"
    pks = [await add_task(sessions, f"task-{n}", receiver.url) for n in range(10)]
    server = live_server(settings, role="all")

    async def view(client: httpx.AsyncClient) -> dict[str, Any]:
        """The host's item; empty until the dispatcher has sent it something."""
        answer = (await client.get("/api/v1/hooks/hosts")).json()
        assert answer["instance_id"] == server.runtime.instance_id
        items = [item for item in answer["items"] if item["host"] == host]
        assert len(items) <= 1
        return dict(items[0]) if items else {}

    try:
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers()) as client:
            await enqueue(sessions, [notice(pk, receiver.url, seq=s) for s in range(2, 6) for pk in pks])

            async def judged_slow() -> bool:
                return bool((await view(client)).get("slow"))

            await wait_until(judged_slow, what="the host to be judged slow")
            item = await view(client)
            assert (item["share"], item["slow"]) == (2, True)
            assert item["in_flight"] <= 4
            assert item["recent_attempts"] >= MIN_SAMPLES
            assert item["p90_ms"] > 300
            await settled(sessions, 40, timeout=20)
            # Half a share in force from the MIN_SAMPLES-th answer on (give or take a claim already
            # under way then): no more than 2 at once after that.
            assert gauge.peak <= 4
            assert max(gauge.at_arrival[20:]) <= 2
            item = await view(client)
            assert (item["in_flight"], item["share"], item["consecutive_failures"]) == (0, 2, 0)

            recovered.set()
            await enqueue(sessions, [notice(pk, receiver.url, seq=s) for s in range(6, 12) for pk in pks])
            await settled(sessions, 100, timeout=20)
            item = await view(client)
            assert (item["share"], item["slow"]) == (4, False)
            assert item["p90_ms"] < 150
    finally:
        await receiver.stop()


async def test_failing_hosts_retry_apart_and_do_not_hold_up_a_healthy_one(
    make_settings: Callable[..., Settings], sessions: SessionMaker
) -> None:
    """A host answering 500 and one answering 429 with one Retry-After for all: each attempt's retry
    falls due at its own time, each host's pause ends at its own time, and a healthy host meanwhile
    gets everything on its first attempt."""

    async def broken(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=500)

    async def busy(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": "2"})

    failing = await Receiver(broken).start()
    throttling = await Receiver(busy).start()
    healthy = await Receiver().start()
    settings = make_settings(
        SUNOTRACK_WEBHOOK_RETRY_SCHEDULE="1,1,1",
        SUNOTRACK_HOOK_BREAKER_FAILURES="10",
        SUNOTRACK_HOOK_BREAKER_PAUSE_S="2",
        SUNOTRACK_LEASE_S="30",
    )
    receivers = (failing, throttling, healthy)
    pks = {r.url: [await add_task(sessions, f"{r.port}-{n}", r.url) for n in range(10)] for r in receivers}
    try:
        async with running_dispatcher(settings):
            await enqueue(sessions, [notice(pk, url) for url, task_pks in pks.items() for pk in task_pks])

            async def healthy_done_and_both_paused() -> bool:
                rows = [row for row in await deliveries(sessions) if row.url == healthy.url]
                async with transaction(sessions) as session:
                    paused = (
                        await session.execute(select(HookHost).where(HookHost.paused_until.is_not(None)))
                    ).all()
                return len(paused) == 2 and {row.status for row in rows} == {"delivered"}

            await wait_until(healthy_done_and_both_paused, what="both failing hosts paused")
    finally:
        for receiver in receivers:
            await receiver.stop()

    assert len(healthy.received) == 10
    async with transaction(sessions) as session:
        pauses = [
            (host.paused_until - host.updated_at).total_seconds()
            for host in (await session.execute(select(HookHost))).scalars()
        ]
    assert all(2 <= pause <= 2 * 1.2 + 0.01 for pause in pauses)
    assert pauses[0] != pauses[1]
    for receiver, delay in ((failing, 1), (throttling, 2)):
        waits = []
        for row in await deliveries(sessions):
            if row.url != receiver.url:
                continue
            first, *_ = await attempts(sessions, row.id)
            assert first.next_attempt_at is not None
            assert first.duration_ms is not None
            finished = first.at + timedelta(milliseconds=first.duration_ms)
            waits.append((first.next_attempt_at - finished).total_seconds())
        assert len(waits) == 10
        assert all(delay - 1e-3 <= wait <= delay * 1.2 + 1e-3 for wait in waits)
        assert len(set(waits)) == 10
        assert max(waits) - min(waits) > 0.02 * delay


async def due_rows(database_url: str, rows: list[tuple[str, int]]) -> asyncpg.Connection:
    """A connection to a database holding, for each (hook, count), that many due deliveries, the
    first listed the oldest."""
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    await connection.execute(
        "INSERT INTO tasks (task_id, kind, status, next_poll_at) VALUES ('t', 'music', 'queued', 'infinity')"
    )
    age = 1000
    for hook, count in rows:
        await connection.execute(
            """
            INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body, next_attempt_at)
            SELECT (SELECT id FROM tasks), $3::integer + g, $1::text || g, $1::text, '{}',
                   now() - make_interval(secs => $2::float8 - g / 1000.0)
            FROM generate_series(1, $4::integer) AS g
            """,
            hook,
            age,
            age * 10,
            count,
        )
        age -= 100
    return connection


async def test_the_claim_takes_hosts_in_turns_up_to_each_quota(database_url: str) -> None:
    connection = await due_rows(
        database_url,
        [("http://backlog.example/h", 1000), ("https://b.example/h", 3), ("http://C.example:8080/h", 2)],
    )
    try:

        async def claim(limit: int, quotas: Quotas) -> tuple[Counter[str], Blocked]:
            claimed = await claim_due_deliveries(
                connection, limit=limit, lease_s=60, breaker_failures=5, probe_s=1, quotas=quotas
            )
            return Counter(d.host for d in claimed.deliveries), claimed.blocked

        backlog, b, c = "http://backlog.example:80", "https://b.example:443", "http://c.example:8080"
        # Oldest first would have been three rows of the backlog.
        assert await claim(3, Quotas(10, 64)) == (Counter({backlog: 1, b: 1, c: 1}), Blocked())
        assert await claim(10, Quotas(4, 64, by_lane={(0, b): 1})) == (
            Counter({backlog: 4, b: 1, c: 1}), Blocked(frozenset({(0, backlog), (0, b)})),
        )  # fmt: skip
        # A host without free slots gets nothing, and is reported as waiting for them.
        assert await claim(10, Quotas(4, 64, by_lane={(0, backlog): 0})) == (
            Counter({b: 1}),
            Blocked(frozenset({(0, backlog)})),
        )
        assert await claim(10, Quotas(4, 64, by_lane={(0, backlog): 0})) == (
            Counter(),
            Blocked(frozenset({(0, backlog)})),
        )
    finally:
        await connection.close()


async def test_the_claim_lets_a_lane_alone_take_its_quota_when_alone(database_url: str) -> None:
    connection = await due_rows(database_url, [("http://backlog.example/h", 100), ("https://b.example/h", 2)])
    try:

        async def claim(limit: int, quotas: Quotas) -> tuple[Counter[str], Blocked]:
            claimed = await claim_due_deliveries(
                connection, limit=limit, lease_s=60, breaker_failures=5, probe_s=1, quotas=quotas
            )
            return Counter(d.host for d in claimed.deliveries), claimed.blocked

        backlog, b = "http://backlog.example:80", "https://b.example:443"
        fast = {backlog: 40}
        lane = frozenset({(0, backlog)})
        # Another lane due: shares, whatever the backlog's host may take alone.
        assert await claim(64, Quotas(8, 48, alone_by_host=fast)) == (
            Counter({backlog: 8, b: 2}),
            Blocked(lane),
        )
        assert await claim(64, Quotas(8, 48, alone_by_host=fast)) == (Counter({backlog: 40}), Blocked(lane))
        # Its lane's own figure when it has sends in flight; its share if its host is not fast.
        alone_lane = Quotas(8, 48, by_lane={(0, backlog): 0}, alone_by_lane={(0, backlog): 5})
        assert await claim(64, alone_lane) == (Counter({backlog: 5}), Blocked(lane))
        assert await claim(64, Quotas(8, 48)) == (Counter({backlog: 8}), Blocked(lane))
        # Within the claim's size and its client's quota.
        assert await claim(3, Quotas(8, 48, alone_by_host=fast)) == (Counter({backlog: 3}), Blocked(lane))
        assert await claim(64, Quotas(8, 20, alone_by_host=fast)) == (
            Counter({backlog: 20}),
            Blocked(clients=frozenset({0})),
        )
    finally:
        await connection.close()


async def test_the_claim_holds_a_paused_hosts_rows_until_its_pause_ends(database_url: str) -> None:
    connection = await due_rows(database_url, [("http://down.example/h", 100), ("http://up.example/h", 2)])
    try:
        until = await connection.fetchval(
            "INSERT INTO hook_hosts (host, consecutive_failures, paused_until)"
            " VALUES ('http://down.example:80', 9, now() + interval '1 minute') RETURNING paused_until"
        )
        claim = await claim_due_deliveries(
            connection, limit=64, lease_s=60, breaker_failures=5, probe_s=1, quotas=Quotas(8, 64)
        )
        assert [d.host for d in claim.deliveries] == ["http://up.example:80"] * 2
        assert (claim.deferred, claim.wake_at) == (64, until)
        held = await connection.fetchval(
            "SELECT count(*) FROM deliveries WHERE host = 'http://down.example:80' AND next_attempt_at = $1",
            until,
        )
        assert held == 64
        assert await connection.fetchval("SELECT sum(attempts) FROM deliveries") == 0
    finally:
        await connection.close()


async def test_the_host_key_is_scheme_host_and_port(sessions: SessionMaker) -> None:
    urls = {
        "https://Hooks.Example.com/a?b=c": "https://hooks.example.com:443",
        "HTTP://hooks.example.com:80/x": "http://hooks.example.com:80",
        "http://user:pw@hooks.example.com:8080": "http://hooks.example.com:8080",
        "http://[::1]:9000/h": "http://[::1]:9000",
        "https://[2001:db8::1]/h": "https://[2001:db8::1]:443",
        "http://127.0.0.1:09/h#frag": "http://127.0.0.1:9",
    }
    async with transaction(sessions) as session:
        keys = {
            url: (await session.execute(text("SELECT hook_origin(:u)"), {"u": url})).scalar_one()
            for url in urls
        }
    assert keys == urls


async def test_deliveries_get_their_host_key_whoever_writes_them(
    sessions: SessionMaker, receiver: Receiver
) -> None:
    pk = await add_task(sessions, "task-1", receiver.url)
    await enqueue(sessions, [notice(pk, receiver.url)])
    async with transaction(sessions) as session:
        host = (await session.execute(select(Delivery.host))).scalar_one()
    assert host == f"http://127.0.0.1:{receiver.port}"


async def add_client(sessions: SessionMaker, name: str) -> int:
    async with transaction(sessions) as session:
        query = text(
            "INSERT INTO clients (name, token_sha256, webhook_secret, relay)"
            " VALUES (:name, :digest, :secret, 'default') RETURNING id"
        )
        values = {"name": name, "digest": name.encode(), "secret": TEST_WEBHOOK_SECRET}
        client_id: int = (await session.execute(query, values)).scalar_one()
    return client_id


async def test_one_clients_slow_hosts_never_take_another_clients_share(
    make_settings: Callable[..., Settings], sessions: SessionMaker
) -> None:
    """A client with three slow receivers could fill 8 slots (8 per host); it gets 6, three quarters,
    and the admin's fast receiver is served at once meanwhile."""
    gauge = Gauge()
    release = asyncio.Event()

    async def slow(_: web.Request, __: int) -> web.StreamResponse:
        with gauge.request():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 5)
            return web.Response(text="ok")

    slow_receivers = [await Receiver(slow).start() for _ in range(3)]
    fast = await Receiver().start()
    acme = await add_client(sessions, "acme")
    settings = make_settings(
        SUNOTRACK_WEBHOOK_CONCURRENCY="8", SUNOTRACK_HOOK_HOST_CONCURRENCY="8", SUNOTRACK_LEASE_S="30"
    )
    slow_pks = [
        (await add_task(sessions, f"acme-{r.port}-{n}", r.url, client_id=acme), r.url)
        for r in slow_receivers
        for n in range(10)
    ]
    fast_pks = [await add_task(sessions, f"fast-{n}", fast.url) for n in range(10)]
    committed: dict[str, float] = {}
    try:
        async with running_dispatcher(settings):
            await enqueue(sessions, [notice(pk, url) for pk, url in slow_pks])

            async def acme_at_its_share() -> bool:
                return gauge.now == 6

            await wait_until(acme_at_its_share, what="the client's share in flight")
            for n, pk in enumerate(fast_pks):
                await enqueue(sessions, [notice(pk, fast.url, task_id=f"fast-{n}")])
                committed[f"fast-{n}"] = time.time()

            async def fast_has_all() -> bool:
                return len(fast.received) == 10

            await wait_until(fast_has_all, timeout=10, what="the fast receiver's webhooks")
            release.set()
            rows = await settled(sessions, 40, timeout=30)
    finally:
        for receiver in [*slow_receivers, fast]:
            await receiver.stop()

    receipts = {json.loads(r.body)["data"]["task_id"]: r.at for r in fast.received}
    assert max(receipts[task_id] - at for task_id, at in committed.items()) < 1.0
    assert gauge.peak == 6
    assert {(row.status, row.attempts) for row in rows} == {("delivered", 1)}
    sent = Counter(
        r.headers["webhook-id"] for r in [*fast.received, *(x for s in slow_receivers for x in s.received)]
    )
    assert set(sent) == {row.webhook_id for row in rows}
    assert set(sent.values()) == {1}


async def test_the_claim_takes_clients_in_turns_then_their_hosts(
    database_url: str, sessions: SessionMaker
) -> None:
    acme = await add_client(sessions, "acme")
    connection = await due_rows(
        database_url, [("http://a.example/h", 10), ("http://b.example/h", 10), ("http://c.example/h", 10)]
    )
    try:
        await connection.execute("UPDATE deliveries SET client_key = $1", acme)
        await connection.execute(
            "INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body, next_attempt_at)"
            " SELECT (SELECT min(id) FROM tasks), 100000 + g, 'admin' || g, 'http://a.example/h', '{}',"
            " now() - interval '1 second' FROM generate_series(1, 10) AS g"
        )
        claim = await claim_due_deliveries(
            connection, limit=4, lease_s=60, breaker_failures=5, probe_s=1, quotas=Quotas(8, 64)
        )
        # Turns by lane alone would have given acme three (one per host) and the admin one.
        assert Counter(d.client_key for d in claim.deliveries) == Counter({acme: 2, 0: 2})
        assert {d.host for d in claim.deliveries if d.client_key == acme} == {
            "http://a.example:80", "http://b.example:80",
        }  # fmt: skip
        # A client at its own quota gets nothing more, and is reported as waiting for slots.
        claim = await claim_due_deliveries(
            connection, limit=64, lease_s=60, breaker_failures=5, probe_s=1,
            quotas=Quotas(8, 64, by_client={acme: 0}),
        )  # fmt: skip
        assert {d.client_key for d in claim.deliveries} == {0}
        assert acme in claim.blocked.clients
    finally:
        await connection.close()


async def test_a_host_that_stops_answering_fast_hands_back_its_rows_claimed_ahead(
    make_settings: Callable[..., Settings], sessions: SessionMaker
) -> None:
    """Claim-ahead: a lone fast lane holds rows claimed ahead of its slots, which do not count against
    its client while its host answers fast. Once its answers turn slow they would (its share is back to
    8, so they could not go out for a whole slow answer): they are released instead, and a newcomer of
    the same client, registered then, still gets its webhooks within a second."""
    gauge = Gauge()
    answers: asyncio.Queue[None] = asyncio.Queue()
    fast_again = asyncio.Event()

    async def turns_slow(_: web.Request, call: int) -> web.StreamResponse:
        with gauge.request():
            if call > 100:
                arrived = time.monotonic()
                told = {asyncio.ensure_future(answers.get()), asyncio.ensure_future(fast_again.wait())}
                await asyncio.wait(told, timeout=5, return_when=asyncio.FIRST_COMPLETED)
                for waiting in told:
                    waiting.cancel()
                # Slow by the book: over the 0.5 s a fast host answers within.
                await asyncio.sleep(max(0.0, arrived + 0.6 - time.monotonic()))
            gauge.answered += 1
            return web.Response(text="ok")

    turning = await Receiver(turns_slow).start()
    fast = await Receiver().start()
    settings = make_settings(**SHARES)
    turning_host = f"http://127.0.0.1:{turning.port}"
    turning_pks = [await add_task(sessions, f"turning-{n}", turning.url) for n in range(30)]
    fast_pks = [await add_task(sessions, f"fast-{n}", fast.url) for n in range(30)]
    committed: dict[str, float] = {}
    try:
        async with running_dispatcher(settings) as dispatcher:
            await enqueue(sessions, backlog(turning.url, "turning", turning_pks))

            async def stuck_with_rows_claimed_ahead() -> bool:
                return gauge.now == 40 and await leased(sessions, turning.url) > 40

            await wait_until(stuck_with_rows_claimed_ahead, what="40 in flight and rows claimed ahead")

            def share() -> int:
                [view] = [view for view in dispatcher.hosts() if view.host == turning_host]
                return view.share

            # Slow answers, one at a time, until the host is no longer judged fast (its lone allowance
            # gone).
            while share() != 8:
                answered = gauge.answered
                answers.put_nowait(None)

                async def one_more_answer(answered: int = answered) -> bool:
                    return gauge.answered > answered

                await wait_until(one_more_answer, what="one slow answer")

            async def only_what_is_in_flight_held() -> bool:
                return await leased(sessions, turning.url) == gauge.now

            await wait_until(only_what_is_in_flight_held, timeout=2, what="the rows claimed ahead released")
            await newcomer_webhooks(sessions, fast, fast_pks, committed)
            fast_again.set()
            rows = await settled(sessions, 330, timeout=60)
    finally:
        fast_again.set()
        await turning.stop()
        await fast.stop()

    assert_fast_in_time_and_each_sent_once(fast, committed, [turning, fast], rows)
