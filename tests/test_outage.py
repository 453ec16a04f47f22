"""The API while PostgreSQL is down: every request answers 503 with Retry-After in the usual error
shape (never a 500, a traceback or the DSN), /readyz says not ready, and once PostgreSQL is back the
same process answers again, its pooled connections (closed by the restart) replaced as they are met.
The poller meanwhile logs the outage once, not a traceback every tick, and then its end."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.upstream.fake import FakeRelay
from tests.conftest import TEST_ADMIN_TOKEN, auth_headers, wait_until
from tests.test_chaos import Cluster, cluster, create_database, ready
from tests.tracking.conftest import RELAY_KEY
from tests.tracking.test_processes import Service

__all__ = ["cluster"]  # the dedicated Postgres this test stops and starts again

pytestmark = pytest.mark.timeout(300)


async def answer(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any, str]:
    async with http.request(method, url, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response.headers.get("Retry-After", "")


async def ticks(http: aiohttp.ClientSession, service: Service) -> float:
    """How many times the poller has ticked (its tick histogram's count)."""
    async with http.get(f"{service.base_url}/metrics") as response:
        metrics = await response.text()
    [count] = [line for line in metrics.splitlines() if line.startswith("sunotrack_poll_tick_seconds_count")]
    return float(count.rsplit(" ", 1)[1])


async def test_requests_answer_503_while_postgres_is_down_then_200_once_it_is_back(
    cluster: Cluster, tmp_path: Path
) -> None:
    await create_database(cluster, "outage")
    async with FakeRelay(api_key=RELAY_KEY) as relay:
        env = {
            **os.environ,
            "DATABASE_URL": cluster.url("outage"),
            "SUNOTRACK_ADMIN_TOKEN": TEST_ADMIN_TOKEN,
            "SUNOTRACK_LOG_LEVEL": "info",
            "SUNO_BASE_URL": relay.base_url,
            "SUNO_API_KEY": RELAY_KEY,
            "SUNOTRACK_POLL_TICK_S": "0.1",
        }
        log = tmp_path / "serve.log"
        service = Service(env, log)
        try:
            await outage(service, cluster, log)
        finally:
            service.close()


async def outage(service: Service, cluster: Cluster, log: Path) -> None:
    """Requests before, during and after a restart of Postgres, and what the poller logged."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        await ready(http, service)
        api = f"{service.base_url}/api/v1"
        status, issued, _ = await answer(
            http, "POST", f"{api}/clients", json={"name": "shop"}, headers=auth_headers()
        )
        assert status == 201
        callers = {"admin": auth_headers(), "client": auth_headers(issued["token"])}
        for name, headers in callers.items():
            status, _, _ = await answer(
                http, "POST", f"{api}/tasks", json={"task_id": f"before-{name}"}, headers=headers
            )
            assert status == 201
            # Several at once, so the pool holds several connections, each closed by the restart (one
            # after another, the requests would all reuse one).
            reads = [answer(http, "GET", f"{api}/tasks/before-{name}", headers=headers) for _ in range(4)]
            assert [status for status, _, _ in await asyncio.gather(*reads)] == [200] * 4

        cluster.stop("fast")

        for name, headers in callers.items():
            for method, path, body in (
                ("GET", f"/tasks/before-{name}", None),
                ("POST", "/tasks", {"task_id": f"during-{name}"}),
                ("GET", "/tasks", None),
            ):
                status, error, retry_after = await answer(
                    http, method, f"{api}{path}", json=body, headers=headers
                )
                assert (name, method, path, status) == (name, method, path, 503)
                assert int(retry_after) >= 1
                assert set(error) == {"status_code", "detail", "extra"}
                assert error["status_code"] == 503
                assert "database is unavailable" in error["detail"]
                assert error["extra"] == {"code": "database_unavailable"}
                assert str(cluster.socket_dir) not in str(error)
                assert "postgres" not in str(error).lower()
        status, _, _ = await answer(http, "GET", f"{service.base_url}/readyz")
        assert status == 503
        ticked = await ticks(http, service)

        async def ticked_thrice() -> bool:
            return await ticks(http, service) >= ticked + 3

        await wait_until(ticked_thrice, timeout=30, what="three poller ticks during the outage")

        cluster.start()

        async def answers_again() -> bool:
            statuses = [
                (await answer(http, "GET", f"{api}/tasks/before-{name}", headers=headers))[0]
                for name, headers in callers.items()
            ]
            assert set(statuses) <= {200, 503}, statuses
            return statuses == [200, 200]

        await wait_until(answers_again, timeout=60, what="the API to answer 200 again")
        for name, headers in callers.items():
            status, _, _ = await answer(
                http, "POST", f"{api}/tasks", json={"task_id": f"after-{name}"}, headers=headers
            )
            assert status == 201
        status, _, _ = await answer(http, "GET", f"{service.base_url}/readyz")
        assert status == 200
        assert service.process.poll() is None  # the same process throughout

        async def poller_recovered() -> bool:
            return "poll.database_recovered" in log.read_text()

        await wait_until(poller_recovered, timeout=30, what="the poller to log the database back")
        logged = log.read_text()
        assert logged.count("poll.database_unavailable") == 1
        assert "poll.page_failed" not in logged
        # The pool's connections closed by the restart are replaced at a checkout that may run outside a
        # greenlet (service.db.RequestConnection): no connect coroutine may be left unawaited there.
        assert "was never awaited" not in logged
