"""GET /events (pull) and GET /events/stream (SSE) through the real app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from tests.conftest import ALSO_THROUGH_PGBOUNCER, wait_until


async def register(api: httpx.AsyncClient, *task_ids: str) -> None:
    for task_id in task_ids:
        response = await api.post("/api/v1/tasks", json={"task_id": task_id, "metadata": {"n": task_id}})
        assert response.status_code == 201, response.text


async def feed(api: httpx.AsyncClient, after: int = 0, limit: int = 100) -> dict[str, Any]:
    response = await api.get("/api/v1/events", params={"after": after, "limit": limit})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def sse(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """Each message of a text/event-stream as its fields (a comment as {"comment": ...})."""
    message: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if message:
                yield message
            message = {}
        elif line.startswith(":"):
            message["comment"] = line[1:].strip()
        else:
            field, _, value = line.partition(":")
            message[field] = value.removeprefix(" ")


async def test_the_feed_pages_every_event_in_order_with_task_and_kind(api: httpx.AsyncClient) -> None:
    await register(api, "f-1", "f-2", "f-3")
    await api.delete("/api/v1/tasks/f-2")

    async def all_numbered() -> bool:
        return len((await feed(api))["items"]) == 4

    await wait_until(all_numbered, what="the sequencer to number the four events")
    first = await feed(api, limit=3)
    rest = await feed(api, after=first["next_after"], limit=3)
    empty = await feed(api, after=rest["next_after"])

    items = first["items"] + rest["items"]
    assert [item["id"] for item in items] == [1, 2, 3, 4]
    assert [(i["task_id"], i["kind"], i["seq"], i["to_status"]) for i in items] == [
        ("f-1", "music", 1, "submitted"),
        ("f-2", "music", 1, "submitted"),
        ("f-3", "music", 1, "submitted"),
        ("f-2", "music", 2, "cancelled"),
    ]
    assert items[0]["client"] is None
    assert (first["next_after"], rest["next_after"], empty) == (3, 4, {"items": [], "next_after": 4})


async def test_feed_bounds_are_400s(api: httpx.AsyncClient) -> None:
    for params in ({"after": -1}, {"after": 2**63}, {"limit": 0}, {"limit": 1001}, {"after": "x"}):
        response = await api.get("/api/v1/events", params=params)
        assert response.status_code == 400, (params, response.text)
        assert set(response.json()) == {"status_code", "detail", "extra"}


# Behind PgBouncer there is no LISTEN: the stream must still wake well within its 15 s keep-alive.
@ALSO_THROUGH_PGBOUNCER
async def test_the_stream_sends_new_events_and_resumes_after_last_event_id(api: httpx.AsyncClient) -> None:
    await register(api, "s-0")
    await wait_until(lambda: _has(api, 1), what="the first event numbered")
    received: list[dict[str, str]] = []

    opened = asyncio.Event()

    async def listen(headers: dict[str, str], count: int) -> None:
        async with api.stream("GET", "/api/v1/events/stream", headers=headers) as response:
            assert response.status_code == 200
            opened.set()  # its start (the feed's end) was read before the answer began
            assert response.headers["content-type"].startswith("text/event-stream")
            async for message in sse(response):
                if "data" in message:
                    received.append(message)
                if len(received) == count:
                    return

    # Without Last-Event-ID: only what happens after connecting.
    listener = asyncio.create_task(listen({}, 2))
    await asyncio.wait_for(opened.wait(), 10)  # the stream is open before the next events
    await register(api, "s-1", "s-2")
    await asyncio.wait_for(listener, 10)

    assert [(m["id"], m["event"]) for m in received] == [("2", "task.event"), ("3", "task.event")]
    data = [json.loads(m["data"]) for m in received]
    assert [(d["id"], d["task_id"], d["kind"], d["client"], d["to_status"]) for d in data] == [
        (2, "s-1", "music", None, "submitted"),
        (3, "s-2", "music", None, "submitted"),
    ]

    received.clear()
    await register(api, "s-3")
    await asyncio.wait_for(listen({"Last-Event-ID": "1"}, 3), 10)
    assert [m["id"] for m in received] == ["2", "3", "4"]


async def _has(api: httpx.AsyncClient, count: int) -> bool:
    return len((await feed(api))["items"]) >= count


async def test_the_stream_needs_the_bearer_token_and_a_numeric_last_event_id(api: httpx.AsyncClient) -> None:
    anonymous = await api.get("/api/v1/events/stream", headers={"Authorization": ""})
    bad_id = await api.get("/api/v1/events/stream", headers={"Last-Event-ID": "abc"})
    too_big = await api.get("/api/v1/events/stream", headers={"Last-Event-ID": str(2**63)})

    assert anonymous.status_code == 401
    assert (bad_id.status_code, too_big.status_code) == (400, 400)
    for response in (bad_id, too_big):
        assert "last_event_id" in response.json()["detail"].lower().replace("-", "_")
