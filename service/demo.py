"""`sunotrack demo`: the service on the embedded database, a fake relay in-process, sample tasks.

Everything goes through the real paths: the samples are submitted to the fake relay over HTTP and
registered through the service's own API, then the poller moves them along while this prints each
status change, so a newcomer sees the whole loop within a minute.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
from typing import Any

import aiohttp
import uvicorn

from service.app import create_app
from service.config import Settings
from service.upstream.client import RelayClient
from service.upstream.fake import Advance, FakeRelay
from service.vocabulary import TERMINAL_STATUSES

SAMPLES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("music", "music", {"title": "Neon Harbor", "fake_lifecycle": "music_success"}),
    ("music", "music", {"title": "Paper Moons", "fake_lifecycle": "music_failure"}),
    ("lyrics", "lyrics", {"prompt": "a song about cats", "fake_lifecycle": "lyrics"}),
    ("music", "music", {"title": "Static Bloom", "fake_lifecycle": "unknown_blip"}),
)


def demo_settings(token: str, relay_url: str, load: Any) -> Settings:
    """Demo defaults, but anything the user set in the environment wins."""
    defaults = {
        "SUNOTRACK_ADMIN_TOKEN": token,
        "SUNO_BASE_URL": relay_url,
        "SUNO_API_KEY": "demo-relay-key",
        "SUNOTRACK_POLL_MIN_INTERVAL_S": "1",
        "SUNOTRACK_POLL_MAX_INTERVAL_S": "5",
        "SUNOTRACK_ALLOW_PRIVATE_HOOKS": "true",
        "SUNOTRACK_WEBHOOK_SECRET": "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
    }
    settings: Settings = load(**{name: value for name, value in defaults.items() if name not in os.environ})
    return settings


async def run_demo(host: str, port: int, stage_s: float, load: Any) -> None:
    token = secrets.token_urlsafe(24)
    relay = FakeRelay(
        api_key=os.environ.get("SUNO_API_KEY", "demo-relay-key"),
        default_advance=Advance.TIMED,
        stage_s=stage_s,
        record_windows=False,
    )
    relay_url = await relay.start()
    settings = demo_settings(token, relay_url, load)
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host=host, port=port, log_config=None, access_log=False)
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                return
            await asyncio.sleep(0.05)
        base = f"http://{host}:{port}"
        database = "DATABASE_URL" if settings.database_url else f"embedded, in {settings.data_dir}"
        print(
            f"\nsunotrack demo on {base}\n"
            f"database: {database}\n"
            f"fake relay: {relay_url}\n"
            f"admin token: {token}\n\n"
            f"  curl -s -H 'Authorization: Bearer {token}' {base}/api/v1/tasks\n"
            f"  curl -s -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\\n"
            f'       -d \'{{"task_id": "my-task-1"}}\' {base}/api/v1/tasks\n'
            f"  OpenAPI: {base}/schema\n",
            flush=True,
        )
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            task_ids = await submit_samples(http, relay, relay_url, base)
            await watch(http, base, task_ids, serving)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await relay.stop()


async def submit_samples(
    http: aiohttp.ClientSession, relay: FakeRelay, relay_url: str, base: str
) -> dict[str, str]:
    """Submit the samples to the relay like a client backend would, then register them with us."""
    client = RelayClient(http, base_url=relay_url, api_key="demo-relay-key")
    kinds: dict[str, str] = {}
    for kind, endpoint, payload in SAMPLES:
        submit = client.submit_lyrics if endpoint == "lyrics" else client.submit_music
        kinds[await submit(payload)] = kind
    first_song = next(task_id for task_id, kind in kinds.items() if kind == "music")
    kinds[relay.clip_ids(first_song)[0]] = "stems"
    for task_id, kind in kinds.items():
        async with http.post(f"{base}/api/v1/tasks", json={"task_id": task_id, "kind": kind}) as response:
            response.raise_for_status()
        print(f"demo: registered {kind:6} {task_id}", flush=True)
    return kinds


async def watch(
    http: aiohttp.ClientSession, base: str, kinds: dict[str, str], serving: asyncio.Task[None]
) -> None:
    """Print every task-level transition of the samples until the server stops."""
    seen: dict[str, int] = dict.fromkeys(kinds, 0)
    status: dict[str, str] = dict.fromkeys(kinds, "submitted")
    announced_all_done = False
    while not serving.done():
        for task_id, after in seen.items():
            async with http.get(f"{base}/api/v1/tasks/{task_id}/events", params={"after": after}) as response:
                if response.status != 200:
                    continue
                events = (await response.json())["items"]
            for event in events:
                seen[task_id] = event["seq"]
                if event["clip_id"] is not None:
                    continue
                status[task_id] = event["to_status"]
                if event["type"] == "anomaly":
                    detail = event["detail"] or {}
                    change = f"{detail.get('anomaly')} (upstream said {detail.get('upstream_status')!r})"
                else:
                    change = f"{event['from_status']} -> {event['to_status']}"
                print(f"demo: {kinds[task_id]:6} {task_id}  {event['type']:10} {change}", flush=True)
        if not announced_all_done and all(value in TERMINAL_STATUSES for value in status.values()):
            announced_all_done = True
            print("demo: all sample tasks finished; the service keeps running (Ctrl-C to stop)", flush=True)
        await asyncio.sleep(0.5)
