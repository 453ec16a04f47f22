"""The outbox: deliveries written in the transaction that records their transitions."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from service.webhooks.bodies import TransitionNotice, render_body

# Postgres NOTIFY channel the dispatchers LISTEN on; a notification is sent only when the writer commits.
CHANNEL = "sunotrack_deliveries"


def new_webhook_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


async def notify_dispatchers(session: AsyncSession) -> None:
    """Wake every dispatcher once this transaction commits (Postgres folds repeats into one)."""
    await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


# One statement for a page's deliveries, the rows as arrays: each row's client key is joined from its
# task here, not by a scalar subquery SQLAlchemy would build in Python for every row (docs/design.md,
# "The outbox insert"). Ids follow the notices' order: a task's transitions go out in it.
_ENQUEUE = text(
    """
    INSERT INTO deliveries (task_pk, event_seq, webhook_id, url, body, client_key)
    SELECT v.task_pk, v.event_seq, v.webhook_id, v.url, v.body, coalesce(tasks.client_id, 0)
    FROM unnest(
        CAST(:task_pks AS bigint[]), CAST(:seqs AS integer[]), CAST(:webhook_ids AS text[]),
        CAST(:urls AS text[]), CAST(:bodies AS bytea[])
    ) WITH ORDINALITY AS v(task_pk, event_seq, webhook_id, url, body, position)
    JOIN tasks ON tasks.id = v.task_pk
    ORDER BY v.position
    ON CONFLICT (task_pk, event_seq) DO NOTHING
    """
)


async def enqueue_deliveries(session: AsyncSession, notices: Sequence[TransitionNotice]) -> None:
    """Insert one outbox row per notice in the caller's transaction and wake the dispatchers on commit."""
    if not notices:
        return
    await session.execute(
        _ENQUEUE,
        {
            "task_pks": [notice.task_pk for notice in notices],
            "seqs": [notice.seq for notice in notices],
            "webhook_ids": [new_webhook_id() for _ in notices],
            "urls": [notice.notify_hook for notice in notices],
            "bodies": [render_body(notice) for notice in notices],
        },
    )
    await notify_dispatchers(session)
