"""Bad input gets a 4xx naming the problem, never a 500; every error has one shape."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.api.conftest import CALLBACK_TOKEN, Edge
from tests.api.test_tasks import db_rows
from tests.conftest import ALSO_THROUGH_PGBOUNCER

pytestmark = ALSO_THROUGH_PGBOUNCER

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
DEEP = "[" * 1000 + "]" * 1000


def cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def bad_inputs(task_id: str) -> list[tuple[str, str, dict[str, Any], int, str]]:
    """(method, url, request kwargs, expected status, what the detail must name)"""
    nul = "a%00b"
    tasks = "/api/v1/tasks"
    callback = f"/api/v1/callbacks/suno/{CALLBACK_TOKEN}"
    deep_metadata = '{"task_id": "d", "metadata": {"x": ' + DEEP + "}}"
    metadata_65_deep = '{"task_id": "d", "metadata": ' + "[" * 64 + "]" * 64 + "}"
    deep_callback = '{"task_id": "a", "data": ' + DEEP + "}"
    nul_hook = {"task_id": "n", "notify_hook": "http://h/\u0000"}
    return [
        ("POST", tasks, {"content": deep_metadata}, 400, "metadata"),
        ("POST", tasks, {"content": metadata_65_deep}, 400, "metadata"),
        ("POST", tasks, {"json": {"task_id": "n", "metadata": {"k\u0000": 1}}}, 400, "metadata"),
        ("POST", tasks, {"json": {"task_id": "n", "metadata": {"k": ["v\u0000"]}}}, 400, "metadata.k.0"),
        ("POST", tasks, {"json": {"task_id": "n\u0000"}}, 400, "task_id"),
        ("POST", tasks, {"json": {"task_id": "n\n"}}, 400, "task_id"),
        ("GET", f"{tasks}/{task_id}%0A", {}, 404, "task_id"),
        ("POST", tasks, {"json": nul_hook}, 400, "notify_hook"),
        ("POST", tasks, {"json": {"task_id": "n", "kind\u0000": "music"}}, 400, "body"),
        ("GET", f"{tasks}/{nul}", {}, 404, "task_id"),
        ("GET", f"{tasks}/{nul}/events", {}, 404, "task_id"),
        ("POST", f"{tasks}/{nul}/refresh", {}, 404, "task_id"),
        ("DELETE", f"{tasks}/{nul}", {}, 404, "task_id"),
        ("GET", f"{tasks}/{nul}/deliveries", {}, 404, "task_id"),
        ("POST", f"{tasks}/{nul}/redeliver", {}, 404, "task_id"),
        ("POST", callback, {"json": {"task_id": "a\u0000"}}, 400, "task_id"),
        ("POST", callback, {"json": {"code": "success", "data": {"taskId": "a\u0000"}}}, 400, "data.taskId"),
        ("POST", callback, {"content": deep_callback}, 400, "data"),
        ("GET", f"{tasks}/{task_id}/events?after=2147483648", {}, 400, "after"),
        ("GET", f"{tasks}/{task_id}/events?after=99999999999999999999", {}, 400, "after"),
        ("GET", f"{tasks}/{task_id}/events?after=-1", {}, 400, "after"),
        ("POST", "/api/v1/deliveries/99999999999999999999/retry", {}, 404, "delivery_id"),
        ("POST", f"/api/v1/deliveries/{INT64_MAX + 1}/retry", {}, 404, "delivery_id"),
        ("POST", f"/api/v1/deliveries/{INT64_MAX}/retry", {}, 404, "delivery"),
        ("GET", tasks, {"params": {"cursor": cursor("t99999999999999999999")}}, 400, "cursor"),
        ("GET", tasks, {"params": {"cursor": cursor(f"t{INT64_MAX + 1}")}}, 400, "cursor"),
        ("GET", tasks, {"params": {"cursor": cursor("t-1")}}, 400, "cursor"),
        ("GET", "/api/v1/deliveries", {"params": {"cursor": cursor("d99999999999999999999")}}, 400, "cursor"),
        ("GET", tasks, {"params": {"limit": "99999999999999999999"}}, 400, "limit"),
    ]


async def test_each_bad_input_is_a_4xx_naming_it(edge: Edge, database_url: str) -> None:
    wrong = []
    for method, url, kwargs, status, named in bad_inputs(edge.task_ids[0]):
        response = await edge.client.request(method, url, **kwargs)
        body = response.json()
        if (response.status_code, set(body)) != (status, {"status_code", "detail", "extra"}) or (
            named not in body["detail"]
        ):
            wrong.append((method, url[:80], response.status_code, response.text[:200]))
    assert wrong == []
    # Nothing of it was written.
    assert len(await db_rows(database_url, "SELECT 1 FROM tasks")) == 2


async def test_the_largest_values_a_column_holds_are_accepted(edge: Edge) -> None:
    events = await edge.client.get(f"/api/v1/tasks/{edge.task_ids[0]}/events?after={INT32_MAX}")
    tasks = await edge.client.get("/api/v1/tasks", params={"cursor": cursor(f"t{INT64_MAX}")})

    assert (events.status_code, events.json()) == (200, {"items": []})
    assert tasks.status_code == 200
    assert [item["task_id"] for item in tasks.json()["items"]] == edge.task_ids[::-1]


async def test_metadata_64_levels_deep_is_accepted(edge: Edge) -> None:
    nested: Any = 1
    for _ in range(63):  # the body is the first level, metadata the second
        nested = [nested]
    response = await edge.client.post("/api/v1/tasks", json={"task_id": "deep", "metadata": {"x": nested[0]}})
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status"),
    [
        ("GET", "/api/v1/tasks", {"headers": {"Authorization": ""}}, 401),
        ("GET", "/api/v1/tasks", {"headers": {"Authorization": "Bearer"}}, 401),
        ("POST", "/api/v1/callbacks/suno/wrong-token", {"json": {"task_id": "x"}}, 401),
        ("GET", "/api/v1/no-such-route", {}, 404),
        ("GET", "/api/v1/tasks/not-tracked", {}, 404),
        ("POST", "/api/v1/deliveries/abc/retry", {}, 404),
        ("PUT", "/api/v1/tasks", {}, 405),
        ("POST", "/api/v1/tasks", {"content": b"x" * (1024 * 1024 + 1)}, 413),
        ("POST", "/api/v1/tasks", {"content": b"{not json"}, 400),
        ("POST", "/api/v1/tasks", {"json": {"task_id": "ok", "kind": "video"}}, 400),
        ("POST", "/api/v1/tasks/x/redeliver?all=maybe", {}, 400),
    ],
)
async def test_every_error_has_status_code_detail_and_extra(
    edge: Edge, method: str, url: str, kwargs: dict[str, Any], status: int
) -> None:
    response = await edge.client.request(method, url, **kwargs)

    assert response.status_code == status
    body = response.json()
    assert set(body) == {"status_code", "detail", "extra"}
    assert body["status_code"] == status
    assert isinstance(body["detail"], str)
    assert body["detail"]
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_query_parameter_is_named_as_the_client_wrote_it(edge: Edge) -> None:
    response = await edge.client.post(f"/api/v1/tasks/{edge.task_ids[0]}/redeliver", params={"all": "maybe"})

    assert response.status_code == 400
    assert response.json()["detail"].startswith("all: ")
    assert "all_" not in response.text


async def test_the_openapi_document_shows_every_bound(edge: Edge) -> None:
    schema = (await edge.client.get("/schema/openapi.json")).json()

    def parameter(path: str, method: str, name: str) -> dict[str, Any]:
        (found,) = [p for p in schema["paths"][path][method]["parameters"] if p["name"] == name]
        return dict(found["schema"])

    after = parameter("/api/v1/tasks/{task_id}/events", "get", "after")
    delivery_id = parameter("/api/v1/deliveries/{delivery_id}/retry", "post", "delivery_id")
    task_id = parameter("/api/v1/tasks/{task_id}/refresh", "post", "task_id")
    limit = parameter("/api/v1/deliveries", "get", "limit")
    assert (after["minimum"], after["maximum"]) == (0, INT32_MAX)
    assert (delivery_id["minimum"], delivery_id["maximum"]) == (1, INT64_MAX)
    assert (task_id["pattern"], task_id["minLength"], task_id["maxLength"]) == (
        "^[A-Za-z0-9_-]+$(?!\\n)",
        1,
        128,
    )
    assert (limit["minimum"], limit["maximum"]) == (1, 200)
    redeliver = schema["paths"]["/api/v1/tasks/{task_id}/redeliver"]["post"]
    assert "all" in [p["name"] for p in redeliver["parameters"]]
