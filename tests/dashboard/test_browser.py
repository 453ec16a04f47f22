"""The dashboard in a real browser (Debian's chromium driven by Playwright; Playwright never downloads
one): tasks registered through the API appear and turn complete live, the metadata filter finds one,
and a task page shows its timeline, clips, events and deliveries. Saves docs/dashboard.png."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from service.config import Settings
from service.upstream.fake import Advance, FakeRelay
from tests.conftest import TEST_ADMIN_TOKEN, LiveServer, auth_headers

CHROMIUM = os.environ.get("SUNOTRACK_CHROMIUM", "/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[2] / "docs"
RELAY_KEY = "test-relay-key"
# Loopback only: the relay's CDN names (covers, audio) resolve nowhere; the test serves covers itself.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
COVER = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100 100">'
    '<defs><linearGradient id="g" x2="1" y2="1"><stop offset="0" stop-color="#5aa9ff"/>'
    '<stop offset="1" stop-color="#7e57c2"/></linearGradient></defs><rect width="100" height="100" '
    'fill="url(#g)"/><circle cx="50" cy="50" r="22" fill="#0f1419" opacity=".5"/>'
    '<circle cx="50" cy="50" r="5" fill="#d8dee6"/></svg>'
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run installs it)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        await browser.close()


async def loopback_only(route: Route) -> None:
    url = route.request.url
    if url.startswith("http://127.0.0.1:"):
        await route.continue_()
    elif route.request.resource_type == "image":
        await route.fulfill(status=200, content_type="image/svg+xml", body=COVER)
    else:
        await route.abort()


async def test_dashboard_shows_tasks_live_and_a_task_page(
    make_settings: Callable[..., Settings], live_server: Callable[..., LiveServer], browser: Browser
) -> None:
    async with FakeRelay(api_key=RELAY_KEY, default_advance=Advance.MANUAL) as relay:
        server = live_server(make_settings(SUNO_BASE_URL=relay.base_url, SUNO_API_KEY=RELAY_KEY), role="all")
        page = await browser.new_page(viewport={"width": 1440, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.route("**/*", loopback_only)
        try:
            async with httpx.AsyncClient(base_url=server.base_url, headers=auth_headers(), timeout=30) as api:
                await run(page, api, relay, server.base_url)
        finally:
            await page.close()
        assert errors == []


async def run(page: Page, api: httpx.AsyncClient, relay: FakeRelay, base_url: str) -> None:
    await page.goto(base_url + "/")
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#token", "wrong-token-0123456789")
    await page.click("#login-form button")
    await expect(page.locator("#login-error")).to_contain_text("401")
    await page.fill("#token", TEST_ADMIN_TOKEN)
    await page.click("#login-form button")
    await expect(page.locator("#app")).to_be_visible()
    await expect(page.locator("#login")).to_be_hidden()
    await expect(page.get_by_test_id("live")).to_have_text("live")
    assert await page.evaluate("sessionStorage.getItem('sunotrack.token')") == TEST_ADMIN_TOKEN
    assert TEST_ADMIN_TOKEN not in page.url
    await page.evaluate("window.__notReloaded = true")

    task_ids = [relay.add_task(f"song-{n}", title=f"Neon Harbor {n}") for n in range(1, 5)]
    for n, task_id in enumerate(task_ids, start=1):
        response = await api.post(
            "/api/v1/tasks",
            json={
                "task_id": task_id,
                "metadata": {"order_id": f"A-100{n}", "shop": "eu"},
                # a receiver that refuses: the deliveries panel shows failing attempts
                "notify_hook": "http://127.0.0.1:9/hooks/suno" if n == 1 else None,
            },
        )
        assert response.status_code == 201, response.text
    rows = page.locator("#task-rows tr")
    await expect(rows).to_have_count(4, timeout=15_000)
    for task_id in task_ids:
        await expect(page.locator(f'tr[data-task-id="{task_id}"]')).to_be_visible()

    # Three move through queued and in progress to complete, one step at a time; the table follows live.
    for status in ("queued", "in_progress", "complete"):
        for task_id in task_ids[:3]:
            relay.advance(task_id)
        for task_id in task_ids[:3]:
            await expect(page.locator(f'tr[data-task-id="{task_id}"]')).to_have_attribute(
                "data-status", status, timeout=20_000
            )
    await expect(page.locator(f'tr[data-task-id="{task_ids[3]}"]')).to_have_attribute(
        "data-status", "submitted"
    )
    assert await page.evaluate("window.__notReloaded") is True
    await expect(page.get_by_test_id("stat-complete")).to_contain_text("3", timeout=10_000)
    await expect(page.locator("#chart-transitions rect").first).to_be_attached()

    await page.get_by_test_id("meta-key").fill("order_id")
    await page.get_by_test_id("meta-value").fill("A-1002")
    await page.click("#filters button[type=submit]")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-task-id", task_ids[1])
    await page.click("#filters button[type=reset]")
    await expect(rows).to_have_count(4)
    DOCS.mkdir(exist_ok=True)
    await page.screenshot(path=str(DOCS / "dashboard.png"), full_page=True)

    await page.click(f'tr[data-task-id="{task_ids[0]}"] a')
    view = page.get_by_test_id("task-view")
    await expect(view.get_by_test_id("task-title")).to_have_text(task_ids[0])
    await expect(view.get_by_test_id("timeline")).to_contain_text("in progress")
    # Drawn, not only labelled: the bar's segments have widths (the CSP refuses inline style attributes).
    segments = view.locator("[data-testid=timeline] .timeline > div")
    await expect(segments).to_have_count(3)
    assert all(box and box["width"] > 0 for box in [await s.bounding_box() for s in await segments.all()])
    await expect(view.get_by_test_id("clip")).to_have_count(2)
    await expect(view.locator("audio").first).to_have_attribute(
        "src", f"https://cdn1.suno.ai/{relay.clip_ids(task_ids[0])[0]}.mp3"
    )
    await expect(view.locator("img").first).to_be_visible()
    events = view.get_by_test_id("events").locator("tbody tr")
    await expect(events.first).to_contain_text("register")
    await expect(events.filter(has_text="complete").first).to_be_visible()
    assert await events.count() >= 4
    await expect(view.get_by_test_id("delivery")).to_have_count(3, timeout=10_000)
    await expect(view.get_by_test_id("redeliver")).to_be_visible()
    await page.screenshot(path=str(DOCS / "dashboard-task.png"), full_page=True)
