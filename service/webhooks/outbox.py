"""The outbox: deliveries written in the transaction that records their transitions."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import Delivery, Task
from service.webhooks.bodies import TransitionNotice, render_body

# Postgres NOTIFY channel the dispatchers LISTEN on; a notification is sent only when the writer commits.
CHANNEL = "sunotrack_deliveries"


def new_webhook_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


async def notify_dispatchers(session: AsyncSession) -> None:
    """Wake every dispatcher once this transaction commits (Postgres folds repeats into one)."""
    await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


async def enqueue_deliveries(session: AsyncSession, notices: Sequence[TransitionNotice]) -> None:
    """Insert one outbox row per notice in the caller's transaction and wake the dispatchers on commit."""
    if not notices:
        return
    rows = [
        {
            "task_pk": notice.task_pk,
            "event_seq": notice.seq,
            "webhook_id": new_webhook_id(),
            "url": notice.notify_hook,
            "body": render_body(notice),
            "client_key": select(func.coalesce(Task.client_id, 0))
            .where(Task.id == notice.task_pk)
            .scalar_subquery(),
        }
        for notice in notices
    ]
    await session.execute(
        pg_insert(Delivery).values(rows).on_conflict_do_nothing(index_elements=["task_pk", "event_seq"])
    )
    await notify_dispatchers(session)
