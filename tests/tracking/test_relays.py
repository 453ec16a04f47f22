"""Named relays: each task is polled on its own relay, with that relay's key, slots and pace."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from service.config import Role, Settings
from service.upstream.fake import Advance, FakeRelay, FaultKind, Lifecycle
from tests.conftest import LiveServer, auth_headers, wait_until

FAST_KEY, SLOW_KEY = "fast-relay-key", "slow-relay-key"
CALLBACK_TOKEN = "cb-token-0123456789"


@pytest.fixture
async def slow_relay() -> AsyncIterator[FakeRelay]:
    async with FakeRelay(api_key=SLOW_KEY) as fake:
        yield fake


@pytest.fixture
async def fast_relay() -> AsyncIterator[FakeRelay]:
    async with FakeRelay(api_key=FAST_KEY) as fake:
        yield fake


@pytest.fixture
def two_relays(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    fast_relay: FakeRelay,
    slow_relay: FakeRelay,
) -> Callable[..., LiveServer]:
    """The app with `default` on the fast fake relay and `slow` on the other, each with its own key."""

    def start(*, role: Role = "all", **env: str) -> LiveServer:
        settings = make_settings(
            SUNO_BASE_URL=fast_relay.base_url,
            SUNO_API_KEY=FAST_KEY,
            SUNOTRACK_RELAYS="slow",
            SUNOTRACK_RELAY_SLOW_BASE_URL=slow_relay.base_url,
            SUNOTRACK_RELAY_SLOW_API_KEY=SLOW_KEY,
            SUNOTRACK_RELAY_SLOW_CONCURRENCY="4",
            SUNOTRACK_CALLBACK_TOKEN=CALLBACK_TOKEN,
            **env,
        )
        return live_server(settings, role=role)

    return start


async def statuses(api: httpx.AsyncClient, task_ids: list[str], **params: str) -> set[str]:
    found = set()
    for task_id in task_ids:
        found.add((await api.get(f"/api/v1/tasks/{task_id}", params=params)).json()["status"])
    return found


async def test_a_slow_relay_never_delays_another_relays_polling(
    two_relays: Callable[..., LiveServer], fast_relay: FakeRelay, slow_relay: FakeRelay
) -> None:
    """The slow relay answers after 10 s. Its client's tasks are all due when the pollers start, so
    every request slot of the slow relay is taken by a request waiting on it when the default
    relay's tasks arrive: those still go through their whole lifecycle, poll after poll, before the
    slow relay has answered once."""
    slow_relay.inject(FaultKind.LATENCY, latency_s=10.0)
    slow_ids = [slow_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS) for _ in range(20)]
    slow_ids += [slow_relay.add_task(lifecycle=Lifecycle.STEMS) for _ in range(10)]
    fast_ids = [fast_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS) for _ in range(10)]
    fast_ids += [fast_relay.add_task(lifecycle=Lifecycle.STEMS) for _ in range(5)]
    registrar = two_relays(role="api")
    async with httpx.AsyncClient(base_url=registrar.base_url, headers=auth_headers(), timeout=30) as api:
        token = (await api.post("/api/v1/clients", json={"name": "patient", "relay": "slow"})).json()["token"]
        async with httpx.AsyncClient(base_url=registrar.base_url, headers=auth_headers(token)) as patient:
            for n, task_id in enumerate(slow_ids):
                kind = "stems" if n >= 20 else "music"
                registered = await patient.post("/api/v1/tasks", json={"task_id": task_id, "kind": kind})
                assert registered.json()["relay"] == "slow"

        two_relays(SUNOTRACK_UPSTREAM_TIMEOUT_S="30")  # the pollers

        async def slow_relay_busy() -> bool:
            return slow_relay.requests["stems"] + slow_relay.requests["fetch_batch"] >= 4

        await wait_until(slow_relay_busy, timeout=10, what="the slow relay's request slots to fill")
        asked_at = time.monotonic()
        for n, task_id in enumerate(fast_ids):
            kind = "stems" if n >= 10 else "music"
            registered = await api.post("/api/v1/tasks", json={"task_id": task_id, "kind": kind})
            assert registered.json()["relay"] == "default"

        async def fast_done() -> bool:
            return await statuses(api, fast_ids) == {"complete"}

        await wait_until(fast_done, timeout=30, what="the default relay's tasks to complete")
        done_in = time.monotonic() - asked_at
        slow_now = await statuses(api, slow_ids, client="patient")

    assert done_in < 10.0, f"the default relay's tasks took {done_in:.1f} s: they waited for the slow one"
    assert slow_now == {"submitted"}  # not one answer from the slow relay yet
    assert sum(fast_relay.task_requests[task_id] for task_id in fast_ids) >= 4 * 10 + 3 * 5


async def test_registration_names_a_relay_or_takes_its_clients(
    two_relays: Callable[..., LiveServer], fast_relay: FakeRelay, slow_relay: FakeRelay
) -> None:
    """Each relay is asked about its own tasks only, with its own key."""
    server = two_relays()
    on_slow = slow_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    on_default = fast_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as api:
        named = await api.post("/api/v1/tasks", json={"task_id": on_slow, "relay": "slow"})
        default = await api.post("/api/v1/tasks", json={"task_id": on_default})
        unknown = await api.post("/api/v1/tasks", json={"task_id": "x-1", "relay": "elsewhere"})
        other_relay = await api.post("/api/v1/tasks", json={"task_id": on_slow, "relay": "default"})
        bad_client = await api.post("/api/v1/clients", json={"name": "c", "relay": "elsewhere"})

        async def both_done() -> bool:
            return await statuses(api, [on_slow, on_default]) == {"complete"}

        await wait_until(both_done, timeout=30, what="both tasks to complete")
        listed = {item["task_id"]: item["relay"] for item in (await api.get("/api/v1/tasks")).json()["items"]}

    assert (named.status_code, named.json()["relay"]) == (201, "slow")
    assert (default.status_code, default.json()["relay"]) == (201, "default")
    assert unknown.status_code == 400
    assert "elsewhere" in unknown.json()["detail"]
    assert "known: default, slow" in unknown.json()["detail"]
    assert other_relay.status_code == 409
    assert bad_client.status_code == 400
    assert "known: default, slow" in bad_client.json()["detail"]
    assert listed == {on_slow: "slow", on_default: "default"}
    assert (slow_relay.task_requests[on_default], fast_relay.task_requests[on_slow]) == (0, 0)


async def test_each_relays_callback_route_polls_its_own_record(
    two_relays: Callable[..., LiveServer], fast_relay: FakeRelay, slow_relay: FakeRelay
) -> None:
    """One task id on both relays (two relay tasks): the callback route names which one it is."""
    server = two_relays(role="api")
    task_id = "same-id-on-both"
    fast_relay.add_task(task_id, stages=["QUEUED"], advance=Advance.MANUAL)
    slow_relay.add_task(task_id, stages=["IN_PROGRESS"], advance=Advance.MANUAL)
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as api:
        token = (await api.post("/api/v1/clients", json={"name": "c", "relay": "slow"})).json()["token"]
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(token)) as client:
            await client.post("/api/v1/tasks", json={"task_id": task_id})
        await api.post("/api/v1/tasks", json={"task_id": task_id})

        no_auth: dict[str, Any] = {"headers": {"Authorization": ""}, "json": {"taskId": task_id}}
        on_slow = await api.post(f"/api/v1/callbacks/suno/slow/{CALLBACK_TOKEN}", **no_auth)
        after_slow = await statuses(api, [task_id]), await statuses(api, [task_id], client="c")
        on_default = await api.post(f"/api/v1/callbacks/suno/{CALLBACK_TOKEN}", **no_auth)
        after_default = await statuses(api, [task_id]), await statuses(api, [task_id], client="c")
        unknown = await api.post(f"/api/v1/callbacks/suno/elsewhere/{CALLBACK_TOKEN}", **no_auth)
        wrong_token = await api.post("/api/v1/callbacks/suno/slow/not-the-token", **no_auth)

    assert (on_slow.status_code, on_default.status_code) == (200, 200)
    assert after_slow == ({"submitted"}, {"in_progress"})
    assert after_default == ({"queued"}, {"in_progress"})
    assert (fast_relay.task_requests[task_id], slow_relay.task_requests[task_id]) == (1, 1)
    assert (unknown.status_code, wrong_token.status_code) == (404, 401)
