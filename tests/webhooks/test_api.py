"""The deliveries API over the real app, with rows seeded straight into the database."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert

from service.config import Settings
from service.db import SessionMaker, transaction
from service.models import Delivery, DeliveryAttempt, HookHost
from tests.conftest import ALSO_THROUGH_PGBOUNCER
from tests.webhooks.conftest import Receiver, add_task, deliveries, running_dispatcher, settled

pytestmark = ALSO_THROUGH_PGBOUNCER

DELIVERY_KEYS = {
    "id", "task_id", "event_seq", "webhook_id", "url", "status", "attempts", "next_attempt_at",
    "last_status_code", "last_error", "created_at", "delivered_at",
}  # fmt: skip
ATTEMPT_KEYS = {
    "attempt", "at", "duration_ms", "status_code", "error_class", "error", "response_body", "next_attempt_at",
}  # fmt: skip
STATUSES = ["delivered", "failed", "dead", "pending", "dead"]


async def seed(sessions: SessionMaker, task_id: str, hook: str, statuses: list[str]) -> list[int]:
    """One delivery per status (event seqs 2, 3, ...), each settled one with a failed first attempt."""
    pk = await add_task(sessions, task_id, hook)
    now = datetime.now(UTC)
    ids = []
    async with transaction(sessions) as session:
        for n, status in enumerate(statuses):
            settled_ = status in ("delivered", "dead")
            values: dict[str, Any] = {
                "task_pk": pk,
                "event_seq": n + 2,
                "webhook_id": f"msg_{task_id}_{n}",
                "url": hook,
                "body": b'{"n": %d}' % n,
                "status": status,
                "attempts": 0 if status == "pending" else 2,
                "next_attempt_at": None if settled_ else now + timedelta(hours=1),
                "last_status_code": 500 if status != "pending" else None,
            }
            delivery_id = (
                await session.execute(insert(Delivery).values(values).returning(Delivery.id))
            ).scalar_one()
            ids.append(delivery_id)
            if status != "pending":
                await session.execute(
                    insert(DeliveryAttempt).values(
                        delivery_id=delivery_id, attempt=1, at=now, duration_ms=3.5, status_code=500,
                        response_body="nope", next_attempt_at=now + timedelta(seconds=5),
                    )
                )  # fmt: skip
    return ids


async def test_task_deliveries_come_with_their_attempt_logs(
    api: httpx.AsyncClient, sessions: SessionMaker
) -> None:
    ids = await seed(sessions, "task-1", "http://127.0.0.1:9/hook", ["dead", "pending"])

    response = await api.get("/api/v1/tasks/task-1/deliveries")

    assert response.status_code == 200
    items = response.json()["items"]
    assert [item["id"] for item in items] == ids
    assert all(set(item) == DELIVERY_KEYS | {"attempt_log"} for item in items)
    dead, pending = items
    assert (dead["status"], dead["task_id"], dead["event_seq"], dead["webhook_id"]) == (
        "dead", "task-1", 2, "msg_task-1_0",
    )  # fmt: skip
    [attempt] = dead["attempt_log"]
    assert set(attempt) == ATTEMPT_KEYS
    assert (attempt["attempt"], attempt["status_code"], attempt["response_body"]) == (1, 500, "nope")
    assert attempt["at"].endswith("Z")
    assert pending["attempt_log"] == []


async def test_unknown_task_is_404(api: httpx.AsyncClient) -> None:
    for response in (
        await api.get("/api/v1/tasks/nope/deliveries"),
        await api.post("/api/v1/tasks/nope/redeliver"),
        await api.post("/api/v1/deliveries/999/retry"),
    ):
        assert response.status_code == 404
        assert "nope" in response.json()["detail"] or "999" in response.json()["detail"]


async def test_listing_filters_by_status_and_pages_newest_first(
    api: httpx.AsyncClient, sessions: SessionMaker
) -> None:
    ids = await seed(sessions, "task-1", "http://127.0.0.1:9/a", STATUSES)
    ids += await seed(sessions, "task-2", "http://127.0.0.1:9/b", STATUSES)
    dead = [i for i, status in zip(ids, STATUSES * 2, strict=True) if status == "dead"][::-1]

    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"status": "dead", "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/api/v1/deliveries", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        assert all(set(item) == DELIVERY_KEYS and item["status"] == "dead" for item in page["items"])
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == dead

    everything = (await api.get("/api/v1/deliveries", params={"limit": 200})).json()
    assert [item["id"] for item in everything["items"]] == ids[::-1]
    assert everything["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "named"),
    [({"status": "lost"}, "status"), ({"cursor": "garbage!"}, "cursor"), ({"limit": 0}, "limit")],
)
async def test_bad_listing_parameters_are_400_naming_the_problem(
    api: httpx.AsyncClient, params: dict[str, Any], named: str
) -> None:
    response = await api.get("/api/v1/deliveries", params=params)
    assert response.status_code == 400
    assert named in response.json()["detail"]


async def test_redeliver_requeues_failed_and_dead_or_everything_with_all(
    api: httpx.AsyncClient, sessions: SessionMaker
) -> None:
    ids = await seed(sessions, "task-1", "http://127.0.0.1:9/hook", STATUSES)

    response = await api.post("/api/v1/tasks/task-1/redeliver")

    assert response.status_code == 202
    requeued = [ids[1], ids[2], ids[4]]
    assert [item["id"] for item in response.json()["items"]] == requeued
    rows = {row.id: row for row in await deliveries(sessions)}
    assert [rows[i].status for i in ids] == ["delivered", "pending", "pending", "pending", "pending"]
    assert all(rows[i].attempts == 0 and rows[i].next_attempt_at is not None for i in requeued)

    response = await api.post("/api/v1/tasks/task-1/redeliver", params={"all": "true"})
    assert [item["id"] for item in response.json()["items"]] == ids
    assert {row.status for row in await deliveries(sessions)} == {"pending"}


async def test_retry_requeues_one_delivery(api: httpx.AsyncClient, sessions: SessionMaker) -> None:
    ids = await seed(sessions, "task-1", "http://127.0.0.1:9/hook", ["dead", "dead"])

    response = await api.post(f"/api/v1/deliveries/{ids[0]}/retry")

    assert response.status_code == 202
    body = response.json()
    assert set(body) == DELIVERY_KEYS
    assert (body["id"], body["status"], body["attempts"]) == (ids[0], "pending", 0)
    assert [row.status for row in await deliveries(sessions)] == ["pending", "dead"]


async def test_hook_hosts_show_the_circuit_breaker(api: httpx.AsyncClient, sessions: SessionMaker) -> None:
    later = datetime.now(UTC) + timedelta(minutes=1)
    async with transaction(sessions) as session:
        await session.execute(
            insert(HookHost).values(
                [
                    {"host": "down.example", "consecutive_failures": 25, "paused_until": later},
                    {"host": "flaky.example", "consecutive_failures": 2, "paused_until": None},
                ]
            )
        )

    items = (await api.get("/api/v1/hooks/hosts")).json()["items"]

    assert [(i["host"], i["consecutive_failures"], i["paused"]) for i in items] == [
        ("down.example", 25, True), ("flaky.example", 2, False),
    ]  # fmt: skip


async def test_the_routes_need_the_admin_token(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/v1/deliveries", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401


async def test_a_redelivered_webhook_reaches_the_receiver_again_with_its_webhook_id(
    api: httpx.AsyncClient, make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    """The API commits the re-queue; its NOTIFY wakes a dispatcher running elsewhere (here, in the test)."""
    [delivery_id] = await seed(sessions, "task-1", receiver.url, ["dead"])
    async with running_dispatcher(make_settings(SUNOTRACK_WEBHOOK_SWEEP_S="60")):
        response = await api.post("/api/v1/tasks/task-1/redeliver")
        assert response.status_code == 202
        [row] = await settled(sessions, 1, timeout=5)

    assert (row.id, row.status, row.attempts) == (delivery_id, "delivered", 1)
    assert receiver.ids() == ["msg_task-1_0"]
