"""The tracking endpoints over real HTTP: refresh, cancel, the relay's callbacks, and the app's poller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest
from sqlalchemy import text

from service.config import Role, Settings
from service.db import create_engine, create_session_maker, transaction
from service.tracking.service import claim_polls
from service.upstream.fake import Advance, FakeRelay, FaultKind, Lifecycle
from tests.api.test_tasks import db_rows
from tests.conftest import ALSO_THROUGH_PGBOUNCER, LiveServer, auth_headers, wait_until
from tests.tracking.conftest import RELAY_KEY
from tests.tracking.test_lifecycles import clip_steps, music_history
from tests.webhooks.conftest import Receiver, running_dispatcher
from tests.webhooks.test_clients import received_for, verifies

pytestmark = ALSO_THROUGH_PGBOUNCER

CALLBACK_TOKEN = "cb-token-0123456789"


@pytest.fixture
def app_factory(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer], fake_relay: FakeRelay
) -> Callable[..., LiveServer]:
    def start(*, role: Role = "api", **overrides: Any) -> LiveServer:
        settings = make_settings(SUNO_BASE_URL=fake_relay.base_url, SUNO_API_KEY=RELAY_KEY, **overrides)
        return live_server(settings, role=role)

    return start


@pytest.fixture
async def api(app_factory: Callable[..., LiveServer]) -> AsyncIterator[httpx.AsyncClient]:
    server = app_factory(SUNOTRACK_CALLBACK_TOKEN=CALLBACK_TOKEN)
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as client:
        yield client


async def history(api: httpx.AsyncClient, task_id: str) -> list[tuple[Any, ...]]:
    response = await api.get(f"/api/v1/tasks/{task_id}/events")
    assert response.status_code == 200
    return [
        (e["seq"], e["type"], e["from_status"], e["to_status"], e["source"], e["clip_id"])
        for e in response.json()["items"]
    ]


async def test_refresh_polls_now_and_returns_the_task(api: httpx.AsyncClient, fake_relay: FakeRelay) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    assert (await api.post("/api/v1/tasks", json={"task_id": task_id})).status_code == 201

    bodies = [(await api.post(f"/api/v1/tasks/{task_id}/refresh")).json() for _ in range(4)]

    assert [body["status"] for body in bodies] == ["submitted", "queued", "in_progress", "complete"]
    assert bodies[-1]["poll_count"] == 4
    assert [clip["status"] for clip in bodies[-1]["clips"]] == ["complete", "complete"]
    expected = [
        (seq, t, a, b, "register" if seq == 1 else "api", c)
        for seq, t, a, b, _, c in music_history(fake_relay.clip_ids(task_id))
    ]
    assert await history(api, task_id) == expected
    # Polling stopped for good: refreshing a finished task returns it without asking the relay.
    again = await api.post(f"/api/v1/tasks/{task_id}/refresh")
    assert (again.status_code, again.json()) == (200, bodies[-1])
    assert fake_relay.task_requests[task_id] == 4


async def test_refresh_errors(api: httpx.AsyncClient, fake_relay: FakeRelay) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    fake_relay.inject(FaultKind.HTTP_ERROR, status=503, times=1)

    failed = await api.post(f"/api/v1/tasks/{task_id}/refresh")
    missing = await api.post("/api/v1/tasks/not-tracked/refresh")

    assert failed.status_code == 502
    assert failed.json()["extra"]["upstream_code"] == "http_503"
    assert missing.status_code == 404
    assert len(await history(api, task_id)) == 1


async def test_cancel_stops_tracking_and_keeps_the_history(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    task_id = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    await api.post(f"/api/v1/tasks/{task_id}/refresh")

    first = await api.delete(f"/api/v1/tasks/{task_id}")
    second = await api.delete(f"/api/v1/tasks/{task_id}")

    assert first.status_code == second.status_code == 200
    assert (first.json()["status"], first.json()["next_poll_at"]) == ("cancelled", None)
    assert second.json() == first.json()
    assert await history(api, task_id) == [
        (1, "transition", None, "submitted", "register", None),
        *clip_steps(2, fake_relay.clip_ids(task_id), None, "submitted", source="api"),
        (4, "transition", "submitted", "cancelled", "api", None),
    ]
    assert (await api.delete("/api/v1/tasks/not-tracked")).status_code == 404


async def test_cancelling_a_finished_task_is_a_conflict(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    task_id = fake_relay.add_task(stages=["SUCCESS"])
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    await api.post(f"/api/v1/tasks/{task_id}/refresh")

    response = await api.delete(f"/api/v1/tasks/{task_id}")

    assert response.status_code == 409
    assert "already finished with status 'complete'" in response.json()["detail"]


NO_AUTH = {"Authorization": ""}
CALLBACK_URL = f"/api/v1/callbacks/suno/{CALLBACK_TOKEN}"


async def details(api: httpx.AsyncClient, task_id: str) -> list[Any]:
    return [e["detail"] for e in (await api.get(f"/api/v1/tasks/{task_id}/events")).json()["items"]]


async def test_a_callback_polls_the_task_and_only_the_relays_answer_is_recorded(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    """Anyone holding the callback token can claim anything: the claim only makes sunotrack ask."""
    task_id = fake_relay.add_task(stages=["QUEUED"], advance=Advance.MANUAL)
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    forged = {
        "code": "success",
        "data": {
            "taskId": task_id,
            "status": "SUCCESS",
            "failReason": "made up",
            "notifyHook": "http://user:s3cret@evil.example/steal",
            "data": [{"id": "forged-clip", "status": "complete", "audio_url": "http://evil.example/a.mp3"}],
        },
    }

    first = await api.post(CALLBACK_URL, json=forged, headers=NO_AUTH)
    again = await api.post(CALLBACK_URL, json=forged, headers=NO_AUTH)

    assert (first.status_code, first.json()) == (200, {"status": "polled", "task_id": task_id})
    assert (again.status_code, again.json()) == (200, {"status": "polled", "task_id": task_id})
    assert fake_relay.task_requests[task_id] == 2
    task = (await api.get(f"/api/v1/tasks/{task_id}")).json()
    assert (task["status"], task["fail_reason"], task["notify_hook"], task["poll_count"]) == (
        "queued", None, None, 2,
    )  # fmt: skip
    assert [clip["id"] for clip in task["clips"]] == list(fake_relay.clip_ids(task_id))
    # The second answer changed nothing: nothing more recorded.
    assert await history(api, task_id) == [
        (1, "transition", None, "submitted", "register", None),
        (2, "transition", "submitted", "queued", "callback", None),
        *clip_steps(3, fake_relay.clip_ids(task_id), None, "queued", source="callback"),
    ]
    # The body that prompted the poll is kept with the first event it recorded, its hook masked.
    recorded = await details(api, task_id)
    masked = forged["data"] | {"notifyHook": "http://user:***@evil.example/steal"}  # type: ignore[operator]
    assert recorded[1] == {"upstream_status": "QUEUED", "callback": {"body": forged | {"data": masked}}}
    assert [detail.get("callback") for detail in recorded[2:]] == [None, None]


async def test_our_callback_token_is_neither_kept_nor_passed_on(
    api: httpx.AsyncClient, fake_relay: FakeRelay, database_url: str
) -> None:
    """A relay told to call us back names our callback route, token and all, as the task's hook in
    its callbacks and answers: the event keeping the callback body and the relay-format webhook body
    show *** instead."""
    ours = f"{api.base_url}{CALLBACK_URL}"
    task_id = fake_relay.add_task(stages=["QUEUED"], advance=Advance.MANUAL, notify_hook=ours)
    registration = {"task_id": task_id, "notify_hook": "http://127.0.0.1:9/hook", "notify_format": "relay"}
    await api.post("/api/v1/tasks", json=registration)

    called = await api.post(CALLBACK_URL, json={"task_id": task_id, "notify_hook": ours}, headers=NO_AUTH)

    assert called.json()["status"] == "polled"
    events = await api.get(f"/api/v1/tasks/{task_id}/events")
    assert (await details(api, task_id))[1]["callback"]["body"]["notify_hook"].endswith("/suno/***")
    [body] = await db_rows(database_url, "SELECT body FROM deliveries")
    assert msgspec.json.decode(body["body"])["notify_hook"].endswith("/suno/***")
    assert CALLBACK_TOKEN not in events.text + body["body"].decode()


async def test_a_callback_while_the_relay_is_down_leaves_the_task_as_it_was(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    task_id = fake_relay.add_task(stages=["SUCCESS"], advance=Advance.MANUAL)
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    before = (await api.get(f"/api/v1/tasks/{task_id}")).json()
    fake_relay.inject(FaultKind.HTTP_ERROR, status=503, times=1)

    response = await api.post(CALLBACK_URL, json={"taskId": task_id, "status": "SUCCESS"}, headers=NO_AUTH)

    assert response.status_code == 202
    assert response.json()["status"] == "deferred"
    assert "503" in response.json()["reason"]
    after = (await api.get(f"/api/v1/tasks/{task_id}")).json()
    # The timeline's current status counts up to now: only its keys stay the same.
    assert set(after.pop("timeline")) == set(before.pop("timeline"))
    assert after == before
    assert await history(api, task_id) == [(1, "transition", None, "submitted", "register", None)]


async def test_callbacks_for_a_task_share_the_poll_in_flight(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    """Four at once: one asks the relay (slowly), the others find its poll in flight."""
    task_id = fake_relay.add_task(stages=["QUEUED"], advance=Advance.MANUAL)
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    fake_relay.inject(FaultKind.LATENCY, task_id=task_id, latency_s=1.0)

    responses = await asyncio.gather(
        *(api.post(CALLBACK_URL, json={"task_id": task_id}, headers=NO_AUTH) for _ in range(4))
    )

    assert sorted((r.status_code, r.json()["status"]) for r in responses) == [
        (200, "polled"), *[(202, "in_flight")] * 3,
    ]  # fmt: skip
    assert fake_relay.task_requests[task_id] == 1
    assert [e[1:5] for e in await history(api, task_id)][:2] == [
        ("transition", None, "submitted", "register"),
        ("transition", "submitted", "queued", "callback"),
    ]


async def test_a_burst_of_callbacks_takes_at_most_four_connections(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    """Each callback's poll holds a pooled connection while the relay answers: a fifth at once is
    deferred to the task's own polling."""
    task_ids = [fake_relay.add_task(stages=["QUEUED"], advance=Advance.MANUAL) for _ in range(5)]
    for task_id in task_ids:
        await api.post("/api/v1/tasks", json={"task_id": task_id})
        fake_relay.inject(FaultKind.LATENCY, task_id=task_id, latency_s=1.0)

    responses = await asyncio.gather(
        *(api.post(CALLBACK_URL, json={"task_id": task_id}, headers=NO_AUTH) for task_id in task_ids)
    )

    assert sorted(r.json()["status"] for r in responses) == ["deferred"] + ["polled"] * 4
    [deferred] = [r.json() for r in responses if r.json()["status"] == "deferred"]
    assert "in flight" in deferred["reason"]
    assert sum(fake_relay.task_requests.values()) == 4


async def test_a_callback_while_a_poller_holds_the_task_asks_nothing(
    api: httpx.AsyncClient, fake_relay: FakeRelay, make_settings: Callable[..., Settings]
) -> None:
    task_id = fake_relay.add_task(stages=["QUEUED"], advance=Advance.MANUAL)
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    settings = make_settings()
    assert settings.database_url is not None
    engine = create_engine(settings.database_url, pool_size=2)
    sessions = create_session_maker(engine)
    try:
        async with transaction(sessions) as session:
            await session.execute(text("UPDATE tasks SET next_poll_at = now()"))
        async with transaction(sessions) as session:
            claim = await claim_polls(session, limit=10, settings=settings)
            assert [task.task_id for task in claim.tasks] == [task_id]
            held = await api.post(CALLBACK_URL, json={"task_id": task_id}, headers=NO_AUTH)
        free = await api.post(CALLBACK_URL, json={"task_id": task_id}, headers=NO_AUTH)
    finally:
        await engine.dispose()

    assert (held.status_code, held.json()) == (202, {"status": "in_flight", "task_id": task_id})
    assert (free.status_code, free.json()["status"]) == (200, "polled")
    assert fake_relay.task_requests[task_id] == 1


async def test_callbacks_for_tasks_not_tracked_or_finished(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    finished = fake_relay.add_task(stages=["SUCCESS"], advance=Advance.MANUAL)
    await api.post("/api/v1/tasks", json={"task_id": finished})
    await api.post(f"/api/v1/tasks/{finished}/refresh")
    fake_relay.reset_counters()

    done = await api.post(CALLBACK_URL, json={"task_id": finished}, headers=NO_AUTH)
    unknown = await api.post(CALLBACK_URL, json={"task_id": "someone-else"}, headers=NO_AUTH)
    impossible = await api.post(CALLBACK_URL, json={"task_id": "not an id"}, headers=NO_AUTH)
    malformed = await api.post(CALLBACK_URL, content=b"<html>", headers=NO_AUTH)
    wrong = await api.post("/api/v1/callbacks/suno/wrong-token", json={"task_id": finished}, headers=NO_AUTH)

    assert (done.status_code, done.json()) == (200, {"status": "finished", "task_id": finished})
    assert (unknown.status_code, unknown.json()) == (202, {"status": "ignored", "task_id": "someone-else"})
    assert (impossible.status_code, impossible.json()["status"]) == (202, "ignored")
    assert (malformed.status_code, wrong.status_code) == (400, 401)
    assert fake_relay.task_requests == {}


async def test_a_large_callback_body_is_described_not_kept(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    task_id = fake_relay.add_task(stages=["QUEUED"], advance=Advance.MANUAL)
    await api.post("/api/v1/tasks", json={"task_id": task_id})
    body = msgspec.json.encode({"task_id": task_id, "padding": "x" * 20_000})

    response = await api.post(CALLBACK_URL, content=body, headers=NO_AUTH)

    assert response.json()["status"] == "polled"
    callback = (await details(api, task_id))[1]["callback"]
    assert callback == {"omitted": f"a body of {len(body)} bytes (more than 16384)"}


async def test_the_callback_route_is_off_without_a_token(app_factory: Callable[..., LiveServer]) -> None:
    server = app_factory()
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        response = await client.post("/api/v1/callbacks/suno/anything", json={"task_id": "x"})
    assert response.status_code == 404


async def test_the_app_runs_the_poller_and_stops_it_cleanly(
    app_factory: Callable[..., LiveServer], fake_relay: FakeRelay
) -> None:
    server = app_factory(role="all")
    task_ids = [fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS) for _ in range(3)]
    slow = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, advance=Advance.MANUAL)
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as client:
        for task_id in [*task_ids, slow]:
            assert (await client.post("/api/v1/tasks", json={"task_id": task_id})).status_code == 201

        async def all_complete() -> bool:
            statuses = [(await client.get(f"/api/v1/tasks/{t}")).json()["status"] for t in task_ids]
            return statuses == ["complete"] * 3

        await wait_until(all_complete, timeout=15)
        for task_id in task_ids:
            assert await history(client, task_id) == music_history(fake_relay.clip_ids(task_id))
        metrics = (await client.get("/metrics")).text
        assert 'sunotrack_transitions_total{source="poll",to_status="complete"}' in metrics
        assert "sunotrack_claim_lag_seconds_count" in metrics
    server.stop(timeout=10)


async def test_a_callback_polls_once_and_records_into_every_clients_record(
    api: httpx.AsyncClient, fake_relay: FakeRelay
) -> None:
    """Two clients and the admin track one relay task: one callback, one question to the relay, the
    answer in each record (each with its own history)."""
    task_id = fake_relay.add_task(stages=["QUEUED"], advance=Advance.MANUAL)
    for name in ("a", "b"):
        token = (await api.post("/api/v1/clients", json={"name": name})).json()["token"]
        async with httpx.AsyncClient(base_url=api.base_url, headers=auth_headers(token)) as client:
            assert (await client.post("/api/v1/tasks", json={"task_id": task_id})).status_code == 201
    await api.post("/api/v1/tasks", json={"task_id": task_id})

    called = await api.post(CALLBACK_URL, json={"taskId": task_id, "status": "QUEUED"}, headers=NO_AUTH)

    assert (called.status_code, called.json()["status"]) == (200, "polled")
    assert fake_relay.task_requests[task_id] == 1
    for owner in ({"client": "a"}, {"client": "b"}, {}):
        task = (await api.get(f"/api/v1/tasks/{task_id}", params=owner)).json()
        assert (task["status"], task["poll_count"]) == ("queued", 1), owner
        events = (await api.get(f"/api/v1/tasks/{task_id}/events", params=owner)).json()["items"]
        assert [(e["seq"], e["to_status"], e["source"]) for e in events if e["clip_id"] is None] == [
            (1, "submitted", "register"), (2, "queued", "callback"),
        ]  # fmt: skip


async def test_a_callback_sends_each_client_tracking_the_task_its_own_webhook(
    app_factory: Callable[..., LiveServer],
    make_settings: Callable[..., Settings],
    fake_relay: FakeRelay,
    receiver: Receiver,
) -> None:
    """Two clients track one relay task, each with a hook of its own: one callback moves both records
    and each client's hook gets that transition once, signed with its client's secret only."""
    server = app_factory(SUNOTRACK_CALLBACK_TOKEN=CALLBACK_TOKEN)
    task_id = fake_relay.add_task(stages=["QUEUED"], advance=Advance.MANUAL)
    secrets: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as api:
        for name in ("a", "b"):
            issued = (await api.post("/api/v1/clients", json={"name": name})).json()
            secrets[name] = issued["webhook_secret"]
            async with httpx.AsyncClient(
                base_url=server.base_url, headers=auth_headers(issued["token"])
            ) as client:
                hook = {"task_id": task_id, "notify_hook": f"{receiver.url}/{name}"}
                assert (await client.post("/api/v1/tasks", json=hook)).status_code == 201

        async with running_dispatcher(make_settings()):
            called = await api.post(
                CALLBACK_URL, json={"taskId": task_id, "status": "QUEUED"}, headers=NO_AUTH
            )
            to_a = await received_for(receiver, "/hook/a")
            to_b = await received_for(receiver, "/hook/b")

            async def both_delivered() -> bool:
                listed = [
                    (await api.get(f"/api/v1/tasks/{task_id}/deliveries", params={"client": name})).json()
                    for name in ("a", "b")
                ]
                return [[d["status"] for d in answer["items"]] for answer in listed] == [["delivered"]] * 2

            await wait_until(both_delivered, what="each client's one delivery settled")
        records = [
            (await api.get(f"/api/v1/tasks/{task_id}", params={"client": name})).json() for name in ("a", "b")
        ]

    assert (called.status_code, called.json()["status"]) == (200, "polled")
    assert fake_relay.task_requests[task_id] == 1
    assert [(r["status"], r["poll_count"]) for r in records] == [("queued", 1)] * 2
    assert (len(to_a), len(to_b)) == (1, 1)
    for name, [received] in (("a", to_a), ("b", to_b)):
        data = msgspec.json.decode(received.body)["data"]
        assert (data["task_id"], data["previous_status"], data["status"]) == (task_id, "submitted", "queued")
        assert {other: verifies(secret, received) for other, secret in secrets.items()} == {
            other: other == name for other in secrets
        }


async def test_a_task_reads_as_the_list_shows_it(api: httpx.AsyncClient, fake_relay: FakeRelay) -> None:
    """GET /tasks/{task_id} is one statement of its own, apart from the list's read (docs/design.md,
    "GET a task in one statement"): each task, with clips, lyrics, metadata or a hook with a password,
    by the admin and by a client, reads the same through both, bar the timeline only GET shows."""
    music = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
    lyrics = fake_relay.add_task(lifecycle=Lifecycle.LYRICS)
    failed = fake_relay.add_task(lifecycle=Lifecycle.MUSIC_FAILURE)
    fresh = fake_relay.add_task(lifecycle=Lifecycle.NEVER_FINISHES)
    metadata = {
        "order_id": "A-1001",
        "price": 12.5,
        "n": 10**20,
        "tags": ["x", None, True],
        "deep": {"é": "ü"},
    }
    registrations = [
        {"task_id": music, "metadata": metadata, "notify_hook": "http://user:s3cret@127.0.0.1:9/hook"},
        {"task_id": lyrics, "kind": "lyrics"},
        {"task_id": failed, "notify_format": "relay"},
    ]
    for registration in registrations:
        assert (await api.post("/api/v1/tasks", json=registration)).status_code == 201
    for task_id in (music, lyrics, failed):
        for _ in range(5):
            await api.post(f"/api/v1/tasks/{task_id}/refresh")
    issued = (await api.post("/api/v1/clients", json={"name": "shop"})).json()
    async with httpx.AsyncClient(
        base_url=api.base_url, headers=auth_headers(issued["token"]), timeout=30
    ) as shop:
        assert (await shop.post("/api/v1/tasks", json={"task_id": fresh})).status_code == 201
        await shop.post(f"/api/v1/tasks/{fresh}/refresh")
        views = {
            "admin": (api, {}, [music, lyrics, failed]),
            "admin, ?client=shop": (api, {"client": "shop"}, [fresh]),
            "client": (shop, {}, [fresh]),
        }
        for view, (client, params, task_ids) in views.items():
            listed = {
                item["task_id"]: item
                for item in (await client.get("/api/v1/tasks", params=params)).json()["items"]
            }
            for task_id in task_ids:
                read = (await client.get(f"/api/v1/tasks/{task_id}", params=params)).json()
                assert isinstance(read.pop("timeline"), dict)
                assert (view, read) == (view, listed[task_id])

    shown = (await api.get(f"/api/v1/tasks/{music}")).json()
    assert (shown["status"], len(shown["clips"]), shown["metadata"]) == ("complete", 2, metadata)
    assert shown["notify_hook"] == "http://user:***@127.0.0.1:9/hook"
    assert (await api.get(f"/api/v1/tasks/{lyrics}")).json()["lyrics"] is not None
