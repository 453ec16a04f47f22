"""The real app with a fake relay, the callback route on, and a few rows for the routes to find."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest

from service.config import Settings
from service.upstream.fake import FakeRelay
from tests.conftest import LiveServer, auth_headers

RELAY_KEY = "test-relay-key"
CALLBACK_TOKEN = "cb-token-0123456789"
HOOK = "http://127.0.0.1:9/hook"


@dataclass
class Edge:
    client: httpx.AsyncClient
    relay: FakeRelay
    task_ids: list[str]
    delivery_id: int


@pytest.fixture
async def edge(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> AsyncIterator[Edge]:
    """Two tracked tasks the fake relay knows, the first with a hook and one delivery."""
    async with FakeRelay(api_key=RELAY_KEY) as relay:
        settings = make_settings(
            SUNO_BASE_URL=relay.base_url, SUNO_API_KEY=RELAY_KEY, SUNOTRACK_CALLBACK_TOKEN=CALLBACK_TOKEN
        )
        server = live_server(settings)
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as client:
            task_ids = [relay.add_task(), relay.add_task()]
            for task_id, hook in zip(task_ids, (HOOK, None), strict=True):
                response = await client.post("/api/v1/tasks", json={"task_id": task_id, "notify_hook": hook})
                assert response.status_code == 201, response.text
            for _ in range(2):  # submitted, then queued: a transition, so a delivery
                assert (await client.post(f"/api/v1/tasks/{task_ids[0]}/refresh")).status_code == 200
            deliveries = (await client.get("/api/v1/deliveries")).json()["items"]
            assert len(deliveries) == 1, deliveries
            yield Edge(client, relay, task_ids, deliveries[0]["id"])
