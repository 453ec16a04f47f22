"""Loopback webhook receivers, a Runtime built for tests, and helpers to seed tasks and notices."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import func, insert, select

from service.config import Settings
from service.db import SessionMaker, create_engine, create_session_maker, transaction
from service.models import Delivery, DeliveryAttempt, Task
from service.runtime import Runtime, open_runtime
from service.upstream.schemas import ClipView
from service.webhooks.bodies import TransitionNotice
from service.webhooks.jobs import Dispatcher, start_dispatcher
from service.webhooks.outbox import enqueue_deliveries
from tests.conftest import wait_until

# next_poll_at of a live task no poller should touch.
NEVER = datetime.max.replace(tzinfo=UTC)

# Two rotated secrets: the dispatcher signs with both, a receiver holding either must verify.
SECRET_OLD = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_NEW = "whsec_" + "c3Vub3RyYWNrLXJvdGF0ZWQtc2VjcmV0LTIwMjY="


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() at receipt
    path: str = ""


Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


async def ok(_: web.Request, __: int) -> web.StreamResponse:
    return web.Response(text="ok")


@dataclass
class Receiver:
    """A real aiohttp server on 127.0.0.1; `behaviour(request, call_number)` answers each call."""

    behaviour: Behaviour = ok
    port: int = 0
    received: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(dict(request.headers), body, time.time(), request.path))
        return await self.behaviour(request, len(self.received))

    def ids(self) -> list[str]:
        return [r.headers["webhook-id"] for r in self.received]


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[SessionMaker]:
    engine = create_engine(database_url, pool_size=4)
    yield create_session_maker(engine)
    await engine.dispose()


@asynccontextmanager
async def running_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with open_runtime(settings) as runtime:
        yield runtime


@asynccontextmanager
async def running_dispatcher(settings: Settings) -> AsyncIterator[Dispatcher]:
    async with running_runtime(settings) as runtime:
        dispatcher = await start_dispatcher(runtime)
        try:
            yield dispatcher
        finally:
            await dispatcher.stop()


async def add_task(
    sessions: SessionMaker,
    task_id: str,
    hook: str,
    *,
    notify_format: str = "sunotrack",
    client_id: int | None = None,
) -> int:
    async with transaction(sessions) as session:
        pk: int = (
            await session.execute(
                insert(Task)
                .values(
                    task_id=task_id,
                    client_id=client_id,
                    kind="music",
                    status="submitted",
                    notify_hook=hook,
                    notify_format=notify_format,
                    last_seq=1,
                    next_poll_at=NEVER,  # live, but no poller runs in these tests
                )
                .returning(Task.id)
            )
        ).scalar_one()
    return pk


def notice(
    task_pk: int,
    hook: str,
    *,
    task_id: str = "task-1",
    seq: int = 2,
    status: str = "queued",
    previous: str | None = "submitted",
    notify_format: str = "sunotrack",
    relay_payload: bytes | None = None,
    clips: list[dict[str, Any]] | None = None,
    metadata: dict[str, Any] | None = None,
) -> TransitionNotice:
    return TransitionNotice(
        task_pk=task_pk,
        task_id=task_id,
        kind="music",
        seq=seq,
        status=status,
        previous_status=previous,
        progress=None,
        fail_reason=None,
        clips=[ClipView(**clip) for clip in clips or []],
        lyrics=None,
        metadata=metadata,
        at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        notify_hook=hook,
        notify_format=notify_format,
        relay_payload=relay_payload,
    )


async def enqueue(sessions: SessionMaker, notices: list[TransitionNotice]) -> None:
    async with transaction(sessions) as session:
        await enqueue_deliveries(session, notices)


async def deliveries(sessions: SessionMaker) -> list[Delivery]:
    async with transaction(sessions) as session:
        return list((await session.execute(select(Delivery).order_by(Delivery.id))).scalars())


async def attempts(sessions: SessionMaker, delivery_id: int) -> list[DeliveryAttempt]:
    async with transaction(sessions) as session:
        query = select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery_id)
        return list((await session.execute(query.order_by(DeliveryAttempt.id))).scalars())


async def leased(sessions: SessionMaker, url: str | None = None) -> int:
    """How many deliveries (to `url`, or to any) are leased: out to their receiver or claimed ahead."""
    async with transaction(sessions) as session:
        query = select(func.count()).select_from(Delivery).where(Delivery.next_attempt_at > func.now())
        if url is not None:
            query = query.where(Delivery.url == url)
        return int((await session.execute(query)).scalar_one())


async def settled(sessions: SessionMaker, count: int, *, timeout: float = 10) -> list[Delivery]:
    """Wait until `count` deliveries exist and none is pending or failed; returns them."""

    async def done() -> bool:
        rows = await deliveries(sessions)
        return len(rows) == count and all(row.status in ("delivered", "dead") for row in rows)

    await wait_until(done, timeout=timeout, what=f"{count} settled deliveries")
    return await deliveries(sessions)
