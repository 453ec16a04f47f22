"""Webhook delivery endpoints: per-task logs, the dead-letter listing, re-queues, breaker state."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, get, post
from litestar.params import FromQuery, JSONBody, PathParameter, QueryParameter

from service.api import AppDispatcher, AppRuntime, DbSession, TaskIdPath, TaskOwner, task_scope
from service.api.schemas import (
    INT64_MAX,
    DeliveryList,
    DeliveryOut,
    DeliveryPage,
    HookHostList,
    HookHostOut,
    ReplayDeliveries,
    ReplayResult,
    decode_cursor,
    delivery_out,
    encode_cursor,
    strict_body,
)
from service.db import database_now
from service.vocabulary import DeliveryStatus
from service.webhooks import reads

# Litestar writes bounds into the schema as floats, where 2**63 - 1 would read 2**63.
DeliveryIdPath = Annotated[
    int,
    PathParameter(description="The delivery's id", ge=1, le=INT64_MAX, schema_extra={"maximum": INT64_MAX}),
]
REQUEUE_STATUSES = (DeliveryStatus.FAILED, DeliveryStatus.DEAD)


@get("/api/v1/tasks/{task_id:str}/deliveries", summary="A task's webhook deliveries with their attempt logs")
async def list_task_deliveries(task_id: TaskIdPath, session: DbSession, owner: TaskOwner) -> DeliveryList:
    task_pk = await reads.task_pk_of(session, owner.client_id, task_id)
    deliveries = await reads.deliveries_of_task(session, task_pk)
    return DeliveryList(items=[delivery_out(d, task_id, attempts) for d, attempts in deliveries])


@get("/api/v1/deliveries", summary="Deliveries, newest first, with keyset pagination")
async def list_deliveries(
    session: DbSession,
    owner: TaskOwner,
    status: FromQuery[DeliveryStatus | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, QueryParameter(max_length=64)] = None,
) -> DeliveryPage:
    rows = await reads.list_deliveries(
        session,
        client_id=owner.client_id,
        every_client=owner.every_client,
        status=status,
        limit=limit + 1,
        before_id=decode_cursor("d", cursor) if cursor else None,
    )
    page, more = rows[:limit], len(rows) > limit
    return DeliveryPage(
        items=[delivery_out(delivery, task_id) for delivery, task_id in page],
        next_cursor=encode_cursor("d", page[-1][0].id) if more else None,
    )


@post(
    "/api/v1/tasks/{task_id:str}/redeliver",
    status_code=202,
    summary="Re-queue a task's failed and dead deliveries (all of them with ?all=true)",
)
async def redeliver_task(
    task_id: TaskIdPath,
    session: DbSession,
    owner: TaskOwner,
    # Named as the query parameter, so that its validation errors name it too.
    all: Annotated[bool, QueryParameter(description="Also re-send pending and delivered")] = False,
) -> DeliveryList:
    task_pk = await reads.task_pk_of(session, owner.client_id, task_id)
    statuses = tuple(DeliveryStatus) if all else REQUEUE_STATUSES
    requeued = await reads.requeue(session, task_pk=task_pk, statuses=statuses)
    return DeliveryList(items=[delivery_out(delivery, task_id) for delivery in requeued])


@post(
    "/api/v1/deliveries/{delivery_id:int}/retry",
    status_code=202,
    summary="Send one delivery again now, with a fresh round of attempts",
)
async def retry_delivery(delivery_id: DeliveryIdPath, session: DbSession, owner: TaskOwner) -> DeliveryOut:
    """The admin may retry anyone's delivery (ids are unique); ?client=NAME narrows to that client's."""
    delivery, task_id = await reads.get_delivery(
        session, delivery_id, client_id=owner.client_id, every_client=owner.every_client
    )
    # A pending delivery is already queued; sending it twice at once would only race its claim.
    if delivery.status != DeliveryStatus.PENDING:
        requeued = await reads.requeue(session, delivery_id=delivery_id, statuses=(delivery.status,))
        if requeued:
            delivery = requeued[0]
    return delivery_out(delivery, task_id)


@post(
    "/api/v1/deliveries/replay",
    status_code=202,
    summary="Re-queue every matching delivery (not one page of them); answers how many",
    description=(
        "Deliveries created in [since, until) (until: now by default) with one of `status` (failed and dead "
        "by default), of the given tasks if `task_ids`. Delivered ones only with `include_delivered: true` "
        "(which adds them); an empty window matches nothing."
    ),
)
async def replay_deliveries(
    data: JSONBody[ReplayDeliveries], request: Request[Any, Any, Any], session: DbSession, owner: TaskOwner
) -> ReplayResult:
    data = await strict_body(request, ReplayDeliveries)
    statuses = {DeliveryStatus(status) for status in data.status}
    if data.include_delivered:
        statuses.add(DeliveryStatus.DELIVERED)
    else:
        statuses.discard(DeliveryStatus.DELIVERED)
    until = data.until or await database_now(session)
    count = await reads.replay(
        session,
        task_scope(owner),
        since=data.since,
        until=until,
        statuses=sorted(statuses),
        task_ids=data.task_ids,
    )
    return ReplayResult(requeued=count)


@get(
    "/api/v1/hooks/hosts",
    summary="Webhook hosts: this process's sends in flight, shares and answer times; the circuit breaker",
)
async def list_hook_hosts(
    session: DbSession, owner: TaskOwner, runtime: AppRuntime, dispatcher: AppDispatcher
) -> HookHostList:
    visible = await reads.hosts_waiting(session, client_id=owner.client_id, every_client=owner.every_client)
    breaker = {host.host: host for host in await reads.list_hook_hosts(session, visible=visible)}
    now = await database_now(session)
    live = {
        view.host: view
        for view in (dispatcher.hosts() if dispatcher is not None else [])
        if visible is None or view.host in visible
    }
    # Paused hosts first (the breaker's order), then the others by name.
    order = list(breaker) + sorted(live.keys() - breaker.keys())
    full_share = runtime.settings.hook_host_concurrency
    items = []
    for name in order:
        host, view = breaker.get(name), live.get(name)
        if view is None:
            in_flight = 0
        elif owner.every_client:
            in_flight = view.in_flight
        else:  # only this client's own requests
            in_flight = view.in_flight_by_client.get(owner.client_id or 0, 0)
        items.append(
            HookHostOut(
                host=name,
                consecutive_failures=host.consecutive_failures if host else 0,
                paused=host is not None and host.paused_until is not None and host.paused_until > now,
                paused_until=host.paused_until if host else None,
                updated_at=host.updated_at if host else None,
                in_flight=in_flight,
                share=view.share if view else full_share,
                slow=view is not None and view.slow,
                recent_attempts=view.recent_attempts if view else 0,
                p50_ms=view.p50_ms if view else None,
                p90_ms=view.p90_ms if view else None,
            )
        )
    return HookHostList(
        instance_id=runtime.instance_id if dispatcher is not None else None,
        host_concurrency=full_share,
        items=items,
    )


DELIVERY_ROUTES = [
    list_task_deliveries,
    list_deliveries,
    replay_deliveries,
    redeliver_task,
    retry_delivery,
    list_hook_hosts,
]
