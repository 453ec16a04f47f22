"""The tracking endpoints over real HTTP: refresh, cancel, the relay's callbacks, and the app's poller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest

from service.config import Settings
from service.upstream.fake import Advance, FakeRelay, FaultKind, Lifecycle
from tests.conftest import LiveServer, auth_headers, wait_until
from tests.tracking.conftest import RELAY_KEY
from tests.tracking.test_lifecycles import clip_steps, music_history

CALLBACK_TOKEN = "cb-token-0123456789"


@pytest.fixture
def app_factory(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer], fake_relay: FakeRelay
) -> Callable[..., LiveServer]:
    def start(*, run_jobs: bool = False, **overrides: Any) -> LiveServer:
        settings = make_settings(SUNO_BASE_URL=fake_relay.base_url, SUNO_API_KEY=RELAY_KEY, **overrides)
        return live_server(settings, run_jobs=run_jobs)

    return start


@pytest.fixture
async def api(app_factory: Callable[..., LiveServer]) -> AsyncIterator[httpx.AsyncClient]:
    server = app_factory(SUNOTRACK_CALLBACK_TOKEN=CALLBACK_TOKEN)
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as client:
        yield client


async def history(api: httpx.AsyncClient, task_id: str) -> list[tuple[Any, ...]]:
    response = await api.get(f"/api/v1/tasks/{task_id}/events")
    assert response.status_code == 200
    return [
        (e["seq"], e["type"], e["from_status"], e["to_status"], e["source"], e["clip_id"])
        for e in response.json()["items"]
    ]


async def test_refresh_polls_now_and_returns_the_task(api: httpx.AsyncClient, fake_relay: FakeRelay) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    assert (await api.post("/api/v1/tasks", json={"task_id": task_id})).status_code == 201

    bodies = [(await api.post(f"/api/v1/tasks/{task_id}/refresh")).json() for _ in range(4)]

    assert [body["status"] for body in bodies] == ["submitted", "queued", "in_progress", "complete"]
    assert bodies[-1]["poll_count"] == 4
    assert [clip["status"] for clip in bodies[-1]["clips"]] == ["complete", "complete"]
    expected = [
        (seq, t, a, b, "register" if seq == 1 else "api", c)
        for seq, t, a, b, _, c in music_history(fake_relay.clip_ids(task_id))
    ]
    assert await history(api, task_id) == expected
    # Polling stopped for good: refreshing a finished task returns it without asking the relay.
    again = await api.post(f"/api/v1/tasks/{task_id}/refresh")
    assert (again.status_code, again.json()) == (200, bodies[-1])
    assert fake_relay.task_requests[task_id] == 4


async def test_refresh_errors(api: httpx.AsyncClient, fake_relay: FakeRelay) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    fake_relay.inject(FaultKind.HTTP_ERROR, status=503, times=1)

    failed = await api.post(f"/api/v1/tasks/{task_id}/refresh")
    missing = await api.post("/api/v1/tasks/not-tracked/refresh")

    assert failed.status_code == 502
    assert failed.json()["extra"]["upstream_code"] == "http_503"
    assert missing.status_code == 404
    assert len(await history(api, task_id)) == 1


async def test_cancel_stops_tracking_and_keeps_the_history(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    await api.post(f"/api/v1/tasks/{task_id}/refresh")

    first = await api.delete(f"/api/v1/tasks/{task_id}")
    second = await api.delete(f"/api/v1/tasks/{task_id}")

    assert first.status_code == second.status_code == 200
    assert (first.json()["status"], first.json()["next_poll_at"]) == ("cancelled", None)
    assert second.json() == first.json()
    assert await history(api, task_id) == [
        (1, "transition", None, "submitted", "register", None),
        *clip_steps(2, fake_relay.clip_ids(task_id), None, "submitted", source="api"),
        (4, "transition", "submitted", "cancelled", "api", None),
    ]
    assert (await api.delete("/api/v1/tasks/not-tracked")).status_code == 404


async def test_cancelling_a_finished_task_is_a_conflict(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    task_id = fake_relay.add_task(stages=["SUCCESS"])
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    await api.post(f"/api/v1/tasks/{task_id}/refresh")

    response = await api.delete(f"/api/v1/tasks/{task_id}")

    assert response.status_code == 409
    assert "already finished with status 'complete'" in response.json()["detail"]


async def test_the_relay_callback(api: httpx.AsyncClient) -> None:
    await api.post("/api/v1/tasks", json={"task_id": "cb-task"})
    url = f"/api/v1/callbacks/suno/{CALLBACK_TOKEN}"
    no_auth = {"Authorization": ""}
    enveloped = msgspec.json.encode(
        {"code": "success", "data": {"task_id": "cb-task", "status": "IN_PROGRESS", "progress": "30%"}}
    )

    recorded = await api.post(url, content=enveloped, headers=no_auth)
    camel = await api.post(
        url, json={"taskId": "cb-task", "status": "FAILURE", "failReason": "quota"}, headers=no_auth
    )
    unknown = await api.post(url, json={"task_id": "someone-else", "status": "SUCCESS"}, headers=no_auth)
    malformed = await api.post(url, content=b"<html>", headers=no_auth)
    wrong = await api.post("/api/v1/callbacks/suno/wrong-token", json={"task_id": "cb-task"}, headers=no_auth)

    assert [r.status_code for r in (recorded, camel, unknown, malformed, wrong)] == [200, 200, 202, 400, 401]
    assert unknown.json() == {"status": "ignored", "task_id": "someone-else"}
    assert await history(api, "cb-task") == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "in_progress", "callback", None),
        (3, "transition", "in_progress", "failed", "callback", None),
    ]
    task = (await api.get("/api/v1/tasks/cb-task")).json()
    assert (task["progress"], task["fail_reason"]) == (30, "quota")


async def test_the_callback_route_is_off_without_a_token(app_factory: Callable[..., LiveServer]) -> None:
    server = app_factory()
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        response = await client.post("/api/v1/callbacks/suno/anything", json={"task_id": "x"})
    assert response.status_code == 404


async def test_the_app_runs_the_poller_and_stops_it_cleanly(
    app_factory: Callable[..., LiveServer], fake_relay: FakeRelay
) -> None:
    server = app_factory(run_jobs=True)
    task_ids = [fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS) for _ in range(3)]
    slow = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, advance=Advance.MANUAL)
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as client:
        for task_id in [*task_ids, slow]:
            assert (await client.post("/api/v1/tasks", json={"task_id": task_id})).status_code == 201

        async def all_complete() -> bool:
            statuses = [(await client.get(f"/api/v1/tasks/{t}")).json()["status"] for t in task_ids]
            return statuses == ["complete"] * 3

        await wait_until(all_complete, timeout=15)
        for task_id in task_ids:
            assert await history(client, task_id) == music_history(fake_relay.clip_ids(task_id))
        metrics = (await client.get("/metrics")).text
        assert 'sunotrack_transitions_total{source="poll",to_status="complete"}' in metrics
        assert "sunotrack_claim_lag_seconds_count" in metrics
    server.stop(timeout=10)
