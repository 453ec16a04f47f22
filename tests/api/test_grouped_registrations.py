"""Single registrations waiting at the same moment go out as one statement per client (tracking.service
Registrar): the answers are those a statement of their own gives."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest

from service.config import Settings
from service.db import create_engine
from service.errors import DatabaseUnavailable
from service.tracking.service import REGISTER_STATEMENTS, Registrar, Registration, TaskRow
from tests.api.test_tasks import db_rows
from tests.conftest import ALSO_THROUGH_PGBOUNCER, LiveServer, auth_headers, wait_until


@dataclass
class Gate:
    """Counts the registrar's statements (their sizes, by client) and holds each until opened, so the
    registrations that arrive meanwhile queue, as under load."""

    registrar: Registrar
    groups: list[tuple[int | None, int]] = field(default_factory=list)
    held: int = 0
    opened: threading.Event = field(default_factory=threading.Event)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        statement = self.registrar._statement

        async def held(client_id: int | None, registrations: Sequence[Registration]) -> dict[str, TaskRow]:
            self.groups.append((client_id, len(registrations)))
            self.held += 1
            await asyncio.to_thread(self.opened.wait)
            return await statement(client_id, registrations)

        monkeypatch.setattr(self.registrar, "_statement", held)

    def queued(self) -> int:
        return sum(len(queue) for queue in list(self.registrar._queues.values()))

    async def reached(self, *, held: int, queued: int) -> None:
        """`held` statements held so far, and `queued` registrations waiting behind them."""

        async def there() -> bool:
            return (self.held, self.queued()) == (held, queued)

        await wait_until(there, what=f"{held} statements held, {queued} queued")

    async def arrived(self, count: int) -> None:
        """`count` registrations in held statements or queued behind them."""

        async def all_in() -> bool:
            return sum(size for _client, size in self.groups) + self.queued() == count

        await wait_until(all_in, what=f"{count} registrations held or queued")


@dataclass
class Served:
    server: LiveServer
    api: httpx.AsyncClient
    gate: Gate


@pytest.fixture
async def served(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Served]:
    server = live_server(make_settings())
    gate = Gate(server.runtime.registrar)
    gate.install(monkeypatch)
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as api:
        try:
            yield Served(server, api, gate)
        finally:
            gate.opened.set()


def task_id(n: int) -> str:
    return f"task_{n:032x}"


@ALSO_THROUGH_PGBOUNCER
async def test_concurrent_registrations_go_out_in_fewer_statements_each_answered_as_alone(
    served: Served, database_url: str
) -> None:
    """Fails without the grouping: no statement reaches the registrar."""
    count = 40
    posts = [
        asyncio.ensure_future(
            served.api.post("/api/v1/tasks", json={"task_id": task_id(n), "metadata": {"n": n}})
        )
        for n in range(count)
    ]
    await served.gate.arrived(count)
    served.gate.opened.set()
    responses = await asyncio.gather(*posts)

    assert [r.status_code for r in responses] == [201] * count
    assert [(r.json()["task_id"], r.json()["metadata"]) for r in responses] == [
        (task_id(n), {"n": n}) for n in range(count)
    ]
    # At most one statement for each slot, and one for all that queued behind them.
    assert len(served.gate.groups) <= REGISTER_STATEMENTS + 1
    events = await db_rows(database_url, "SELECT count(*) AS n FROM task_events WHERE seq = 1")
    assert events[0]["n"] == count
    # The same answer a registration alone gets, byte for byte but its times.
    again = await served.api.get(f"/api/v1/tasks/{task_id(count - 1)}")
    grouped = responses[-1].json()
    assert {k: v for k, v in again.json().items() if k != "timeline"} == grouped


async def test_the_same_task_concurrently_is_created_once_and_answered_201_once(
    served: Served, database_url: str
) -> None:
    count = 10
    body = {"task_id": task_id(7), "notify_hook": "http://127.0.0.1:9/hook"}
    posts = [asyncio.ensure_future(served.api.post("/api/v1/tasks", json=body)) for _ in range(count)]
    await served.gate.arrived(count)
    served.gate.opened.set()
    responses = await asyncio.gather(*posts)

    assert sorted(r.status_code for r in responses) == [200] * (count - 1) + [201]
    assert {r.json()["task_id"] for r in responses} == {task_id(7)}
    assert {r.json()["notify_hook"] for r in responses} == {body["notify_hook"]}
    tasks = await db_rows(database_url, "SELECT id FROM tasks")
    events = await db_rows(database_url, "SELECT task_pk FROM task_events")
    assert (len(tasks), [e["task_pk"] for e in events]) == (1, [tasks[0]["id"]])


async def test_two_clients_registering_concurrently_each_get_their_own_tasks(served: Served) -> None:
    tokens = []
    for name in ("shop-a", "shop-b"):
        issued = await served.api.post("/api/v1/clients", json={"name": name})
        tokens.append(issued.json()["token"])
    per_client = 12
    async with (
        httpx.AsyncClient(base_url=served.server.base_url, headers=auth_headers(tokens[0]), timeout=30) as a,
        httpx.AsyncClient(base_url=served.server.base_url, headers=auth_headers(tokens[1]), timeout=30) as b,
    ):
        # Both clients register the same task ids: each its own task.
        posts = [
            asyncio.ensure_future(client.post("/api/v1/tasks", json={"task_id": task_id(n)}))
            for n in range(per_client)
            for client in (a, b)
        ]
        await served.gate.arrived(2 * per_client)
        served.gate.opened.set()
        responses = await asyncio.gather(*posts)
        assert [r.status_code for r in responses] == [201] * 2 * per_client

        # The queued registrations went in one statement per client, each group one client's.
        assert len(served.gate.groups) <= REGISTER_STATEMENTS + 2
        assert len({client for client, _size in served.gate.groups}) == 2
        for client in (a, b):
            listed = (await client.get("/api/v1/tasks", params={"limit": 100})).json()["items"]
            assert sorted(t["task_id"] for t in listed) == [task_id(n) for n in range(per_client)]
    tasks = (await served.api.get("/api/v1/tasks", params={"limit": 100})).json()["items"]
    assert sorted(t["client"] for t in tasks) == ["shop-a"] * per_client + ["shop-b"] * per_client


@pytest.fixture
async def registrar(
    make_settings: Callable[..., Settings], database_url: str
) -> AsyncIterator[Callable[..., Registrar]]:
    engine = create_engine(database_url, pool_size=4)
    made: list[Registrar] = []

    def make(**kwargs: Any) -> Registrar:
        made.append(Registrar(engine, make_settings(), **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for one in made:
            await one.stop()
        await engine.dispose()


def registration(n: int, kind: str = "music") -> Registration:
    return Registration(task_id(n), kind)


async def test_a_registration_the_group_statement_refuses_does_not_fail_the_others(
    registrar: Callable[..., Registrar], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """A kind the table's CHECK refuses (the route's struct never lets one through) fails its group's
    statement; each is then tried alone."""
    registrar_ = registrar()
    gate = Gate(registrar_)
    gate.opened.set()
    gate.install(monkeypatch)
    given = [registration(1), registration(2), registration(3, kind="bogus"), registration(4)]
    answers = await asyncio.gather(
        *(registrar_.register(r, client_id=None, default_relay="default") for r in given),
        return_exceptions=True,
    )

    assert [size for _client, size in gate.groups] == [4, 1, 1, 1, 1]
    assert isinstance(answers[2], asyncpg.CheckViolationError)
    assert [a["task_id"] for i, a in enumerate(answers) if i != 2] == [task_id(1), task_id(2), task_id(4)]  # type: ignore[index]
    rows = await db_rows(database_url, "SELECT task_id FROM tasks ORDER BY task_id")
    assert [r["task_id"] for r in rows] == [task_id(1), task_id(2), task_id(4)]


async def test_a_cancelled_waiter_does_not_stop_the_others_and_stop_refuses_the_queued(
    registrar: Callable[..., Registrar], monkeypatch: pytest.MonkeyPatch
) -> None:
    registrar_ = registrar(slots=1)
    gate = Gate(registrar_)
    gate.install(monkeypatch)

    def register(n: int) -> asyncio.Task[TaskRow | None]:
        waiting = registrar_.register(registration(n), client_id=None, default_relay="default")
        return asyncio.create_task(waiting)

    first = register(1)
    await gate.reached(held=1, queued=0)
    gone = register(2)
    kept = register(3)
    await gate.reached(held=1, queued=2)
    gone.cancel()
    gate.opened.set()

    assert (await first)["task_id"] == task_id(1)
    assert (await kept)["task_id"] == task_id(3)
    assert [size for _client, size in gate.groups] == [1, 1]  # the cancelled one was not sent
    with pytest.raises(asyncio.CancelledError):
        await gone

    gate.opened.clear()
    held = register(4)
    await gate.reached(held=3, queued=0)
    queued = register(5)
    await gate.reached(held=3, queued=1)
    stopping = asyncio.create_task(registrar_.stop())
    with pytest.raises(DatabaseUnavailable):
        await queued
    with pytest.raises(DatabaseUnavailable):
        await register(6)
    gate.opened.set()
    await asyncio.wait_for(stopping, 10)
    assert (await held)["task_id"] == task_id(4)
