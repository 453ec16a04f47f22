"""Each client's webhooks are signed with its own secret(s); the admin's with SUNOTRACK_WEBHOOK_SECRET."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from service.config import Settings
from tests.api.test_tasks import db_rows
from tests.conftest import TEST_WEBHOOK_SECRET, LiveServer, auth_headers, wait_until
from tests.webhooks.conftest import Received, Receiver


@asynccontextmanager
async def admin_api(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as api:
        yield api


async def cancel_with_hook(server: LiveServer, token: str, task_id: str, hook: str) -> None:
    """Register a task with a hook and cancel it: one transition, one webhook."""
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(token), timeout=30) as http:
        registered = await http.post("/api/v1/tasks", json={"task_id": task_id, "notify_hook": hook})
        assert registered.status_code == 201, registered.text
        assert (await http.delete(f"/api/v1/tasks/{task_id}")).status_code == 200


def verifies(secret: str, received: Received) -> bool:
    try:
        Webhook(secret).verify(received.body, received.headers)
    except WebhookVerificationError:
        return False
    return True


async def received_for(receiver: Receiver, path: str, count: int = 1) -> list[Received]:
    async def arrived() -> bool:
        return len([r for r in receiver.received if r.path == path]) >= count

    await wait_until(arrived, timeout=15, what=f"{count} webhook(s) to {path}")
    return [r for r in receiver.received if r.path == path]


async def test_each_clients_webhooks_verify_with_its_secret_only(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer], receiver: Receiver
) -> None:
    server = live_server(make_settings(), role="all")
    async with admin_api(server) as api:
        issued = {
            name: (await api.post("/api/v1/clients", json={"name": name})).json() for name in ("a", "b")
        }
    for name, credentials in issued.items():
        await cancel_with_hook(server, credentials["token"], "same-id", f"{receiver.url}/{name}")
    await cancel_with_hook(server, "test-admin-token", "same-id", f"{receiver.url}/admin")

    [to_a] = await received_for(receiver, "/hook/a")
    [to_b] = await received_for(receiver, "/hook/b")
    [to_admin] = await received_for(receiver, "/hook/admin")
    secrets = {**{name: c["webhook_secret"] for name, c in issued.items()}, "admin": TEST_WEBHOOK_SECRET}
    assert {name: verifies(secret, to_a) for name, secret in secrets.items()} == {
        "a": True, "b": False, "admin": False,
    }  # fmt: skip
    assert {name: verifies(secret, to_b) for name, secret in secrets.items()} == {
        "a": False, "b": True, "admin": False,
    }  # fmt: skip
    assert {name: verifies(secret, to_admin) for name, secret in secrets.items()} == {
        "a": False, "b": False, "admin": True,
    }  # fmt: skip
    assert json.loads(to_a.body)["data"]["task_id"] == "same-id"


async def test_after_rotate_secret_both_sign_during_the_grace_period_and_only_the_new_one_after(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    receiver: Receiver,
    database_url: str,
) -> None:
    server = live_server(make_settings(), role="all")
    async with admin_api(server) as api:
        issued = (await api.post("/api/v1/clients", json={"name": "a"})).json()
        rotated = (await api.post("/api/v1/clients/a/rotate-secret", params={"grace_s": 3600})).json()
    old, new = issued["webhook_secret"], rotated["webhook_secret"]

    await cancel_with_hook(server, issued["token"], "during", f"{receiver.url}/during")
    [during] = await received_for(receiver, "/hook/during")
    # The grace period ends: as if the hour had passed.
    await db_rows(database_url, "UPDATE clients SET previous_secret_until = now() - interval '1 s'")
    await cancel_with_hook(server, issued["token"], "after", f"{receiver.url}/after")
    [after] = await received_for(receiver, "/hook/after")

    assert (verifies(old, during), verifies(new, during)) == (True, True)
    assert during.headers["webhook-signature"].count("v1,") == 2
    assert (verifies(old, after), verifies(new, after)) == (False, True)
    assert after.headers["webhook-signature"].count("v1,") == 1


@pytest.mark.parametrize("admin_secret", [TEST_WEBHOOK_SECRET, ""])
async def test_a_revoked_clients_pending_deliveries_still_go_out_signed(
    make_settings: Callable[..., Settings],
    live_server: Callable[..., LiveServer],
    receiver: Receiver,
    admin_secret: str,
) -> None:
    """Queued while no dispatcher runs, revoked, then sent; without SUNOTRACK_WEBHOOK_SECRET the
    clients' deliveries go out all the same (only the admin's wait for a secret)."""
    settings = make_settings(SUNOTRACK_WEBHOOK_SECRET=admin_secret)
    api_only = live_server(settings)
    async with admin_api(api_only) as api:
        issued = (await api.post("/api/v1/clients", json={"name": "a"})).json()
        await cancel_with_hook(api_only, issued["token"], "t-1", f"{receiver.url}/a")
        await cancel_with_hook(api_only, "test-admin-token", "t-1", f"{receiver.url}/admin")
        assert (await api.post("/api/v1/clients/a/revoke")).status_code == 200

    dispatching = live_server(settings, role="all")
    [sent] = await received_for(receiver, "/hook/a")
    assert verifies(issued["webhook_secret"], sent)
    async with admin_api(dispatching) as api:

        async def admins_settled() -> bool:
            items: list[dict[str, Any]] = (await api.get("/api/v1/tasks/t-1/deliveries")).json()["items"]
            return items[0]["status"] == "delivered"

        if admin_secret:
            await wait_until(admins_settled, timeout=15, what="the admin's delivery")
            [to_admin] = await received_for(receiver, "/hook/admin")
            assert verifies(admin_secret, to_admin)
        else:
            [pending] = (await api.get("/api/v1/tasks/t-1/deliveries")).json()["items"]
            assert (pending["status"], pending["attempts"]) == ("pending", 0)
            assert [r for r in receiver.received if r.path == "/hook/admin"] == []
