"""The API's reads of deliveries, attempts and hook hosts, and its re-queues."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.errors import NotFound
from service.models import Delivery, DeliveryAttempt, HookHost, Task
from service.vocabulary import DeliveryStatus
from service.webhooks.outbox import notify_dispatchers


async def task_pk_of(session: AsyncSession, task_id: str) -> int:
    pk = (await session.execute(select(Task.id).where(Task.task_id == task_id))).scalar_one_or_none()
    if pk is None:
        raise NotFound(f"task {task_id!r} is not tracked", extra={"task_id": task_id})
    return pk


async def deliveries_of_task(
    session: AsyncSession, task_pk: int
) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
    deliveries = list(
        (
            await session.execute(
                select(Delivery).where(Delivery.task_pk == task_pk).order_by(Delivery.event_seq, Delivery.id)
            )
        ).scalars()
    )
    attempts: dict[int, list[DeliveryAttempt]] = {delivery.id: [] for delivery in deliveries}
    if deliveries:
        rows = await session.execute(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id.in_(list(attempts)))
            .order_by(DeliveryAttempt.delivery_id, DeliveryAttempt.id)
        )
        for attempt in rows.scalars():
            attempts[attempt.delivery_id].append(attempt)
    return [(delivery, attempts[delivery.id]) for delivery in deliveries]


async def list_deliveries(
    session: AsyncSession, *, status: str | None, limit: int, before_id: int | None
) -> list[tuple[Delivery, str]]:
    """Newest first by id (a stable keyset cursor), each with its task's task_id."""
    query = (
        select(Delivery, Task.task_id)
        .join(Task, Task.id == Delivery.task_pk)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(Delivery.status == status)
    if before_id is not None:
        query = query.where(Delivery.id < before_id)
    return [(delivery, task_id) for delivery, task_id in await session.execute(query)]


async def requeue(
    session: AsyncSession,
    *,
    task_pk: int | None = None,
    delivery_id: int | None = None,
    statuses: Sequence[str],
) -> list[Delivery]:
    """Make matching deliveries due now with a fresh round of attempts; wakes the dispatchers on commit.

    `attempts` restarts at 0 so the retry schedule applies again; the attempt log keeps every earlier try.
    """
    query = (
        update(Delivery)
        .where(Delivery.status.in_(statuses))
        .values(status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=func.now())
        .returning(Delivery)
        # The API may have loaded these rows already: refresh them from RETURNING.
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    if task_pk is not None:
        query = query.where(Delivery.task_pk == task_pk)
    if delivery_id is not None:
        query = query.where(Delivery.id == delivery_id)
    requeued = list((await session.execute(query)).scalars())
    if requeued:
        await notify_dispatchers(session)
    return sorted(requeued, key=lambda delivery: delivery.id)


async def get_delivery(session: AsyncSession, delivery_id: int) -> tuple[Delivery, str]:
    query = select(Delivery, Task.task_id).join(Task, Task.id == Delivery.task_pk)
    row = (await session.execute(query.where(Delivery.id == delivery_id))).one_or_none()
    if row is None:
        raise NotFound(f"delivery {delivery_id} does not exist", extra={"delivery_id": delivery_id})
    delivery, task_id = row
    return delivery, task_id


async def list_hook_hosts(session: AsyncSession) -> list[HookHost]:
    query = select(HookHost).order_by(HookHost.paused_until.desc().nulls_last(), HookHost.host)
    return list((await session.execute(query)).scalars())
