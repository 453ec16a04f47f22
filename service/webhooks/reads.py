"""The API's reads of deliveries, attempts and hook hosts, and its re-queues."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, func, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.errors import NotFound
from service.models import Delivery, DeliveryAttempt, HookHost, Task
from service.vocabulary import DeliveryStatus
from service.webhooks.outbox import notify_dispatchers


def _of_client(client_id: int | None, every_client: bool) -> ColumnElement[bool]:
    """Deliveries of this client's tasks (None: the admin's), or of every client's."""
    if every_client:
        return true()
    return Task.client_id.is_(None) if client_id is None else Task.client_id == client_id


async def task_pk_of(session: AsyncSession, client_id: int | None, task_id: str) -> int:
    """The task's key, when it is this client's (None: the admin's)."""
    query = select(Task.id).where(Task.task_id == task_id, Task.client_id.is_not_distinct_from(client_id))
    pk = (await session.execute(query)).scalar_one_or_none()
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
    session: AsyncSession,
    *,
    client_id: int | None,
    every_client: bool,
    status: str | None,
    limit: int,
    before_id: int | None,
) -> list[tuple[Delivery, str]]:
    """Newest first by id (a stable keyset cursor), each with its task's task_id."""
    query = (
        select(Delivery, Task.task_id)
        .join(Task, Task.id == Delivery.task_pk)
        .where(_of_client(client_id, every_client))
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


async def replay(
    session: AsyncSession,
    scope: ColumnElement[bool],
    *,
    since: datetime,
    until: datetime,
    statuses: Sequence[str],
    task_ids: Sequence[str] | None,
) -> int:
    """Re-queue every delivery of the tasks in scope created in [since, until) with one of `statuses`
    (as requeue does); returns how many. Wakes the dispatchers on commit."""
    tasks = select(Task.id).where(scope)
    if task_ids is not None:
        tasks = tasks.where(Task.task_id.in_(task_ids))
    query = (
        update(Delivery)
        .where(
            Delivery.status.in_(statuses),
            Delivery.created_at >= since,
            Delivery.created_at < until,
            Delivery.task_pk.in_(tasks),
        )
        .values(status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=func.now())
        .execution_options(synchronize_session=False)
    )
    count = (await session.execute(query)).rowcount  # type: ignore[attr-defined]
    if count:
        await notify_dispatchers(session)
    return int(count)


async def get_delivery(
    session: AsyncSession, delivery_id: int, *, client_id: int | None, every_client: bool
) -> tuple[Delivery, str]:
    """A delivery of this client's tasks (or of anyone's, for every_client), with its task's task_id."""
    query = (
        select(Delivery, Task.task_id)
        .join(Task, Task.id == Delivery.task_pk)
        .where(Delivery.id == delivery_id, _of_client(client_id, every_client))
    )
    row = (await session.execute(query)).one_or_none()
    if row is None:
        raise NotFound(f"delivery {delivery_id} does not exist", extra={"delivery_id": delivery_id})
    delivery, task_id = row
    return delivery, task_id


async def hosts_waiting(
    session: AsyncSession, *, client_id: int | None, every_client: bool
) -> set[str] | None:
    """The host keys this client's deliveries still wait on (None: the admin's); None when the caller
    sees every client's. A host's state matters to a client while it has something to send there."""
    if every_client:
        return None
    query = select(Delivery.host).distinct()
    query = query.where(Delivery.client_key == (client_id or 0), Delivery.next_attempt_at.is_not(None))
    return set((await session.execute(query)).scalars())


async def list_hook_hosts(session: AsyncSession, *, visible: set[str] | None) -> list[HookHost]:
    """Hosts on a failure streak, paused ones first; only those in `visible` unless it is None."""
    query = select(HookHost).order_by(HookHost.paused_until.desc().nulls_last(), HookHost.host)
    hosts = list((await session.execute(query)).scalars())
    return hosts if visible is None else [host for host in hosts if host.host in visible]
