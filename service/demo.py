"""`sunotrack demo`: the service on the embedded database, a fake relay in-process, sample tasks.

Everything goes through the real paths: the samples are submitted to the fake relay over HTTP and
registered through the service's own API, then the poller moves them along while this prints each
status change, so a newcomer sees the whole loop within a minute. The fake relay keeps its tasks and
the demo its webhook secret in the data directory, so a second run looks like the first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from service.app import create_app
from service.config import Settings
from service.serving import serving
from service.upstream.client import RelayClient
from service.upstream.fake import Advance, FakeRelay
from service.vocabulary import TERMINAL_STATUSES

SAMPLES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("music", "music", {"title": "Neon Harbor", "fake_lifecycle": "music_success"}),
    ("music", "music", {"title": "Paper Moons", "fake_lifecycle": "music_success"}),
    ("lyrics", "lyrics", {"prompt": "a song about cats", "fake_lifecycle": "lyrics"}),
    ("music", "music", {"title": "Static Bloom", "fake_lifecycle": "unknown_blip"}),
)
# Submitted to the relay with a notify_hook, as most backends do, then registered without one: the
# service adopts the hook the relay's answers name (README, Webhooks).
HOOKED_SAMPLE = {"title": "Harbor Echo", "fake_lifecycle": "music_success"}
DEMO_RELAY_KEY = "demo-relay-key"
# The API client the demo makes, as an operator would for each order backend (README, Connecting a
# backend).
DEMO_CLIENT = "demo-shop"


def demo_settings(token: str, relay_url: str, data_dir: Path) -> Settings:
    """Demo defaults, but anything the user set in the environment wins."""
    defaults = {
        "SUNOTRACK_ADMIN_TOKEN": token,
        "SUNO_BASE_URL": relay_url,
        "SUNO_API_KEY": DEMO_RELAY_KEY,
        "SUNOTRACK_POLL_MIN_INTERVAL_S": "1",
        "SUNOTRACK_POLL_MAX_INTERVAL_S": "5",
        "SUNOTRACK_ALLOW_PRIVATE_HOOKS": "true",
    }
    if "SUNOTRACK_WEBHOOK_SECRET" not in os.environ:
        defaults["SUNOTRACK_WEBHOOK_SECRET"] = demo_webhook_secret(data_dir)
    return Settings.from_env(**{name: value for name, value in defaults.items() if name not in os.environ})


def demo_webhook_secret(data_dir: Path) -> str:
    """The demo's signing secret, made once and kept in the data directory, so a receiver set up
    with it keeps verifying across runs."""
    path = data_dir / "demo-webhook-secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret


async def run_demo(sock: socket.socket, stage_s: float, stop: asyncio.Event) -> None:
    token = secrets.token_urlsafe(24)
    data_dir = Settings.from_env().data_dir
    relay_key = os.environ.get("SUNO_API_KEY", DEMO_RELAY_KEY)
    relay = FakeRelay(
        api_key=relay_key,
        default_advance=Advance.TIMED,
        stage_s=stage_s,
        record_windows=False,
        state_file=data_dir / "fake-relay.json",
    )
    relay_url = await relay.start()
    try:
        settings = demo_settings(token, relay_url, data_dir)
        async with serving(create_app(settings), sock, stop) as served:
            if served.done():
                return
            host, port = sock.getsockname()[:2]
            base = f"http://{host}:{port}"
            shown_key = "$SUNO_API_KEY" if "SUNO_API_KEY" in os.environ else relay_key
            secret = settings.webhook_secrets[0].get_secret_value() if settings.webhook_secrets else None
            async with (
                webhook_receiver(secret) as hook,
                aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http,
            ):
                shop = await demo_client(http, base, data_dir)
                introduce(settings, base, relay_url, shown_key, token, shop=shop)
                show = asyncio.create_task(show_samples(http, relay, relay_url, relay_key, base, hook=hook))
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({show, stopping, served}, return_when=asyncio.FIRST_COMPLETED)
                # Stop our own requests before the server goes, so none of them fails half-way.
                show.cancel()
                stopping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await show
    finally:
        await relay.stop()


async def demo_client(http: aiohttp.ClientSession, base: str, data_dir: Path) -> dict[str, str]:
    """The demo's API client, made through the admin API on the first run. Its token and webhook
    secret are shown only by the answer that makes them: the demo keeps them in the data directory,
    so they stay the same across runs (a lost file, or a token revoked or rotated since: both are
    rotated)."""
    path = data_dir / "demo-client.json"
    async with http.post(f"{base}/api/v1/clients", json={"name": DEMO_CLIENT}) as response:
        if response.status == 409 and path.exists():
            kept: dict[str, str] = json.loads(path.read_text())
            headers = {"Authorization": f"Bearer {kept['token']}"}
            async with http.get(f"{base}/api/v1/tasks", params={"limit": 1}, headers=headers) as check:
                if check.status == 200:
                    return kept
        if response.status == 409:
            made = await rotated_client(http, f"{base}/api/v1/clients/{DEMO_CLIENT}")
        else:
            response.raise_for_status()
            made = await response.json()
    path.touch(mode=0o600)
    path.write_text(json.dumps(made) + "\n")
    return made


async def rotated_client(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    async with http.post(f"{url}/rotate-token") as response:
        response.raise_for_status()
        token = (await response.json())["token"]
    async with http.post(f"{url}/rotate-secret", params={"grace_s": 0}) as response:
        response.raise_for_status()
        secret = (await response.json())["webhook_secret"]
    return {"name": DEMO_CLIENT, "token": token, "webhook_secret": secret}


def introduce(
    settings: Settings, base: str, relay_url: str, relay_key: str, token: str, *, shop: dict[str, str]
) -> None:
    database = "DATABASE_URL" if settings.database_url else f"embedded, in {settings.data_dir}"
    secrets_in_use = [key.get_secret_value() for key in settings.webhook_secrets]
    private = "allowed" if settings.allow_private_hooks else "refused (SUNOTRACK_ALLOW_PRIVATE_HOOKS)"
    auth = f"-H 'Authorization: Bearer {shop['token']}' -H 'Content-Type: application/json'"
    print(
        f"\nsunotrack demo on {base}\n"
        f"database: {database}\n"
        f"fake relay: {relay_url} (API key: {relay_key})\n"
        f"admin token: {token}  (sees every client's tasks; the samples below are the admin's)\n"
        f"client {shop['name']}: token {shop['token']}  webhook secret {shop['webhook_secret']}\n"
        "  (an order backend's own: it sees only the tasks it registers; README, Connecting a backend)\n"
        f"admin webhook signing secret: {' '.join(secrets_in_use) or 'none: webhooks wait unsent'}\n"
        f"notify_hooks on loopback and private addresses: {private} in the demo\n\n"
        'Try it: submit a song to the fake relay; it answers {"code": "success", "data": TASK_ID}.\n'
        f"  curl -s -H \"Authorization: Bearer {relay_key}\" -H 'Content-Type: application/json' \\\n"
        f'       -d \'{{"title": "My song"}}\' {relay_url}/suno/submit/music\n'
        f'Then track that TASK_ID as {shop["name"]} (add "notify_hook": "http://127.0.0.1:9000/hook" for '
        "webhooks):\n"
        f"  curl -s {auth} \\\n"
        f'       -d \'{{"task_id": "TASK_ID", "kind": "music"}}\' {base}/api/v1/tasks\n'
        f"  curl -s -H 'Authorization: Bearer {shop['token']}' {base}/api/v1/tasks/TASK_ID/events\n"
        f"A receiver checks each webhook's signature with {shop['name']}'s secret (pip install "
        "standardwebhooks):\n"
        "  from standardwebhooks import Webhook\n"
        f'  webhook = Webhook("{shop["webhook_secret"]}")\n'
        "  event = webhook.verify(body, headers)  # raises unless sunotrack signed this body\n"
        f"OpenAPI: {base}/schema\n",
        flush=True,
    )


@contextlib.asynccontextmanager
async def webhook_receiver(secret: str | None) -> AsyncIterator[str]:
    """A client backend's webhook endpoint on loopback: checks each delivery's signature as any
    receiver should, and prints what arrived. Yields its URL."""
    verifier = Webhook(secret) if secret else None

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            if verifier is None:
                raise WebhookVerificationError("no signing secret is configured")
            event = verifier.verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            print(f"demo: webhook refused: {exc}", flush=True)
            return web.Response(status=400, text="bad signature")
        # The relay's own task object (notify_format relay), or ours with the task under `data`.
        ours = event.get("type") == "task.status_changed"
        task = event["data"] if ours else event
        print(
            f"demo: webhook {task.get('task_id')}  {task.get('status')}  "
            f"({'our' if ours else 'the relay'}'s format, signature verified)",
            flush=True,
        )
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/hook"
    finally:
        await runner.cleanup()


async def show_samples(
    http: aiohttp.ClientSession, relay: FakeRelay, relay_url: str, relay_key: str, base: str, *, hook: str
) -> None:
    task_ids = await submit_samples(http, relay, relay_url, relay_key, base, hook=hook)
    await watch(http, base, task_ids)


async def submit_samples(
    http: aiohttp.ClientSession, relay: FakeRelay, relay_url: str, relay_key: str, base: str, *, hook: str
) -> dict[str, str]:
    """Submit the samples to the relay like a client backend would, then register them with us (the
    hooked one names `hook` to the relay only)."""
    client = RelayClient(http, base_url=relay_url, api_key=relay_key)
    kinds: dict[str, str] = {}
    for kind, endpoint, payload in SAMPLES:
        submit = client.submit_lyrics if endpoint == "lyrics" else client.submit_music
        kinds[await submit(payload)] = kind
    hooked = await client.submit_music({**HOOKED_SAMPLE, "notify_hook": hook})
    kinds[hooked] = "music"
    first_song = next(task_id for task_id, kind in kinds.items() if kind == "music")
    kinds[relay.clip_ids(first_song)[0]] = "stems"
    for task_id, kind in kinds.items():
        async with http.post(f"{base}/api/v1/tasks", json={"task_id": task_id, "kind": kind}) as response:
            response.raise_for_status()
        told = (
            f"  (submitted to the relay with notify_hook {hook}, registered without)"
            if task_id == hooked
            else ""
        )
        print(f"demo: registered {kind:6} {task_id}{told}", flush=True)
    return kinds


async def watch(http: aiohttp.ClientSession, base: str, kinds: dict[str, str]) -> None:
    """Print every task-level transition of the samples until cancelled."""
    seen: dict[str, int] = dict.fromkeys(kinds, 0)
    status: dict[str, str] = dict.fromkeys(kinds, "submitted")
    announced_all_done = False
    while True:
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
                    said = detail.get("reason") or f"upstream said {detail.get('upstream_status')!r}"
                    change = f"{detail.get('anomaly')} ({said})"
                else:
                    change = f"{event['from_status']} -> {event['to_status']}"
                print(f"demo: {kinds[task_id]:6} {task_id}  {event['type']:10} {change}", flush=True)
        if not announced_all_done and all(value in TERMINAL_STATUSES for value in status.values()):
            announced_all_done = True
            print("demo: all sample tasks finished; the service keeps running (Ctrl-C to stop)", flush=True)
        await asyncio.sleep(0.5)
