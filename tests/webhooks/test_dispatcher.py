from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable

from aiohttp import web
from standardwebhooks import Webhook

from service.config import Settings
from service.db import SessionMaker
from tests.webhooks.conftest import (
    SECRET_NEW,
    SECRET_OLD,
    Receiver,
    add_task,
    attempts,
    deliveries,
    enqueue,
    notice,
    running_dispatcher,
    settled,
    wait_until,
)

BODY_KEYS = {"type", "timestamp", "data"}
DATA_KEYS = {
    "task_id", "kind", "seq", "status", "previous_status", "progress", "fail_reason", "clips", "lyrics",
    "metadata",
}  # fmt: skip
CLIP = {
    "id": "c-1", "status": "complete", "title": "Song", "audio_url": "https://cdn.example/a.mp3",
    "image_url": None, "image_large_url": None, "video_url": None, "model_name": "chirp-v4",
    "duration": 12.5, "error": None,
}  # fmt: skip


async def test_one_verified_delivery_per_notice_signed_with_every_rotated_secret(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    """A long sweep interval keeps the sweep out of it: the NOTIFY at commit is what wakes the dispatcher."""
    settings = make_settings(
        SUNOTRACK_WEBHOOK_SECRET=f"{SECRET_OLD} {SECRET_NEW}", SUNOTRACK_WEBHOOK_SWEEP_S="60"
    )
    pk = await add_task(sessions, "task-1", receiver.url)
    async with running_dispatcher(settings):
        await enqueue(
            sessions,
            [
                notice(pk, receiver.url, seq=2, status="queued", metadata={"order": 7}),
                notice(pk, receiver.url, seq=4, status="in_progress", previous="queued"),
                notice(pk, receiver.url, seq=5, status="complete", previous="in_progress", clips=[CLIP]),
            ],
        )
        rows = await settled(sessions, 3, timeout=5)

    assert [row.status for row in rows] == ["delivered"] * 3
    assert sorted(receiver.ids()) == sorted(row.webhook_id for row in rows)
    by_id = {r.headers["webhook-id"]: r for r in receiver.received}
    bodies = []
    for secret in (SECRET_OLD, SECRET_NEW):
        for received in receiver.received:
            assert Webhook(secret).verify(received.body, received.headers) == json.loads(received.body)
    for row in rows:
        received = by_id[row.webhook_id]
        assert received.body == row.body
        assert received.headers["Content-Type"] == "application/json"
        assert len(received.headers["webhook-signature"].split(" ")) == 2
        bodies.append(json.loads(received.body))
    assert all(set(body) == BODY_KEYS and set(body["data"]) == DATA_KEYS for body in bodies)
    assert [(b["data"]["seq"], b["data"]["status"], b["data"]["previous_status"]) for b in bodies] == [
        (2, "queued", "submitted"), (4, "in_progress", "queued"), (5, "complete", "in_progress"),
    ]  # fmt: skip
    assert bodies[0]["type"] == "task.status_changed"
    assert bodies[0]["timestamp"] == "2026-01-02T03:04:05.678000Z"
    assert (bodies[0]["data"]["metadata"], bodies[1]["data"]["metadata"]) == ({"order": 7}, {})
    assert bodies[2]["data"]["clips"] == [CLIP]
    log = await attempts(sessions, rows[0].id)
    assert [(a.attempt, a.status_code, a.error_class, a.response_body, a.next_attempt_at) for a in log] == [
        (1, 200, None, "ok", None)
    ]
    assert (rows[0].attempts, rows[0].next_attempt_at, rows[0].delivered_at is not None) == (1, None, True)


async def test_enqueueing_the_same_event_twice_sends_it_once(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    pk = await add_task(sessions, "task-1", receiver.url)
    async with running_dispatcher(make_settings()):
        await enqueue(sessions, [notice(pk, receiver.url, seq=2)])
        await enqueue(sessions, [notice(pk, receiver.url, seq=2)])
        await settled(sessions, 1)
    assert len(receiver.received) == 1


async def test_relay_format_sends_the_relay_object_verbatim_or_an_equivalent(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    relay_object = b'{"task_id":"task-1","status":"SUCCESS","progress":"100%","data":[]}'
    pk = await add_task(sessions, "task-1", receiver.url, notify_format="relay")
    async with running_dispatcher(make_settings()):
        await enqueue(
            sessions,
            [
                notice(pk, receiver.url, seq=2, notify_format="relay", relay_payload=relay_object),
                notice(pk, receiver.url, seq=3, status="timed_out", previous="queued", notify_format="relay"),
            ],
        )
        await settled(sessions, 2)
    by_seq = {row.event_seq: row for row in await deliveries(sessions)}
    bodies = {r.headers["webhook-id"]: r.body for r in receiver.received}
    assert bodies[by_seq[2].webhook_id] == relay_object
    built = json.loads(bodies[by_seq[3].webhook_id])
    assert (built["task_id"], built["action"], built["status"], built["progress"], built["data"]) == (
        "task-1", "MUSIC", "FAILURE", "0%", [],
    )  # fmt: skip


async def test_a_receiver_failing_its_first_calls_gets_the_delivery_on_a_retry(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    async def fail_twice(_: web.Request, call: int) -> web.StreamResponse:
        if call <= 2:
            return web.Response(status=500, text=f"boom {call}")
        return web.Response(status=204)

    receiver.behaviour = fail_twice
    pk = await add_task(sessions, "task-1", receiver.url)
    async with running_dispatcher(make_settings(SUNOTRACK_WEBHOOK_RETRY_SCHEDULE="0.05,0.1,0.1")):
        await enqueue(sessions, [notice(pk, receiver.url)])
        [row] = await settled(sessions, 1)

    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("delivered", 3, 204, None)
    assert len(set(receiver.ids())) == 1
    assert len(receiver.received) == 3
    log = await attempts(sessions, row.id)
    assert [(a.attempt, a.status_code, a.response_body) for a in log] == [
        (1, 500, "boom 1"), (2, 500, "boom 2"), (3, 204, ""),
    ]  # fmt: skip
    assert log[0].next_attempt_at is not None
    assert log[2].next_attempt_at is None
    # Jitter only ever adds to the scheduled delay.
    assert (log[1].at - log[0].at).total_seconds() >= 0.05
    assert (log[2].at - log[1].at).total_seconds() >= 0.1
    assert all(a.duration_ms is not None and a.duration_ms > 0 for a in log)


async def test_a_receiver_that_is_down_then_comes_back_gets_the_delivery(
    make_settings: Callable[..., Settings], sessions: SessionMaker
) -> None:
    down = Receiver()
    await down.start()
    port = down.port
    await down.stop()
    hook = f"http://127.0.0.1:{port}/hook"
    pk = await add_task(sessions, "task-1", hook)
    back = Receiver(port=port)
    settings = make_settings(SUNOTRACK_WEBHOOK_RETRY_SCHEDULE="0.05,0.1,0.2,0.4,0.8,1.6")
    try:
        async with running_dispatcher(settings):
            await enqueue(sessions, [notice(pk, hook)])

            async def failed_twice() -> bool:
                rows = await deliveries(sessions)
                return bool(rows) and rows[0].attempts >= 2

            await wait_until(failed_twice, what="two failed attempts")
            await back.start()
            [row] = await settled(sessions, 1)
    finally:
        await back.stop()

    assert row.status == "delivered"
    log = await attempts(sessions, row.id)
    assert {a.error_class for a in log[:-1]} == {"connect"}
    assert log[-1].status_code == 200
    assert len(back.received) == 1


async def test_410_is_recorded_and_not_retried(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    async def gone(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=410, text="unsubscribed")

    receiver.behaviour = gone
    pk = await add_task(sessions, "task-1", receiver.url)
    async with running_dispatcher(make_settings()):
        await enqueue(sessions, [notice(pk, receiver.url)])
        [row] = await settled(sessions, 1)
        await asyncio.sleep(0.3)  # longer than the whole retry schedule: nothing else may arrive

    assert (row.status, row.attempts, row.last_status_code, row.next_attempt_at) == ("dead", 1, 410, None)
    assert len(receiver.received) == 1


async def test_retry_after_on_429_stretches_the_schedule(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    async def busy_once(_: web.Request, call: int) -> web.StreamResponse:
        if call == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(text="ok")

    receiver.behaviour = busy_once
    pk = await add_task(sessions, "task-1", receiver.url)
    async with running_dispatcher(make_settings(SUNOTRACK_WEBHOOK_RETRY_SCHEDULE="0.05")):
        await enqueue(sessions, [notice(pk, receiver.url)])
        [row] = await settled(sessions, 1)

    assert row.status == "delivered"
    first, second = receiver.received
    assert second.at - first.at >= 1.0


async def test_the_last_failed_attempt_makes_the_delivery_dead(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    async def broken(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=503, text="x" * 10_000)

    receiver.behaviour = broken
    pk = await add_task(sessions, "task-1", receiver.url)
    async with running_dispatcher(make_settings(SUNOTRACK_WEBHOOK_RETRY_SCHEDULE="0.05,0.05")):
        await enqueue(sessions, [notice(pk, receiver.url)])
        [row] = await settled(sessions, 1)

    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("dead", 3, 503, "HTTP 503")
    assert row.next_attempt_at is None
    log = await attempts(sessions, row.id)
    assert [a.attempt for a in log] == [1, 2, 3]
    assert [a.next_attempt_at is None for a in log] == [False, False, True]
    assert {len(a.response_body or "") for a in log} == {4096}
    assert len(receiver.received) == 3


async def test_a_slow_receiver_times_out(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    async def slow(_: web.Request, __: int) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response()

    receiver.behaviour = slow
    pk = await add_task(sessions, "task-1", receiver.url)
    settings = make_settings(SUNOTRACK_WEBHOOK_RETRY_SCHEDULE="", SUNOTRACK_WEBHOOK_TIMEOUT_S="0.2")
    async with running_dispatcher(settings):
        await enqueue(sessions, [notice(pk, receiver.url)])
        [row] = await settled(sessions, 1)
    [attempt] = await attempts(sessions, row.id)
    assert (row.status, attempt.error_class, attempt.status_code) == ("dead", "timeout", None)
    assert 150 < (attempt.duration_ms or 0) < 2000


async def test_a_receiver_stalling_mid_body_times_out(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    """The timeout is total: a quick status line does not buy an answer that never finishes."""

    async def stall(request: web.Request, __: int) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_length = 100
        await response.prepare(request)
        await response.write(b"partial")
        await asyncio.sleep(5)
        return response

    receiver.behaviour = stall
    pk = await add_task(sessions, "task-1", receiver.url)
    settings = make_settings(SUNOTRACK_WEBHOOK_RETRY_SCHEDULE="", SUNOTRACK_WEBHOOK_TIMEOUT_S="0.3")
    async with running_dispatcher(settings):
        await enqueue(sessions, [notice(pk, receiver.url)])
        [row] = await settled(sessions, 1)
    [attempt] = await attempts(sessions, row.id)
    assert (row.status, attempt.error_class, attempt.status_code) == ("dead", "timeout", None)


async def test_redirects_are_not_followed(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    async def redirect(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": "http://169.254.169.254/latest"})

    receiver.behaviour = redirect
    pk = await add_task(sessions, "task-1", receiver.url)
    async with running_dispatcher(make_settings(SUNOTRACK_WEBHOOK_RETRY_SCHEDULE="")):
        await enqueue(sessions, [notice(pk, receiver.url)])
        [row] = await settled(sessions, 1)
    assert (row.status, row.last_status_code) == ("dead", 307)
    assert len(receiver.received) == 1


async def test_without_a_secret_nothing_is_sent_unsigned(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    pk = await add_task(sessions, "task-1", receiver.url)
    async with running_dispatcher(make_settings(SUNOTRACK_WEBHOOK_SECRET="")) as dispatcher:
        await enqueue(sessions, [notice(pk, receiver.url)])
        await asyncio.sleep(0.5)
        assert dispatcher.held
    [row] = await deliveries(sessions)
    assert (row.status, row.attempts, len(receiver.received)) == ("pending", 0, 0)


async def test_two_dispatchers_on_one_database_never_send_a_delivery_twice(
    make_settings: Callable[..., Settings], sessions: SessionMaker, receiver: Receiver
) -> None:
    settings = make_settings(SUNOTRACK_WEBHOOK_CONCURRENCY="8")
    pks = [await add_task(sessions, f"task-{n}", receiver.url) for n in range(20)]
    async with running_dispatcher(settings), running_dispatcher(settings):
        for round_ in range(10):
            await enqueue(sessions, [notice(pk, receiver.url, seq=2 + round_) for pk in pks])
        rows = await settled(sessions, 200, timeout=20)

    counts = Counter(receiver.ids())
    assert len(counts) == 200
    assert set(counts.values()) == {1}
    assert {row.status for row in rows} == {"delivered"}
    assert {row.attempts for row in rows} == {1}
