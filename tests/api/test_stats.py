"""GET /stats, its chart series, and POST /deliveries/replay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from tests.api.conftest import Edge
from tests.api.test_tasks import db_rows


async def register(api: httpx.AsyncClient, *task_ids: str) -> None:
    for task_id in task_ids:
        assert (await api.post("/api/v1/tasks", json={"task_id": task_id})).status_code == 201


async def test_stats_document(api: httpx.AsyncClient, database_url: str) -> None:
    await register(api, "a", "b", "c", "d", "e")
    await api.delete("/api/v1/tasks/e")
    # a, b completed 60 s and 120 s after registration; c failed; d stays live, 30 s overdue.
    await db_rows(
        database_url,
        """UPDATE tasks SET status = v.status, next_poll_at = NULL, created_at = now() - v.took,
                            finished_at = now()
           FROM (VALUES ('a', 'complete', interval '60 s'), ('b', 'complete', interval '120 s'),
                        ('c', 'failed', interval '1 s')) AS v(id, status, took)
           WHERE task_id = v.id""",
    )
    await db_rows(database_url, "UPDATE tasks SET next_poll_at = now() - interval '30 s' WHERE task_id = 'd'")
    await db_rows(
        database_url,
        """INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body, status, created_at)
           SELECT id, 1, 'w-' || task_id, 'http://127.0.0.1:9/', '', s, now() - interval '5 min'
           FROM tasks, unnest(ARRAY['pending', 'dead']) WITH ORDINALITY AS u(s, n)
           WHERE task_id = (ARRAY['a', 'b'])[n]""",
    )
    await db_rows(
        database_url,
        """INSERT INTO delivery_attempts (delivery_id, attempt, status_code, at)
           SELECT id, 1, code, now() - interval '1 min'
           FROM deliveries, unnest(ARRAY[200, 500, 503, 204]) AS code""",
    )

    response = await api.get("/api/v1/stats")

    assert response.status_code == 200
    body = response.json()
    assert body["tasks"] == {
        "by_status": {"submitted": 1, "queued": 0, "in_progress": 0, "complete": 2, "failed": 1,
                      "timed_out": 0, "cancelled": 1},
        "by_kind": {"music": 5, "lyrics": 0, "stems": 0},
    }  # fmt: skip
    assert body["finished_last_hour"] == {"complete": 2, "failed": 1, "timed_out": 0}
    assert body["time_to_complete_s"] == {"p50": 90.0, "p95": 117.0}
    assert body["deliveries"]["by_status"] == {"pending": 1, "delivered": 0, "failed": 0, "dead": 1}
    assert body["deliveries"]["success_rate_last_hour"] == 0.5
    assert body["deliveries"]["oldest_pending_at"] is not None
    assert 29 < body["poll_lag_s"]["p99"] < 60
    assert set(body) == {"tasks", "finished_last_hour", "time_to_complete_s", "deliveries", "poll_lag_s"}


async def test_series_has_sixty_minutes_and_twenty_four_hours(
    api: httpx.AsyncClient, database_url: str
) -> None:
    await register(api, "a", "b")
    await api.delete("/api/v1/tasks/b")
    await db_rows(database_url, "UPDATE task_events SET at = now() - interval '3 hours' WHERE seq = 1")
    await db_rows(
        database_url,
        "UPDATE tasks SET status = 'complete', next_poll_at = NULL, finished_at = now(), "
        "created_at = now() - interval '10 s' WHERE task_id = 'a'",
    )

    body = (await api.get("/api/v1/stats/series")).json()

    minutes, hours = body["transitions_per_minute"], body["time_to_complete_s"]
    assert (len(minutes), len(hours)) == (60, 24)
    assert sum(m["count"] for m in minutes) == 1  # b's cancellation; the registrations are 3 h old
    assert minutes[-1]["count"] == 1 or minutes[-2]["count"] == 1
    assert hours[-1] == {"at": hours[-1]["at"], "count": 1, "p50": 10.0, "p95": 10.0}


async def test_replay_requeues_every_match_and_answers_the_count(edge: Edge, database_url: str) -> None:
    api = edge.client
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    await db_rows(database_url, "UPDATE deliveries SET status = 'dead', next_attempt_at = NULL")

    delivered_only = await api.post(
        "/api/v1/deliveries/replay", json={"since": since, "status": ["delivered"]}
    )
    other_task = await api.post(
        "/api/v1/deliveries/replay", json={"since": since, "task_ids": [edge.task_ids[1]]}
    )
    empty_window = await api.post("/api/v1/deliveries/replay", json={"since": since, "until": since})
    replayed = await api.post("/api/v1/deliveries/replay", json={"since": since})
    again = await api.post("/api/v1/deliveries/replay", json={"since": since})
    await db_rows(database_url, "UPDATE deliveries SET status = 'delivered', next_attempt_at = NULL")
    without_flag = await api.post("/api/v1/deliveries/replay", json={"since": since, "status": ["delivered"]})
    with_flag = await api.post(
        "/api/v1/deliveries/replay", json={"since": since, "status": ["failed"], "include_delivered": True}
    )

    # `delivered` counts only with include_delivered, which adds it to the statuses.
    assert [r.json() for r in (delivered_only, other_task, empty_window)] == [{"requeued": 0}] * 3
    assert (replayed.status_code, replayed.json()) == (202, {"requeued": 1})
    assert again.json() == {"requeued": 0}  # pending now
    assert (without_flag.json(), with_flag.json()) == ({"requeued": 0}, {"requeued": 1})
    rows = await db_rows(database_url, "SELECT status, attempts, next_attempt_at FROM deliveries")
    assert [(r["status"], r["attempts"], r["next_attempt_at"] is not None) for r in rows] == [
        ("pending", 0, True)
    ]


async def test_replay_bad_bodies_are_400s(api: httpx.AsyncClient) -> None:
    now = datetime.now(UTC).isoformat()
    cases = [
        {},
        {"since": "2026-11-29T10:00:00"},  # no offset
        {"since": now, "include_delivered": 1},  # a boolean, not a number
        {"since": now, "status": ["delivered", "delivered", "dead", "failed"]},
        {"since": now, "status": ["pending"]},
        {"since": now, "status": []},
        {"since": now, "extra": 1},
        {"since": now, "task_ids": ["a b"]},
    ]
    for body in cases:
        response = await api.post("/api/v1/deliveries/replay", json=body)
        assert response.status_code == 400, (body, response.text)
