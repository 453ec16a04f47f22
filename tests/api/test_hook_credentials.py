"""A notify_hook with credentials is used as given and shown only with its password masked."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Callable

import httpx

from service.config import Settings
from service.db import create_engine, create_session_maker
from tests.api.conftest import RELAY_KEY
from tests.conftest import LiveServer, auth_headers
from tests.webhooks.conftest import Receiver, running_dispatcher, settled

PASSWORD = "s3cret-Pa55"


async def test_the_password_is_sent_as_basic_auth_and_never_shown(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer], database_url: str
) -> None:
    from service.upstream.fake import FakeRelay  # noqa: PLC0415

    receiver = await Receiver().start()
    hook = f"http://hook-user:{PASSWORD}@127.0.0.1:{receiver.port}/hook"
    shown = f"http://hook-user:***@127.0.0.1:{receiver.port}/hook"
    engine = create_engine(database_url, pool_size=2)
    try:
        async with FakeRelay(api_key=RELAY_KEY) as relay:
            settings = make_settings(SUNO_BASE_URL=relay.base_url, SUNO_API_KEY=RELAY_KEY)
            server = live_server(settings)
            task_id = relay.add_task()
            async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers()) as api:
                created = await api.post("/api/v1/tasks", json={"task_id": task_id, "notify_hook": hook})
                for _ in range(2):  # submitted, then queued: a transition, so a delivery
                    assert (await api.post(f"/api/v1/tasks/{task_id}/refresh")).status_code == 200
                async with running_dispatcher(settings):
                    [delivery] = await settled(create_session_maker(engine), 1)
                shown_by = {
                    "register": created,
                    "register again": await api.post("/api/v1/tasks", json={"task_id": task_id}),
                    "read": await api.get(f"/api/v1/tasks/{task_id}"),
                    "list": await api.get("/api/v1/tasks"),
                    "events": await api.get(f"/api/v1/tasks/{task_id}/events"),
                    "task deliveries": await api.get(f"/api/v1/tasks/{task_id}/deliveries"),
                    "deliveries": await api.get("/api/v1/deliveries"),
                    "retry": await api.post(f"/api/v1/deliveries/{delivery.id}/retry"),
                    "redeliver": await api.post(f"/api/v1/tasks/{task_id}/redeliver", params={"all": True}),
                }
    finally:
        await engine.dispose()
        await receiver.stop()

    assert delivery.status == "delivered"
    [received] = receiver.received
    assert (
        received.headers["Authorization"]
        == "Basic " + base64.b64encode(f"hook-user:{PASSWORD}".encode()).decode()
    )
    assert {name: PASSWORD in response.text for name, response in shown_by.items()} == dict.fromkeys(
        shown_by, False
    )
    assert shown_by["register"].json()["notify_hook"] == shown
    assert shown_by["read"].json()["notify_hook"] == shown
    assert [item["notify_hook"] for item in shown_by["list"].json()["items"]] == [shown]
    assert [item["url"] for item in shown_by["task deliveries"].json()["items"]] == [shown]
    assert [item["url"] for item in shown_by["deliveries"].json()["items"]] == [shown]
    assert shown_by["retry"].json()["url"] == shown
    assert [item["url"] for item in shown_by["redeliver"].json()["items"]] == [shown]


async def test_an_error_quoting_a_hook_does_not_show_its_password(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer]
) -> None:
    server = live_server(make_settings())
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers()) as api:
        response = await api.post(
            "/api/v1/tasks", json={"task_id": "t", "notify_hook": f"http://u:{PASSWORD}@h\u00e9llo\u2100/x"}
        )
    assert response.status_code == 400
    # yarl's reason quotes the URL's netloc, user info and all.
    assert response.json()["detail"].startswith("notify_hook: not a valid URL (netloc 'u:***@")
    assert PASSWORD not in response.text


def test_log_lines_show_hook_urls_masked() -> None:
    """The logging the `sunotrack` command configures masks every field, traceback and library record."""
    script = f"""
import structlog
from service.cli import configure_logging
configure_logging("info")
log = structlog.get_logger()
log.warning("webhooks.attempt_failed", error="POST http://u:{PASSWORD}@h/x failed", extra={{"url": "https://u:{PASSWORD}@h"}})
try:
    raise ValueError("bad hook http://u:{PASSWORD}@h/x")
except ValueError:
    log.exception("http.unhandled_error")
import logging
logging.getLogger("uvicorn.error").error("a library quoting http://u:{PASSWORD}@h/x")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    output = result.stdout + result.stderr
    lines = output.splitlines()
    assert len(lines) == 3, output
    assert PASSWORD not in output
    assert "http://u:***@h/x failed" in lines[0]
    assert "https://u:***@h" in lines[0]
    assert "bad hook http://u:***@h/x" in lines[1]
    assert "a library quoting http://u:***@h/x" in lines[2]
