from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ALSO_THROUGH_PGBOUNCER

pytestmark = ALSO_THROUGH_PGBOUNCER

TASK_KEYS = {
    "task_id", "kind", "status", "upstream_status", "progress", "fail_reason", "notify_hook",
    "notify_format", "metadata", "clips", "created_at", "updated_at", "finished_at",
    "last_polled_at", "next_poll_at", "poll_count", "last_error", "notify_hook_source", "relay", "client",
    "lyrics",
}  # fmt: skip


async def db_rows(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        return await connection.fetch(query, *args)
    finally:
        await connection.close()


async def test_register_returns_the_task_and_records_the_registration_event(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/api/v1/tasks",
        json={"task_id": "task_0123456789abcdef0123456789abcdef", "metadata": {"order": 7}},
    )

    assert response.status_code == 201
    body = response.json()
    assert set(body) == TASK_KEYS
    assert (body["task_id"], body["kind"], body["status"], body["metadata"], body["clips"]) == (
        "task_0123456789abcdef0123456789abcdef", "music", "submitted", {"order": 7}, [],
    )  # fmt: skip
    assert body["created_at"].endswith("Z")
    events = (await api.get(f"/api/v1/tasks/{body['task_id']}/events")).json()["items"]
    assert [(e["seq"], e["type"], e["from_status"], e["to_status"], e["source"]) for e in events] == [
        (1, "transition", None, "submitted", "register")
    ]


async def test_registering_again_is_idempotent_and_updates_the_hook(
    api: httpx.AsyncClient, database_url: str
) -> None:
    first = await api.post("/api/v1/tasks", json={"task_id": "t-1", "kind": "lyrics"})
    again = await api.post(
        "/api/v1/tasks", json={"task_id": "t-1", "kind": "lyrics", "notify_hook": "http://127.0.0.1:9/hook"}
    )
    other_kind = await api.post("/api/v1/tasks", json={"task_id": "t-1", "kind": "stems"})

    assert (first.status_code, again.status_code, other_kind.status_code) == (201, 200, 409)
    assert again.json()["notify_hook"] == "http://127.0.0.1:9/hook"
    assert (first.json()["notify_hook_source"], again.json()["notify_hook_source"]) == (None, "client")
    assert (first.json()["notify_format"], again.json()["notify_format"]) == ("sunotrack", "sunotrack")
    assert "lyrics" in other_kind.json()["detail"]
    assert len(await db_rows(database_url, "SELECT 1 FROM task_events")) == 1


async def test_twenty_concurrent_registrations_make_one_row_and_one_event(
    api: httpx.AsyncClient, database_url: str
) -> None:
    responses = await asyncio.gather(
        *(api.post("/api/v1/tasks", json={"task_id": "same-task"}) for _ in range(20))
    )

    assert sorted(r.status_code for r in responses) == [200] * 19 + [201]
    assert len(await db_rows(database_url, "SELECT 1 FROM tasks")) == 1
    assert len(await db_rows(database_url, "SELECT 1 FROM task_events")) == 1


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, "task_id"),
        ({"task_id": ""}, "task_id"),
        ({"task_id": "x" * 129}, "task_id"),
        ({"task_id": "has space"}, "task_id"),
        ({"task_id": "ok", "kind": "video"}, "kind"),
        ({"task_id": "ok", "notify_hook": "not a url"}, "notify_hook"),
        ({"task_id": "ok", "notify_hook": "ftp://example.com/x"}, "notify_hook"),
        ({"task_id": "ok", "notify_hook": "/relative/path"}, "notify_hook"),
        ({"task_id": "ok", "notify_hook": "http://127.0.0.1:0/hook"}, "notify_hook"),
        ({"task_id": "ok", "notify_format": "xml"}, "notify_format"),
        ({"task_id": "ok", "metadata": "nope"}, "metadata"),
        ({"task_id": "ok", "metadata": {"blob": "x" * 16_400}}, "metadata"),
        ({"task_id": "ok", "surprise": 1}, "surprise"),
    ],
)
async def test_each_invalid_registration_is_refused_naming_the_field(
    api: httpx.AsyncClient, database_url: str, body: dict[str, Any], named: str
) -> None:
    response = await api.post("/api/v1/tasks", json=body)

    assert response.status_code in (400, 422), response.text
    assert named in response.json()["detail"]
    assert await db_rows(database_url, "SELECT 1 FROM tasks") == []


async def test_a_body_that_is_not_json_is_refused(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/api/v1/tasks", content=b"{not json", headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 400


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdC1hZG1pbi10b2tlbg=="}],
)
async def test_the_api_needs_the_admin_token(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/api/v1/tasks"), ("POST", "/api/v1/tasks"), ("GET", "/api/v1/tasks/x")):
        response = await api.request(
            method, path, headers=headers | {"Authorization": headers.get("Authorization", "")}
        )
        assert response.status_code == 401, (method, path)


async def test_health_readiness_and_schema_are_public(api: httpx.AsyncClient) -> None:
    anonymous = {"Authorization": ""}
    assert (await api.get("/healthz", headers=anonymous)).json() == {"status": "ok"}
    assert (await api.get("/readyz", headers=anonymous)).status_code == 200
    schema = (await api.get("/schema/openapi.json", headers=anonymous)).json()
    assert "/api/v1/tasks" in schema["paths"]


async def test_an_unknown_task_is_404(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/v1/tasks/nope")).status_code == 404
    assert (await api.get("/api/v1/tasks/nope/events")).status_code == 404


async def test_pages_cover_every_task_once_newest_first_while_tasks_are_added(api: httpx.AsyncClient) -> None:
    for number in range(25):
        kind = "lyrics" if number % 5 == 0 else "music"
        assert (
            await api.post("/api/v1/tasks", json={"task_id": f"t{number:02}", "kind": kind})
        ).status_code == 201

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 10} | ({"cursor": cursor} if cursor else {})
        page = (await api.get("/api/v1/tasks", params=params)).json()
        seen += [item["task_id"] for item in page["items"]]
        pages += 1
        if pages == 1:
            # A task registered mid-listing lands before the cursor and must not shift later pages.
            await api.post("/api/v1/tasks", json={"task_id": "late"})
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert seen == [f"t{number:02}" for number in reversed(range(25))]
    lyrics = (await api.get("/api/v1/tasks", params={"kind": "lyrics"})).json()
    assert [item["task_id"] for item in lyrics["items"]] == ["t20", "t15", "t10", "t05", "t00"]
    assert lyrics["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"cursor": "garbage!"}, "cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"status": "done"}, "status"),
        ({"kind": "video"}, "kind"),
    ],
)
async def test_bad_list_parameters_are_refused_naming_them(
    api: httpx.AsyncClient, params: dict[str, Any], named: str
) -> None:
    response = await api.get("/api/v1/tasks", params=params)

    assert response.status_code == 400
    assert named in response.json()["detail"]


async def register(api: httpx.AsyncClient, task_id: str, kind: str) -> None:
    response = await api.post("/api/v1/tasks", json={"task_id": task_id, "kind": kind})
    assert response.status_code == 201, response.text


async def list_task_ids(api: httpx.AsyncClient, *, limit: int = 50, **filters: str) -> list[str]:
    """Every task the listing returns for `filters`, page by page through the cursor."""
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        params: dict[str, Any] = {**filters, "limit": limit} | ({"cursor": cursor} if cursor else {})
        response = await api.get("/api/v1/tasks", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= limit
        for item in page["items"]:
            for name, value in filters.items():
                assert item[name] == value, (filters, item)
        seen += [item["task_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError(f"the listing of {filters} did not end")


async def test_filters_find_live_and_finished_tasks_newest_first(api: httpx.AsyncClient) -> None:
    # Even numbers are lyrics, odd ones music; every third task is cancelled (a finished task), so
    # each kind has live and finished tasks interleaved in registration order.
    numbers = range(16)
    kinds = {f"t{n:02}": "lyrics" if n % 2 == 0 else "music" for n in numbers}
    for task_id, kind in kinds.items():
        await register(api, task_id, kind)
    cancelled = {f"t{n:02}" for n in numbers if n % 3 == 0}
    # Cancelled out of registration order: the listing's order is the registration's.
    for task_id in ("t09", "t00", "t15", "t06", "t12", "t03"):
        response = await api.delete(f"/api/v1/tasks/{task_id}")
        assert (response.status_code, response.json()["status"]) == (200, "cancelled")

    def newest_first(wanted: set[str]) -> list[str]:
        return sorted(wanted, reverse=True)

    live = set(kinds) - cancelled
    lyrics = {task_id for task_id, kind in kinds.items() if kind == "lyrics"}
    music = set(kinds) - lyrics
    assert await list_task_ids(api, status="cancelled") == newest_first(cancelled)
    assert await list_task_ids(api, status="submitted") == newest_first(live)
    assert await list_task_ids(api, kind="lyrics") == newest_first(lyrics)
    assert await list_task_ids(api, kind="music") == newest_first(music)
    assert await list_task_ids(api, kind="lyrics", status="cancelled") == newest_first(lyrics & cancelled)
    assert await list_task_ids(api, kind="music", status="submitted") == newest_first(music & live)
    assert await list_task_ids(api, status="complete") == []
    assert await list_task_ids(api) == newest_first(set(kinds))


async def test_paging_a_filter_returns_every_live_and_finished_match_once_in_order(
    api: httpx.AsyncClient,
) -> None:
    for n in range(12):
        kind = "lyrics" if n % 2 == 0 else "music"
        await register(api, f"t{n:02}", kind)
    for task_id in ("t00", "t04", "t06", "t09", "t10"):
        assert (await api.delete(f"/api/v1/tasks/{task_id}")).status_code == 200

    # Lyrics: t10 cancelled, t08 live, t06 and t04 cancelled, t02 live, t00 cancelled. Pages of any
    # size cross between live and finished tasks.
    for limit in (1, 2, 3, 5):
        assert await list_task_ids(api, kind="lyrics", limit=limit) == [
            "t10", "t08", "t06", "t04", "t02", "t00",
        ], limit  # fmt: skip
        assert await list_task_ids(api, status="cancelled", limit=limit) == [
            "t10", "t09", "t06", "t04", "t00",
        ], limit  # fmt: skip
        assert await list_task_ids(api, status="submitted", limit=limit) == [
            "t11", "t08", "t07", "t05", "t03", "t02", "t01",
        ], limit  # fmt: skip
