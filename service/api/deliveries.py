"""Webhook delivery endpoints: per-task logs, the dead-letter listing, re-queues, breaker state."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import get, post
from litestar.params import FromQuery, PathParameter, QueryParameter

from service.api import DbSession
from service.errors import InvalidInput
from service.models import Delivery, DeliveryAttempt, HookHost
from service.webhooks import service

TaskIdPath = Annotated[str, PathParameter(description="The relay's task id", max_length=128)]
DeliveryIdPath = Annotated[int, PathParameter(description="The delivery's id", ge=1)]
DeliveryStatus = Literal["pending", "delivered", "failed", "dead"]
REQUEUE_STATUSES = ("failed", "dead")


class AttemptOut(msgspec.Struct):
    attempt: int
    at: datetime
    duration_ms: float | None
    status_code: int | None
    error_class: str | None
    error: str | None
    response_body: str | None
    next_attempt_at: datetime | None


class DeliveryOut(msgspec.Struct):
    id: int
    task_id: str
    event_seq: int
    webhook_id: str
    url: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    # Only on the per-task route, where a task's few deliveries come with their whole history.
    attempt_log: list[AttemptOut] | msgspec.UnsetType = msgspec.UNSET


class DeliveryList(msgspec.Struct):
    items: list[DeliveryOut]


class DeliveryPage(msgspec.Struct):
    items: list[DeliveryOut]
    next_cursor: str | None


class HookHostOut(msgspec.Struct):
    host: str
    consecutive_failures: int
    paused: bool
    paused_until: datetime | None
    updated_at: datetime


class HookHostList(msgspec.Struct):
    items: list[HookHostOut]


def attempt_out(attempt: DeliveryAttempt) -> AttemptOut:
    return AttemptOut(
        attempt=attempt.attempt,
        at=attempt.at,
        duration_ms=attempt.duration_ms,
        status_code=attempt.status_code,
        error_class=attempt.error_class,
        error=attempt.error,
        response_body=attempt.response_body,
        next_attempt_at=attempt.next_attempt_at,
    )


def delivery_out(
    delivery: Delivery, task_id: str, attempts: list[DeliveryAttempt] | None = None
) -> DeliveryOut:
    return DeliveryOut(
        id=delivery.id,
        task_id=task_id,
        event_seq=delivery.event_seq,
        webhook_id=delivery.webhook_id,
        url=delivery.url,
        status=delivery.status,
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        created_at=delivery.created_at,
        delivered_at=delivery.delivered_at,
        attempt_log=msgspec.UNSET if attempts is None else [attempt_out(a) for a in attempts],
    )


def encode_cursor(delivery_id: int) -> str:
    return base64.urlsafe_b64encode(f"d{delivery_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("d"):
            raise ValueError(raw)
        return int(raw[1:])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidInput("cursor: not a cursor this API returned") from None


@get("/api/v1/tasks/{task_id:str}/deliveries", summary="A task's webhook deliveries with their attempt logs")
async def list_task_deliveries(task_id: TaskIdPath, session: DbSession) -> DeliveryList:
    task_pk = await service.task_pk_of(session, task_id)
    deliveries = await service.deliveries_of_task(session, task_pk)
    return DeliveryList(items=[delivery_out(d, task_id, attempts) for d, attempts in deliveries])


@get("/api/v1/deliveries", summary="Deliveries, newest first, with keyset pagination")
async def list_deliveries(
    session: DbSession,
    status: FromQuery[DeliveryStatus | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, QueryParameter(max_length=64)] = None,
) -> DeliveryPage:
    rows = await service.list_deliveries(
        session, status=status, limit=limit + 1, before_id=decode_cursor(cursor) if cursor else None
    )
    page, more = rows[:limit], len(rows) > limit
    return DeliveryPage(
        items=[delivery_out(delivery, task_id) for delivery, task_id in page],
        next_cursor=encode_cursor(page[-1][0].id) if more else None,
    )


@post(
    "/api/v1/tasks/{task_id:str}/redeliver",
    status_code=202,
    summary="Re-queue a task's failed and dead deliveries (all of them with ?all=true)",
)
async def redeliver_task(
    task_id: TaskIdPath,
    session: DbSession,
    all_: Annotated[
        bool, QueryParameter(name="all", description="Also re-send pending and delivered")
    ] = False,
) -> DeliveryList:
    task_pk = await service.task_pk_of(session, task_id)
    statuses = ("pending", "delivered", *REQUEUE_STATUSES) if all_ else REQUEUE_STATUSES
    requeued = await service.requeue(session, task_pk=task_pk, statuses=statuses)
    return DeliveryList(items=[delivery_out(delivery, task_id) for delivery in requeued])


@post(
    "/api/v1/deliveries/{delivery_id:int}/retry",
    status_code=202,
    summary="Send one delivery again now, with a fresh round of attempts",
)
async def retry_delivery(delivery_id: DeliveryIdPath, session: DbSession) -> DeliveryOut:
    delivery, task_id = await service.get_delivery(session, delivery_id)
    # A pending delivery is already queued; sending it twice at once would only race its claim.
    if delivery.status != "pending":
        requeued = await service.requeue(session, delivery_id=delivery_id, statuses=(delivery.status,))
        if requeued:
            delivery = requeued[0]
    return delivery_out(delivery, task_id)


@get(
    "/api/v1/hooks/hosts",
    summary="Webhook hosts on a failure streak, and whether the circuit breaker paused them",
)
async def list_hook_hosts(session: DbSession) -> HookHostList:
    hosts: list[HookHost] = await service.list_hook_hosts(session)
    now = await service.database_now(session)
    return HookHostList(
        items=[
            HookHostOut(
                host=host.host,
                consecutive_failures=host.consecutive_failures,
                paused=host.paused_until is not None and host.paused_until > now,
                paused_until=host.paused_until,
                updated_at=host.updated_at,
            )
            for host in hosts
        ]
    )


DELIVERY_ROUTES = [list_task_deliveries, list_deliveries, redeliver_task, retry_delivery, list_hook_hosts]
