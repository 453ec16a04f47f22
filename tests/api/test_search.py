"""GET /tasks filters and the timeline of GET /tasks/{task_id}."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.api.test_tasks import db_rows


async def ids(api: httpx.AsyncClient, params: Any) -> list[str]:
    response = await api.get("/api/v1/tasks", params=params)
    assert response.status_code == 200, response.text
    return [task["task_id"] for task in response.json()["items"]]


async def register(api: httpx.AsyncClient, task_id: str, **body: Any) -> None:
    response = await api.post("/api/v1/tasks", json={"task_id": task_id, **body})
    assert response.status_code == 201, response.text


async def test_filters_combine(api: httpx.AsyncClient, database_url: str) -> None:
    await register(api, "ord_1", metadata={"order_id": "A-1", "shop": "eu"})
    await register(api, "ord_2", kind="lyrics", metadata={"order_id": "A-2", "shop": "eu"})
    await register(api, "ordx3", metadata={"order_id": 7, "shop": "us"})
    await register(api, "other", metadata=None)
    await api.delete("/api/v1/tasks/ord_2")
    past = datetime(2020, 1, 1, tzinfo=UTC)
    await db_rows(
        database_url, "UPDATE tasks SET created_at = $1, updated_at = $1 WHERE task_id = 'other'", past
    )

    assert await ids(api, {"metadata.order_id": "A-1"}) == ["ord_1"]
    assert await ids(api, {"metadata.shop": "eu"}) == ["ord_2", "ord_1"]
    assert await ids(api, {"metadata.shop": "eu", "metadata.order_id": "A-2"}) == ["ord_2"]
    assert await ids(api, {"metadata.order_id": "7"}) == []  # string equality: 7 is a number
    assert await ids(api, {"metadata.nope": "A-1"}) == []
    assert await ids(api, [("status", "submitted"), ("status", "cancelled")]) == [
        "other", "ordx3", "ord_2", "ord_1",
    ]  # fmt: skip
    assert await ids(api, {"status": "cancelled"}) == ["ord_2"]
    assert await ids(api, {"kind": "lyrics"}) == ["ord_2"]
    # `_` is a LIKE wildcard: ord_ must not match ordx3
    assert await ids(api, {"task_id_prefix": "ord_"}) == ["ord_2", "ord_1"]
    assert await ids(api, {"task_id_prefix": "ord"}) == ["ordx3", "ord_2", "ord_1"]
    cut = (past + timedelta(days=1)).isoformat()
    assert await ids(api, {"created_before": cut}) == ["other"]
    assert await ids(api, {"created_after": cut, "metadata.shop": "us"}) == ["ordx3"]
    assert await ids(api, {"updated_after": cut, "kind": "music"}) == ["ordx3", "ord_1"]


async def test_filters_page_with_the_cursor(api: httpx.AsyncClient) -> None:
    for n in range(5):
        await register(api, f"p-{n}", metadata={"batch": "b"})
    first = (await api.get("/api/v1/tasks", params={"metadata.batch": "b", "limit": 3})).json()
    second = (
        await api.get(
            "/api/v1/tasks", params={"metadata.batch": "b", "limit": 3, "cursor": first["next_cursor"]}
        )
    ).json()

    assert [t["task_id"] for t in first["items"] + second["items"]] == [f"p-{n}" for n in range(4, -1, -1)]
    assert second["next_cursor"] is None


async def test_several_statuses_page_newest_first_across_them(
    api: httpx.AsyncClient, database_url: str
) -> None:
    """Each status is read from its own index range and the ranges merged: pages interleave them by id,
    with the other filters applied to each."""
    for n in range(7):
        await register(api, f"s-{n}", kind="lyrics" if n != 3 else "music")
    await db_rows(database_url, "UPDATE tasks SET status = 'queued' WHERE task_id IN ('s-1', 's-4', 's-5')")
    await db_rows(
        database_url,
        "UPDATE tasks SET status = 'failed', next_poll_at = NULL WHERE task_id IN ('s-0', 's-3', 's-6')",
    )
    params: list[tuple[str, str | int]] = [
        ("status", "failed"), ("status", "queued"), ("status", "cancelled"), ("kind", "lyrics"), ("limit", 2),
    ]  # fmt: skip
    pages: list[list[str]] = []
    cursor = None
    while cursor is not None or not pages:
        body = (
            await api.get("/api/v1/tasks", params=params + ([("cursor", cursor)] if cursor else []))
        ).json()
        pages.append([task["task_id"] for task in body["items"]])
        cursor = body["next_cursor"]

    assert pages == [["s-6", "s-5"], ["s-4", "s-1"], ["s-0"]]


async def test_bad_filters_are_400s_naming_the_parameter(api: httpx.AsyncClient) -> None:
    cases = {
        "status": {"status": "done"},
        "created_after": {"created_after": "yesterday"},
        "updated_after": {"updated_after": "2026-11-29T10:00:00"},  # no offset
        "task_id_prefix": {"task_id_prefix": "a b"},
        "metadata.k": {"metadata.k": "x" * 1025},
        "metadata.": {"metadata.": "v"},
        "metadata: at most": {f"metadata.k{n}": "v" for n in range(9)},
        "metadata.z": {"metadata.z": "a\x00b"},
    }
    for named, params in cases.items():
        response = await api.get("/api/v1/tasks", params=params)
        assert response.status_code == 400, (named, response.text)
        assert named in response.json()["detail"], (named, response.json())


async def test_the_timeline_counts_seconds_per_status(api: httpx.AsyncClient, database_url: str) -> None:
    await register(api, "tl-1")
    await register(api, "tl-2")
    await api.delete("/api/v1/tasks/tl-2")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    # tl-2: submitted for 90 s, then cancelled (terminal: accrues nothing)
    await db_rows(
        database_url,
        "UPDATE task_events e SET at = $1::timestamptz + make_interval(secs => (e.seq - 1) * 90) "
        "FROM tasks t WHERE t.id = e.task_pk AND t.task_id = 'tl-2'",
        start,
    )

    live = (await api.get("/api/v1/tasks/tl-1")).json()
    done = (await api.get("/api/v1/tasks/tl-2")).json()
    listed = (await api.get("/api/v1/tasks")).json()["items"]

    assert set(live["timeline"]) == {"submitted"}
    assert 0 <= live["timeline"]["submitted"] < 30
    assert done["timeline"] == {"submitted": 90.0}
    assert all("timeline" not in task for task in listed)
