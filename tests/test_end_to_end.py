"""The whole loop through the real app: register -> poll the relay -> record -> signed webhook."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from standardwebhooks import Webhook

from service.config import Settings
from service.upstream.fake import FakeRelay, Lifecycle
from tests.conftest import RELAY_KEY, TEST_WEBHOOK_SECRET, LiveServer, auth_headers, wait_until
from tests.webhooks.conftest import Receiver


async def run_to_the_end(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    relay: FakeRelay,
    receiver: Receiver,
    lifecycle: Lifecycle,
    notify_format: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Run one task to its end; return (its task-level transition events, the verified webhook bodies,
    the task as the API shows it then)."""
    task_id = relay.add_task(lifecycle=lifecycle)
    server = live_server(make_settings(SUNO_BASE_URL=relay.base_url, SUNO_API_KEY=RELAY_KEY), role="all")
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers()) as api:
        registered = await api.post(
            "/api/v1/tasks",
            json={"task_id": task_id, "notify_hook": receiver.url, "notify_format": notify_format},
        )
        assert registered.status_code == 201

        async def finished() -> bool:
            return (await api.get(f"/api/v1/tasks/{task_id}")).json()["status"] in ("complete", "failed")

        await wait_until(finished, timeout=30, what="the task to finish")
        events = (await api.get(f"/api/v1/tasks/{task_id}/events")).json()["items"]
        transitions = [e for e in events if e["type"] == "transition" and e["clip_id"] is None]

        async def all_delivered() -> bool:
            items = (await api.get(f"/api/v1/tasks/{task_id}/deliveries")).json()["items"]
            return len(items) == len(transitions) - 1 and all(d["status"] == "delivered" for d in items)

        await wait_until(all_delivered, timeout=30, what="every webhook delivered")
        task = (await api.get(f"/api/v1/tasks/{task_id}")).json()

    verifier = Webhook(TEST_WEBHOOK_SECRET)
    bodies = [verifier.verify(r.body, r.headers) for r in receiver.received]
    assert len(set(receiver.ids())) == len(receiver.received)
    return transitions, bodies, task


async def test_each_task_level_transition_arrives_once_signed_in_order(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    relay: FakeRelay,
    receiver: Receiver,
) -> None:
    transitions, bodies, _ = await run_to_the_end(
        make_settings, live_server, relay, receiver, Lifecycle.MUSIC_SUCCESS, "sunotrack"
    )

    # Registration (seq 1) is the client's own doing and is not announced.
    expected = [(e["seq"], e["from_status"], e["to_status"]) for e in transitions[1:]]
    received = sorted((b["data"]["seq"], b["data"]["previous_status"], b["data"]["status"]) for b in bodies)
    assert received == expected
    assert expected[-1][2] == "complete"
    final = max(bodies, key=lambda b: b["data"]["seq"])
    assert final["type"] == "task.status_changed"
    assert [clip["status"] for clip in final["data"]["clips"]] == ["complete", "complete"]
    assert all(clip["audio_url"] for clip in final["data"]["clips"])


async def test_relay_format_hooks_get_the_relays_own_task_object(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    relay: FakeRelay,
    receiver: Receiver,
) -> None:
    transitions, bodies, _ = await run_to_the_end(
        make_settings, live_server, relay, receiver, Lifecycle.MUSIC_FAILURE, "relay"
    )

    assert len(bodies) == len(transitions) - 1
    statuses = [json.loads(r.body)["status"] for r in receiver.received]
    assert "FAILURE" in statuses
    failure = next(json.loads(r.body) for r in receiver.received if json.loads(r.body)["status"] == "FAILURE")
    assert failure["fail_reason"] or failure["data"][0]["metadata"]["error_message"]


async def test_every_clip_carries_its_large_image_and_model_in_the_task_and_its_webhooks(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    relay: FakeRelay,
    receiver: Receiver,
) -> None:
    """Stored from the relay's clips, shown in the task JSON, sent in the webhook bodies."""
    _, bodies, task = await run_to_the_end(
        make_settings, live_server, relay, receiver, Lifecycle.MUSIC_SUCCESS, "sunotrack"
    )
    final = max(bodies, key=lambda b: b["data"]["seq"])
    for clips in (task["clips"], final["data"]["clips"]):
        assert [(clip["model_name"], clip["image_large_url"].split("/")[-1]) for clip in clips] == [
            ("chirp-v4", clip["image_url"].split("/")[-1].replace("image_", "image_large_")) for clip in clips
        ]
    assert (task["lyrics"], final["data"]["lyrics"]) == (None, None)


async def test_a_lyrics_task_carries_its_title_and_text_once_complete(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    relay: FakeRelay,
    receiver: Receiver,
) -> None:
    _, bodies, task = await run_to_the_end(
        make_settings, live_server, relay, receiver, Lifecycle.LYRICS, "sunotrack"
    )
    by_status = {b["data"]["status"]: b["data"]["lyrics"] for b in bodies}
    lyrics = by_status.pop("complete")
    assert set(by_status.values()) == {None}, "no lyrics before the task completes"
    assert set(lyrics) == {"title", "text"}
    assert lyrics["title"]
    assert lyrics["text"].startswith("[Verse]")
    assert task["lyrics"] == lyrics
