"""The relay front: a client written only against the relay's documented API, pointed at sunotrack.

The client below knows nothing of sunotrack but its token: it submits with `POST /suno/submit/music`,
polls `GET /suno/fetch/{id}` / `POST /suno/fetch`, and asks `GET /suno/act/stems/{clip_id}`, reading
the relay's documented shapes (`{"code", "message", "data"}`, status words, clips).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from standardwebhooks import Webhook

from service.config import Role, Settings
from service.upstream.fake import Advance, FakeRelay, FaultKind, Lifecycle
from tests.conftest import (
    ALSO_THROUGH_PGBOUNCER,
    RELAY_KEY,
    TEST_WEBHOOK_SECRET,
    LiveServer,
    auth_headers,
    wait_until,
)
from tests.webhooks.conftest import Receiver

pytestmark = ALSO_THROUGH_PGBOUNCER

CALLBACK_TOKEN = "cb-token-0123456789"
TASK_NOT_EXIST = {"code": "task_not_exist", "message": "task_not_exist", "data": None}


async def front(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    relay: FakeRelay,
    *,
    role: Role = "api",
    **overrides: str,
) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    """(the relay client pointed at sunotrack, an admin client of sunotrack's own API)."""
    settings = make_settings(SUNO_BASE_URL=relay.base_url, SUNO_API_KEY=RELAY_KEY, **overrides)
    server = live_server(settings, role=role)
    return (
        httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30),
        httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30),
    )


async def test_a_relay_client_submits_polls_to_completion_and_gets_its_signed_hook_while_only_sunotrack_polls(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer], receiver: Receiver
) -> None:
    async with FakeRelay(api_key=RELAY_KEY) as relay:
        client, api = await front(make_settings, live_server, relay, role="all")
        async with client, api:
            submitted = await client.post(
                "/suno/submit/music",
                json={"prompt": "harbor lights", "mv": "chirp-v4", "notify_hook": receiver.url},
            )
            assert submitted.status_code == 200, submitted.text
            envelope = submitted.json()
            task_id = envelope["data"]
            assert (envelope["code"], envelope["message"]) == ("success", "")
            # The relay's answer, byte for byte.
            expected = b'{"code":"success","message":"","data":' + json.dumps(task_id).encode() + b"}"
            assert submitted.content == expected
            # The relay never got the client's hook: it cannot call the client behind our back.
            assert [body.get("notify_hook") for body in relay.submitted] == [None]
            assert relay.submitted[0]["prompt"] == "harbor lights"

            client_polls = 0
            answers: list[dict[str, Any]] = []

            async def finished() -> bool:
                nonlocal client_polls
                client_polls += 1
                answer = await client.get(f"/suno/fetch/{task_id}")
                assert answer.status_code == 200, answer.text
                answers.append(answer.json())
                return bool(answers[-1]["data"]["status"] == "SUCCESS")

            await wait_until(finished, timeout=30, what="the relay client to see SUCCESS")
            final = answers[-1]
            assert final["code"] == "success"
            assert final["data"]["task_id"] == task_id
            assert final["data"]["notify_hook"] == receiver.url
            assert final["data"]["progress"] == "100%"
            assert [clip["status"] for clip in final["data"]["data"]] == ["complete", "complete"]
            assert all(clip["audio_url"].startswith("https://") for clip in final["data"]["data"])
            statuses_seen = [answer["data"]["status"] for answer in answers]
            assert statuses_seen == sorted(
                statuses_seen, key=["SUBMITTED", "QUEUED", "IN_PROGRESS", "SUCCESS"].index
            )

            async def hook_got_success() -> bool:
                return any(json.loads(r.body)["status"] == "SUCCESS" for r in receiver.received)

            await wait_until(hook_got_success, timeout=30, what="the SUCCESS webhook")
            # Signed, and the relay's own task object: what the client's hook already parses.
            verifier = Webhook(TEST_WEBHOOK_SECRET)
            bodies = [verifier.verify(r.body, r.headers) for r in receiver.received]
            assert {body["task_id"] for body in bodies} == {task_id}
            assert [body["status"] for body in bodies][-1] == "SUCCESS"

            # Only sunotrack polled the relay, at its own pace: every relay request naming the task
            # is one of sunotrack's polls, whatever the client did.
            tracked = (await api.get(f"/api/v1/tasks/{task_id}")).json()
            assert tracked["status"] == "complete"
            assert relay.task_requests[task_id] == tracked["poll_count"]
            assert relay.requests["fetch"] == 0  # the client's GET /suno/fetch/{id} never reached it
            assert client_polls > tracked["poll_count"]


async def test_a_batch_poll_answers_the_tracked_ids_in_order_and_leaves_out_the_others(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    async with FakeRelay(api_key=RELAY_KEY) as relay:
        client, _ = await front(make_settings, live_server, relay)
        async with client:
            ids = [
                (await client.post("/suno/submit/music", json={"prompt": "x"})).json()["data"] for _ in "ab"
            ]
            for path in ("/suno/fetch", "/suno/submit/fetch"):
                answer = await client.post(
                    path, json={"ids": [ids[1], "not-ours", ids[0]], "action": "MUSIC"}
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["code"] == "success"
                assert [task["task_id"] for task in answer.json()["data"]] == [ids[1], ids[0]]
                assert [task["status"] for task in answer.json()["data"]] == ["SUBMITTED", "SUBMITTED"]
            assert relay.requests["fetch_batch"] + relay.requests["submit_fetch"] == 0

            bad = await client.post("/suno/fetch", json={"ids": "x"})
            assert bad.status_code == 400
            assert "ids" in bad.json()["detail"]
            assert bad.json()["code"] == "invalid_input"


async def test_an_id_the_caller_does_not_track_answers_as_the_relay_does(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    async with FakeRelay(api_key=RELAY_KEY) as relay, httpx.AsyncClient() as direct:
        client, _ = await front(make_settings, live_server, relay)
        async with client:
            relay_answer = await direct.get(
                f"{relay.base_url}/suno/fetch/nope", headers={"Authorization": f"Bearer {RELAY_KEY}"}
            )
            for task_id in ("nope", "not a valid id!"):
                ours = await client.get(f"/suno/fetch/{task_id}")
                assert (ours.status_code, ours.json()) == (relay_answer.status_code, relay_answer.json())
                assert ours.json() == TASK_NOT_EXIST


async def test_the_fetch_answer_is_the_relays_own_with_the_clients_hook(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer], receiver: Receiver
) -> None:
    async with (
        FakeRelay(api_key=RELAY_KEY, default_advance=Advance.MANUAL) as relay,
        httpx.AsyncClient() as direct,
    ):
        client, api = await front(make_settings, live_server, relay)
        async with client, api:
            submitted = await client.post("/suno/submit/music", json={"notify_hook": receiver.url})
            task_id = submitted.json()["data"]
            relay.advance(task_id, 2)  # IN_PROGRESS, clips streaming
            assert (await api.post(f"/api/v1/tasks/{task_id}/refresh")).status_code == 200
            theirs = (
                await direct.get(
                    f"{relay.base_url}/suno/fetch/{task_id}", headers={"Authorization": f"Bearer {RELAY_KEY}"}
                )
            ).json()
            ours = (await client.get(f"/suno/fetch/{task_id}")).json()
            assert theirs["data"]["notify_hook"] == ""
            assert ours["data"]["notify_hook"] == receiver.url
            theirs["data"]["notify_hook"] = receiver.url
            assert ours == theirs

            # Our state wins where the relay never said it: a cancellation reads as the relay's
            # failure, the fields we keep nothing of (times, clip details) still the relay's.
            assert (await api.delete(f"/api/v1/tasks/{task_id}")).status_code == 200
            cancelled = (await client.get(f"/suno/fetch/{task_id}")).json()["data"]
            assert cancelled["status"] == "FAILURE"
            assert cancelled["submit_time"] == theirs["data"]["submit_time"]
            assert cancelled["data"] == theirs["data"]["data"]


async def test_a_submit_failure_comes_back_unchanged_and_registers_nothing(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    async with FakeRelay(api_key=RELAY_KEY) as relay, httpx.AsyncClient() as direct:
        client, api = await front(make_settings, live_server, relay)
        async with client, api:
            refused = await client.post("/suno/submit/music", json={"fake_lifecycle": "no-such"})
            relay_refusal = await direct.post(
                f"{relay.base_url}/suno/submit/music",
                json={"fake_lifecycle": "no-such"},
                headers={"Authorization": f"Bearer {RELAY_KEY}"},
            )
            assert (refused.status_code, refused.content) == (400, relay_refusal.content)

            relay.inject(FaultKind.RATE_LIMIT, retry_after="7")
            limited = await client.post("/suno/submit/music", json={"prompt": "x"})
            assert limited.status_code == 429
            assert limited.headers["retry-after"] == "7"
            assert limited.json()["code"] == "rate_limit"
            assert (await api.get("/api/v1/tasks")).json()["items"] == []


async def test_a_submit_whose_answer_is_lost_is_504_may_exist_upstream_and_never_retried(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    async with FakeRelay(api_key=RELAY_KEY) as relay:
        client, api = await front(make_settings, live_server, relay, SUNOTRACK_UPSTREAM_TIMEOUT_S="0.3")
        async with client, api:
            relay.inject(FaultKind.LATENCY, latency_s=1.0)
            lost = await client.post("/suno/submit/music", json={"prompt": "x"})
            assert lost.status_code == 504, lost.text
            assert "may exist upstream" in lost.json()["detail"]
            assert lost.json()["code"] == "submit_answer_lost"
            assert relay.requests["submit_music"] == 1
            assert (await api.get("/api/v1/tasks")).json()["items"] == []


async def test_the_clients_hook_is_checked_before_anything_is_submitted(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    async with FakeRelay(api_key=RELAY_KEY) as relay:
        client, _ = await front(make_settings, live_server, relay, SUNOTRACK_ALLOW_PRIVATE_HOOKS="false")
        async with client:
            for hook, named in (("http://127.0.0.1/x", "notify_hook"), (7, "notify_hook")):
                refused = await client.post("/suno/submit/music", json={"notify_hook": hook})
                assert refused.status_code == 400, refused.text
                assert named in refused.json()["detail"]
            not_json = await client.post("/suno/submit/music", content=b"{oops")
            assert not_json.status_code == 400
            assert relay.requests["submit_music"] == 0


async def test_with_a_public_url_the_relay_is_told_to_call_us_back_and_the_client_sees_its_own_hook(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer], receiver: Receiver
) -> None:
    async with FakeRelay(api_key=RELAY_KEY, default_advance=Advance.MANUAL) as relay:
        client, api = await front(
            make_settings,
            live_server,
            relay,
            SUNOTRACK_PUBLIC_URL="https://track.example",
            SUNOTRACK_CALLBACK_TOKEN=CALLBACK_TOKEN,
        )
        async with client, api:
            task_id = (await client.post("/suno/submit/music", json={"notify_hook": receiver.url})).json()[
                "data"
            ]
            callback = f"https://track.example/api/v1/callbacks/suno/{CALLBACK_TOKEN}"
            assert relay.submitted[0]["notify_hook"] == callback
            assert (await api.post(f"/api/v1/tasks/{task_id}/refresh")).status_code == 200
            tracked = (await api.get(f"/api/v1/tasks/{task_id}")).json()
            assert (tracked["notify_hook"], tracked["notify_hook_source"]) == (receiver.url, "client")
            answer = await client.get(f"/suno/fetch/{task_id}")
            assert answer.json()["data"]["notify_hook"] == receiver.url
            assert CALLBACK_TOKEN not in answer.text


async def test_stems_are_registered_on_the_first_call_and_answered_from_our_state_after(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    async with FakeRelay(api_key=RELAY_KEY, default_advance=Advance.MANUAL) as relay:
        client, api = await front(make_settings, live_server, relay)
        async with client, api:
            song = relay.add_task(lifecycle=Lifecycle.MUSIC_SUCCESS)
            clip_id = relay.clip_ids(song)[0]
            first = await client.get(f"/suno/act/stems/{clip_id}")
            assert first.status_code == 200, first.text
            clips = first.json()["clips"]
            assert [clip["status"] for clip in clips] == ["queued", "queued"]
            assert all(clip["metadata"]["type"] == "stem" for clip in clips)
            again = await client.get(f"/suno/act/stems/{clip_id}")
            assert again.json() == first.json()
            assert relay.requests["stems"] == 1
            tracked = (await api.get(f"/api/v1/tasks/{clip_id}")).json()
            assert (tracked["kind"], tracked["status"]) == ("stems", "queued")

            unknown = await client.get("/suno/act/stems/no-such-clip")
            assert (unknown.status_code, unknown.json()) == (400, TASK_NOT_EXIST)
            assert (await api.get("/api/v1/tasks/no-such-clip")).status_code == 404


async def test_the_relay_routes_need_the_token_and_never_pass_the_callers_on(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    async with FakeRelay(api_key=RELAY_KEY) as relay:
        client, _ = await front(make_settings, live_server, relay)
        async with client:
            for method, path in (
                ("POST", "/suno/submit/music"),
                ("GET", "/suno/fetch/x"),
                ("POST", "/suno/fetch"),
            ):
                refused = await client.request(
                    method, path, json={}, headers={"Authorization": "Bearer wrong"}
                )
                assert refused.status_code == 401
                assert refused.json()["code"] == "http_401"
            assert sum(relay.requests.values()) == 0
            # The fake relay refuses anything but its own key: a 200 means ours went, not the caller's.
            assert (await client.post("/suno/submit/music", json={})).status_code == 200


async def test_a_clients_token_submits_on_its_relay_and_sees_only_its_own_tasks(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    async with FakeRelay(api_key=RELAY_KEY) as relay:
        admin, api = await front(make_settings, live_server, relay)
        async with admin, api:
            tokens = {}
            for name in ("shop", "label"):
                created = await api.post("/api/v1/clients", json={"name": name})
                assert created.status_code == 201, created.text
                tokens[name] = created.json()["token"]
            shop = {"Authorization": f"Bearer {tokens['shop']}"}
            label = {"Authorization": f"Bearer {tokens['label']}"}

            task_id = (await admin.post("/suno/submit/music", json={}, headers=shop)).json()["data"]
            assert (await admin.get(f"/suno/fetch/{task_id}", headers=shop)).json()["data"][
                "task_id"
            ] == task_id
            for other in (label, auth_headers()):  # another client, and the admin's own (client-less) tasks
                answer = await admin.get(f"/suno/fetch/{task_id}", headers=other)
                assert (answer.status_code, answer.json()) == (400, TASK_NOT_EXIST)
                batch = await admin.post("/suno/fetch", json={"ids": [task_id]}, headers=other)
                assert batch.json()["data"] == []
            owned = await api.get(f"/api/v1/tasks/{task_id}", params={"client": "shop"})
            assert owned.status_code == 200
            assert owned.json()["client"] == "shop"
