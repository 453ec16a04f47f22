"""POST /api/v1/tasks/batch: each item answered as the single route would, in order, one transaction."""

from __future__ import annotations

import httpx

from tests.api.test_clients import as_token, create
from tests.api.test_tasks import TASK_KEYS, db_rows
from tests.conftest import ALSO_THROUGH_PGBOUNCER

pytestmark = ALSO_THROUGH_PGBOUNCER


async def test_each_item_answers_as_the_single_route_would_in_request_order(
    api: httpx.AsyncClient, database_url: str
) -> None:
    assert (await api.post("/api/v1/tasks", json={"task_id": "old", "kind": "lyrics"})).status_code == 201
    tasks = [
        {"task_id": "new-1", "metadata": {"order": 1}},
        {"task_id": "old", "kind": "lyrics", "notify_hook": "http://127.0.0.1:9/hook"},
        {"task_id": "old", "kind": "stems"},
        {"task_id": "bad id"},
        {"task_id": "new-2", "kind": "video"},
        {"task_id": "new-3", "surprise": 1},
        7,
        {"task_id": "new-4", "relay": "nowhere"},
        {"task_id": "new-1"},
        {"task_id": "new-5", "kind": "stems", "notify_format": "relay"},
    ]

    response = await api.post("/api/v1/tasks/batch", json={"tasks": tasks})

    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [(item["task_id"], item["status_code"]) for item in items] == [
        ("new-1", 201), ("old", 200), ("old", 409), ("bad id", 400), ("new-2", 400),
        ("new-3", 400), (None, 400), ("new-4", 400), ("new-1", 200), ("new-5", 201),
    ]  # fmt: skip
    answered = [item for item in items if item["status_code"] < 300]
    assert all(set(item["task"]) == TASK_KEYS and "detail" not in item for item in answered)
    assert all(
        set(item) == {"task_id", "status_code", "detail"} for item in items if item["status_code"] >= 400
    )
    assert items[0]["task"]["metadata"] == {"order": 1}
    assert items[1]["task"]["notify_hook"] == "http://127.0.0.1:9/hook"
    assert (items[9]["task"]["kind"], items[9]["task"]["notify_format"]) == ("stems", "relay")
    assert "lyrics" in items[2]["detail"]
    for index, named in ((4, "kind"), (5, "surprise"), (7, "relay")):
        assert named in items[index]["detail"]
    rows = await db_rows(
        database_url,
        "SELECT t.task_id, e.seq, e.from_status, e.to_status, e.source FROM tasks t"
        " JOIN task_events e ON e.task_pk = t.id ORDER BY t.task_id",
    )
    assert [tuple(row) for row in rows] == [
        ("new-1", 1, None, "submitted", "register"),
        ("new-5", 1, None, "submitted", "register"),
        ("old", 1, None, "submitted", "register"),
    ]
    # A task registered through the batch reads back as one registered singly.
    single = (await api.get("/api/v1/tasks/new-1")).json()
    assert set(single.pop("timeline")) == {"submitted"}  # only GET /tasks/{task_id} has it
    assert single == items[0]["task"]


async def test_a_batch_is_bounded_and_shaped(api: httpx.AsyncClient) -> None:
    too_many = await api.post(
        "/api/v1/tasks/batch", json={"tasks": [{"task_id": f"t-{n}"} for n in range(501)]}
    )
    empty = await api.post("/api/v1/tasks/batch", json={"tasks": []})
    not_a_list = await api.post("/api/v1/tasks/batch", json={"items": []})

    assert (too_many.status_code, empty.status_code, not_a_list.status_code) == (400, 400, 400)
    assert "tasks" in too_many.json()["detail"] + str(too_many.json().get("extra"))
    largest = await api.post(
        "/api/v1/tasks/batch", json={"tasks": [{"task_id": f"t-{n}"} for n in range(500)]}
    )
    assert largest.status_code == 200
    assert [item["status_code"] for item in largest.json()["items"]] == [201] * 500


async def test_a_client_takes_one_registration_per_valid_item_and_sees_only_its_own(
    api: httpx.AsyncClient,
) -> None:
    issued = await create(api, "shop-a", rate=2)  # a bucket of 4
    assert (await api.post("/api/v1/tasks", json={"task_id": "t-0"})).status_code == 201  # the admin's own
    async with as_token(api, issued["token"]) as shop:
        tasks = [{"task_id": "bad id"}, *({"task_id": f"t-{n}"} for n in range(6))]
        first = await shop.post("/api/v1/tasks/batch", json={"tasks": tasks})
        second = await shop.post("/api/v1/tasks/batch", json={"tasks": [{"task_id": "t-9"}]})

    assert first.status_code == 200
    codes = [(item["task_id"], item["status_code"]) for item in first.json()["items"]]
    assert codes == [
        ("bad id", 400),
        ("t-0", 201),
        ("t-1", 201),
        ("t-2", 201),
        ("t-3", 201),
        ("t-4", 429),
        ("t-5", 429),
    ]
    assert "rate" in first.json()["items"][5]["detail"]
    assert "client" not in first.json()["items"][1]["task"]
    assert second.status_code == 429
    assert second.headers["Retry-After"] == "1"
    listed = (await api.get("/api/v1/tasks", params={"client": "shop-a"})).json()["items"]
    assert sorted(task["task_id"] for task in listed) == ["t-0", "t-1", "t-2", "t-3"]
