"""Two clients: each sees only its own tasks' events (pull and stream), stats and replays; the admin
sees both, or one with ?client=NAME."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import httpx

from tests.api.test_clients import as_token, create
from tests.api.test_tasks import db_rows
from tests.conftest import wait_until
from tests.feed.test_api import sse


async def register(client: httpx.AsyncClient, *task_ids: str) -> None:
    for task_id in task_ids:
        response = await client.post(
            "/api/v1/tasks", json={"task_id": task_id, "notify_hook": "http://127.0.0.1:9/hook"}
        )
        assert response.status_code == 201, response.text


async def feed_of(reader: httpx.AsyncClient, **params: str) -> list[tuple[str | None, str, int]]:
    response = await reader.get("/api/v1/events", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    return [(item["client"], item["task_id"], item["id"]) for item in response.json()["items"]]


async def test_events_stats_and_replay_are_scoped_to_the_caller(
    api: httpx.AsyncClient, database_url: str
) -> None:
    tokens = {name: (await create(api, name))["token"] for name in ("shop-a", "shop-b")}
    async with as_token(api, tokens["shop-a"]) as a, as_token(api, tokens["shop-b"]) as b:
        await register(a, "same-id", "a-only")
        await register(b, "same-id")
        await register(api, "admin-own")
        await b.delete("/api/v1/tasks/same-id")

        async def all_numbered() -> bool:
            return len(await feed_of(api)) == 5

        await wait_until(all_numbered, what="five events numbered")
        seen_a, seen_b = await feed_of(a), await feed_of(b)
        admin_all, admin_b = await feed_of(api), await feed_of(api, client="shop-b")
        stats_a = (await a.get("/api/v1/stats")).json()
        stats_b = (await b.get("/api/v1/stats")).json()
        stats_admin = (await api.get("/api/v1/stats")).json()

        # Replay: each client re-queues only its own dead deliveries.
        await db_rows(
            database_url,
            "INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body, status, next_attempt_at) "
            "SELECT id, 1, 'w-' || id, 'http://127.0.0.1:9/hook', '', 'dead', NULL FROM tasks",
        )
        since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        replay_a = (await a.post("/api/v1/deliveries/replay", json={"since": since})).json()
        pending = await db_rows(
            database_url,
            "SELECT t.task_id, c.name FROM deliveries d JOIN tasks t ON t.id = d.task_pk "
            "LEFT JOIN clients c ON c.id = t.client_id "
            "WHERE d.status = 'pending' AND d.webhook_id LIKE 'w-%'",
        )
        replay_b_named = await b.post(
            "/api/v1/deliveries/replay", json={"since": since, "task_ids": ["a-only", "same-id"]}
        )

    assert [(c, t) for c, t, _ in seen_a] == [("shop-a", "same-id"), ("shop-a", "a-only")]
    assert [(c, t) for c, t, _ in seen_b] == [("shop-b", "same-id"), ("shop-b", "same-id")]
    assert [(c, t) for c, t, _ in admin_b] == [(c, t) for c, t, _ in seen_b]
    assert sorted(i for *_, i in admin_all) == [1, 2, 3, 4, 5]
    assert ("None", "admin-own") in [(str(c), t) for c, t, _ in admin_all]
    assert stats_a["tasks"]["by_status"]["submitted"] == 2
    assert (stats_b["tasks"]["by_status"]["submitted"], stats_b["tasks"]["by_status"]["cancelled"]) == (0, 1)
    assert sum(stats_admin["tasks"]["by_status"].values()) == 4
    assert replay_a == {"requeued": 2}
    assert sorted((row["task_id"], row["name"]) for row in pending) == [
        ("a-only", "shop-a"),
        ("same-id", "shop-a"),
    ]
    # b's own same-id only: a-only is not b's to name.
    assert replay_b_named.json() == {"requeued": 1}


async def test_the_stream_sends_a_client_only_its_own_events(api: httpx.AsyncClient) -> None:
    tokens = {name: (await create(api, name))["token"] for name in ("shop-a", "shop-b")}
    received: dict[str, list[dict[str, object]]] = {"shop-a": [], "shop-b": []}

    opened = {name: asyncio.Event() for name in received}

    async def listen(name: str, count: int) -> None:
        async with (
            as_token(api, tokens[name]) as client,
            client.stream("GET", "/api/v1/events/stream") as response,
        ):
            assert response.status_code == 200
            opened[name].set()  # its start (the feed's end) was read before the answer began
            async for message in sse(response):
                if "data" in message:
                    received[name].append(json.loads(message["data"]))
                if len(received[name]) == count:
                    return

    listeners = [asyncio.create_task(listen("shop-a", 2)), asyncio.create_task(listen("shop-b", 1))]
    # Both streams open before the events.
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in opened.values())), 10)
    async with as_token(api, tokens["shop-a"]) as a, as_token(api, tokens["shop-b"]) as b:
        await register(a, "a-1")
        await register(api, "admin-1")
        await register(b, "b-1")
        await register(a, "a-2")
    await asyncio.wait_for(asyncio.gather(*listeners), 15)

    assert [(e["client"], e["task_id"]) for e in received["shop-a"]] == [("shop-a", "a-1"), ("shop-a", "a-2")]
    assert [(e["client"], e["task_id"]) for e in received["shop-b"]] == [("shop-b", "b-1")]
