"""Hooks the relay reports: a task registered without a notify_hook is delivered to the one its relay
answers name. The real app (poller and dispatcher) against the fake relay and loopback receivers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from service.config import Role, Settings
from service.upstream.fake import Advance, FakeRelay, Lifecycle
from tests.conftest import RELAY_KEY, TEST_WEBHOOK_SECRET, LiveServer, auth_headers, wait_until
from tests.webhooks.conftest import Receiver

CALLBACK_TOKEN = "cb-token-0123456789abcdef0123456789"


@pytest.fixture
async def other_receiver() -> AsyncIterator[Receiver]:
    server = await Receiver().start()
    yield server
    await server.stop()


@pytest.fixture
def start(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer], relay: FakeRelay
) -> Callable[..., str]:
    """`start(**env)`: the app with its poller and dispatcher against the fake relay; its base URL."""

    def run(*, role: Role = "all", **env: str) -> str:
        settings = make_settings(SUNO_BASE_URL=relay.base_url, SUNO_API_KEY=RELAY_KEY, **env)
        return live_server(settings, role=role).base_url

    return run


async def status_is(api: httpx.AsyncClient, task_id: str, status: str) -> None:
    async def reached() -> bool:
        return (await api.get(f"/api/v1/tasks/{task_id}")).json()["status"] == status

    await wait_until(reached, timeout=30, what=f"{task_id} to be {status}")


async def events(api: httpx.AsyncClient, task_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await api.get(f"/api/v1/tasks/{task_id}/events")).json()["items"]
    return items


async def delivered(api: httpx.AsyncClient, task_id: str, count: int) -> list[dict[str, Any]]:
    """Wait until the task has `count` deliveries, all delivered; returns them."""
    items: list[dict[str, Any]] = []

    async def done() -> bool:
        nonlocal items
        items = (await api.get(f"/api/v1/tasks/{task_id}/deliveries")).json()["items"]
        return len(items) == count and all(d["status"] == "delivered" for d in items)

    await wait_until(done, timeout=30, what=f"{count} deliveries of {task_id}")
    return items


async def run_unhooked(base_url: str, task_id: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[Any]]:
    """Register `task_id` without a hook and run it to the end: the task, its events, its deliveries."""
    async with httpx.AsyncClient(base_url=base_url, headers=auth_headers()) as api:
        await api.post("/api/v1/tasks", json={"task_id": task_id})
        await status_is(api, task_id, "complete")
        history = await events(api, task_id)
        task = (await api.get(f"/api/v1/tasks/{task_id}")).json()
        deliveries = (await api.get(f"/api/v1/tasks/{task_id}/deliveries")).json()["items"]
    return task, history, deliveries


def verified(receiver: Receiver) -> list[dict[str, Any]]:
    """Every body the receiver got, each verified against its Standard Webhooks signature."""
    verifier = Webhook(TEST_WEBHOOK_SECRET)
    return [verifier.verify(r.body, r.headers) for r in receiver.received]


def anomalies(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["detail"] for e in history if e["type"] == "anomaly"]


async def test_a_task_registered_without_a_hook_is_delivered_to_the_relays_in_its_format(
    start: Callable[..., str], relay: FakeRelay, receiver: Receiver
) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, notify_hook=receiver.url)
    async with httpx.AsyncClient(base_url=start(), headers=auth_headers()) as api:
        registered = (await api.post("/api/v1/tasks", json={"task_id": task_id})).json()
        await status_is(api, task_id, "complete")
        transitions = [
            e for e in await events(api, task_id) if e["type"] == "transition" and not e["clip_id"]
        ]
        deliveries = await delivered(api, task_id, len(transitions) - 1)
        task = (await api.get(f"/api/v1/tasks/{task_id}")).json()
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {RELAY_KEY}"}) as client:
        fetched = (await client.get(f"{relay.base_url}/suno/fetch/{task_id}")).json()["data"]

    assert (registered["notify_hook"], registered["notify_hook_source"]) == (None, None)
    assert (task["notify_hook"], task["notify_hook_source"], task["notify_format"]) == (
        receiver.url, "relay", "relay",
    )  # fmt: skip
    # The hook came with the first answer (still `submitted`): every later transition, and only those.
    assert [e["to_status"] for e in transitions] == ["submitted", "queued", "in_progress", "complete"]
    assert sorted(d["event_seq"] for d in deliveries) == [e["seq"] for e in transitions[1:]]
    assert sorted(receiver.ids()) == sorted(d["webhook_id"] for d in deliveries)
    bodies = verified(receiver)
    # The relay's own task object, as its fetch endpoint answers.
    assert sorted(b["status"] for b in bodies) == sorted(["QUEUED", "IN_PROGRESS", "SUCCESS"])
    assert {(b["task_id"], b["notify_hook"]) for b in bodies} == {(task_id, receiver.url)}
    assert next(b for b in bodies if b["status"] == "SUCCESS") == fetched


async def test_the_transition_that_reveals_the_hook_and_every_later_one_are_delivered(
    start: Callable[..., str], relay: FakeRelay, receiver: Receiver
) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, advance=Advance.MANUAL)
    async with httpx.AsyncClient(base_url=start(), headers=auth_headers()) as api:
        await api.post("/api/v1/tasks", json={"task_id": task_id})
        relay.advance(task_id)
        await status_is(api, task_id, "queued")  # no hook known: nothing to deliver
        relay.set_notify_hook(task_id, receiver.url)
        relay.advance(task_id)
        await status_is(api, task_id, "in_progress")
        relay.set_notify_hook(task_id, "")  # later answers drop it: the adopted one stays
        relay.advance(task_id)
        await status_is(api, task_id, "complete")
        deliveries = await delivered(api, task_id, 2)
        history = await events(api, task_id)
        task = (await api.get(f"/api/v1/tasks/{task_id}")).json()

    seqs = {e["to_status"]: e["seq"] for e in history if e["type"] == "transition" and not e["clip_id"]}
    assert sorted(d["event_seq"] for d in deliveries) == [seqs["in_progress"], seqs["complete"]]
    assert sorted(b["status"] for b in verified(receiver)) == ["IN_PROGRESS", "SUCCESS"]
    assert (task["notify_hook"], task["notify_hook_source"]) == (receiver.url, "relay")
    assert anomalies(history) == []


async def test_a_different_hook_from_the_relay_replaces_the_adopted_one_with_an_anomaly(
    start: Callable[..., str], relay: FakeRelay, receiver: Receiver, other_receiver: Receiver
) -> None:
    task_id = relay.add_task(
        lifecycle=Lifecycle.MUSIC_SUCCESS, advance=Advance.MANUAL, notify_hook=receiver.url
    )
    async with httpx.AsyncClient(base_url=start(), headers=auth_headers()) as api:
        await api.post("/api/v1/tasks", json={"task_id": task_id})
        relay.advance(task_id)
        await status_is(api, task_id, "queued")
        relay.set_notify_hook(task_id, other_receiver.url)
        relay.advance(task_id, 2)
        await status_is(api, task_id, "complete")
        await delivered(api, task_id, 2)
        history = await events(api, task_id)
        task = (await api.get(f"/api/v1/tasks/{task_id}")).json()

    assert [b["status"] for b in verified(receiver)] == ["QUEUED"]
    assert [b["status"] for b in verified(other_receiver)] == ["SUCCESS"]
    assert anomalies(history) == [
        {"anomaly": "relay_hook_replaced", "notify_hook": other_receiver.url, "previous": receiver.url}
    ]
    replaced = next(e for e in history if e["type"] == "anomaly")
    assert replaced["seq"] < next(
        e["seq"] for e in history if e["to_status"] == "complete" and not e["clip_id"]
    )
    assert (task["notify_hook"], task["notify_hook_source"]) == (other_receiver.url, "relay")


async def test_a_registered_hook_is_never_replaced_by_the_relays(
    start: Callable[..., str], relay: FakeRelay, receiver: Receiver, other_receiver: Receiver
) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, notify_hook=other_receiver.url)
    async with httpx.AsyncClient(base_url=start(), headers=auth_headers()) as api:
        await api.post("/api/v1/tasks", json={"task_id": task_id, "notify_hook": receiver.url})
        await status_is(api, task_id, "complete")
        await delivered(api, task_id, 3)
        history = await events(api, task_id)
        task = (await api.get(f"/api/v1/tasks/{task_id}")).json()

    bodies = verified(receiver)
    assert sorted(b["data"]["status"] for b in bodies) == ["complete", "in_progress", "queued"]
    assert {b["type"] for b in bodies} == {"task.status_changed"}
    assert other_receiver.received == []
    assert (task["notify_hook"], task["notify_hook_source"], task["notify_format"]) == (
        receiver.url, "client", "sunotrack",
    )  # fmt: skip
    assert anomalies(history) == []


async def test_a_format_chosen_at_registration_applies_to_the_adopted_hook(
    start: Callable[..., str], relay: FakeRelay, receiver: Receiver
) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, notify_hook=receiver.url)
    async with httpx.AsyncClient(base_url=start(), headers=auth_headers()) as api:
        await api.post("/api/v1/tasks", json={"task_id": task_id, "notify_format": "sunotrack"})
        await status_is(api, task_id, "complete")
        await delivered(api, task_id, 3)
        task = (await api.get(f"/api/v1/tasks/{task_id}")).json()

    bodies = verified(receiver)
    assert sorted(b["data"]["status"] for b in bodies) == ["complete", "in_progress", "queued"]
    assert (task["notify_hook_source"], task["notify_format"]) == ("relay", "sunotrack")


@pytest.mark.parametrize(
    ("allow_private", "hook", "reason"),
    [
        ("false", None, "is not allowed: 127.0.0.1 is a loopback address"),
        ("false", "http://10.1.2.3:8080/hook", "is not allowed: 10.1.2.3 is a private address"),
        ("true", "ftp://hooks.example.com/suno", "must be an absolute http:// or https:// URL"),
        ("true", "http://hooks.example.com:99999/suno", "not a valid URL"),
    ],
)
async def test_a_hook_the_url_check_refuses_is_an_anomaly_and_is_sent_nothing(
    start: Callable[..., str],
    relay: FakeRelay,
    receiver: Receiver,
    allow_private: str,
    hook: str | None,
    reason: str,
) -> None:
    hook = hook or receiver.url
    task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, notify_hook=hook)
    task, history, deliveries = await run_unhooked(
        start(SUNOTRACK_ALLOW_PRIVATE_HOOKS=allow_private), task_id
    )

    # Said once, though every answer names it.
    [refused] = anomalies(history)
    assert (refused["anomaly"], refused["notify_hook"]) == ("relay_hook_refused", hook)
    assert reason in refused["reason"]
    assert (task["notify_hook"], task["notify_hook_source"]) == (None, None)
    assert deliveries == []
    assert receiver.received == []


async def test_relay_hooks_set_to_ignore_sends_nothing(
    start: Callable[..., str], relay: FakeRelay, receiver: Receiver
) -> None:
    task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, notify_hook=receiver.url)
    task, history, deliveries = await run_unhooked(start(SUNOTRACK_RELAY_HOOKS="ignore"), task_id)

    assert (task["notify_hook"], task["notify_hook_source"]) == (None, None)
    assert deliveries == []
    assert anomalies(history) == []
    assert receiver.received == []


async def test_our_own_callback_route_named_by_the_relay_is_not_adopted(
    start: Callable[..., str], relay: FakeRelay
) -> None:
    """A relay told to call sunotrack back reports that route as the task's hook: calling it would
    loop, and showing it would leak the callback token."""
    base = start(SUNOTRACK_CALLBACK_TOKEN=CALLBACK_TOKEN)
    task_id = relay.add_task(
        lifecycle=Lifecycle.MUSIC_SUCCESS, notify_hook=f"{base}/api/v1/callbacks/suno/{CALLBACK_TOKEN}"
    )
    task, history, deliveries = await run_unhooked(base, task_id)

    assert (task["notify_hook"], deliveries) == (None, [])
    assert CALLBACK_TOKEN not in json.dumps([task, history])


async def test_a_callback_naming_a_hook_adopts_it(
    start: Callable[..., str], relay: FakeRelay, receiver: Receiver
) -> None:
    """The relay's callback is an answer like a poll's; no poller runs here."""
    task_id = relay.add_task(stages=["QUEUED"], advance=Advance.MANUAL, notify_hook=receiver.url)
    base = start(role="api", SUNOTRACK_CALLBACK_TOKEN=CALLBACK_TOKEN)
    async with httpx.AsyncClient(base_url=base, headers=auth_headers()) as api:
        await api.post("/api/v1/tasks", json={"task_id": task_id})
        called = await api.post(
            f"/api/v1/callbacks/suno/{CALLBACK_TOKEN}",
            json={"taskId": task_id, "status": "QUEUED", "notifyHook": receiver.url, "data": []},
            headers={"Authorization": ""},
        )
        task = (await api.get(f"/api/v1/tasks/{task_id}")).json()
        deliveries = (await api.get(f"/api/v1/tasks/{task_id}/deliveries")).json()["items"]

    assert called.status_code == 200
    assert (task["status"], task["notify_hook"], task["notify_hook_source"]) == (
        "queued",
        receiver.url,
        "relay",
    )
    assert [(d["event_seq"], d["url"], d["status"]) for d in deliveries] == [(2, receiver.url, "pending")]


async def test_relay_hooks_can_be_set_per_client(
    start: Callable[..., str], relay: FakeRelay, receiver: Receiver
) -> None:
    """SUNOTRACK_RELAY_HOOKS=ignore, but client `adopts` says adopt: of two clients tracking the same
    relay task, only that one's record adopts the hook the relay names."""
    task_id = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS, notify_hook=receiver.url)
    base = start(SUNOTRACK_RELAY_HOOKS="ignore")
    tasks = {}
    async with httpx.AsyncClient(base_url=base, headers=auth_headers()) as admin:
        for name, setting in (("adopts", {"relay_hooks": "adopt"}), ("default", {})):
            issued = (await admin.post("/api/v1/clients", json={"name": name, **setting})).json()
            async with httpx.AsyncClient(base_url=base, headers=auth_headers(issued["token"])) as client:
                assert (await client.post("/api/v1/tasks", json={"task_id": task_id})).status_code == 201
        for name in ("adopts", "default"):
            await status_is_for(admin, task_id, name)
            tasks[name] = (await admin.get(f"/api/v1/tasks/{task_id}", params={"client": name})).json()
        deliveries = await delivered_for(admin, task_id, "adopts")
        nothing = (
            await admin.get(f"/api/v1/tasks/{task_id}/deliveries", params={"client": "default"})
        ).json()

    assert (tasks["adopts"]["notify_hook"], tasks["adopts"]["notify_hook_source"]) == (receiver.url, "relay")
    assert (tasks["default"]["notify_hook"], tasks["default"]["notify_hook_source"]) == (None, None)
    assert {delivery["url"] for delivery in deliveries} == {receiver.url}
    assert nothing["items"] == []


async def status_is_for(api: httpx.AsyncClient, task_id: str, client: str) -> None:
    async def complete() -> bool:
        task = (await api.get(f"/api/v1/tasks/{task_id}", params={"client": client})).json()
        return bool(task["status"] == "complete")

    await wait_until(complete, timeout=30, what=f"{client}'s {task_id} to complete")


async def delivered_for(api: httpx.AsyncClient, task_id: str, client: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []

    async def done() -> bool:
        nonlocal items
        answer = await api.get(f"/api/v1/tasks/{task_id}/deliveries", params={"client": client})
        items = answer.json()["items"]
        return bool(items) and all(d["status"] == "delivered" for d in items)

    await wait_until(done, timeout=30, what=f"{client}'s deliveries of {task_id}")
    return items
