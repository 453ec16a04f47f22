"""The HTTP edge. Handlers receive these app-wide dependencies (provided in service.app)."""

from __future__ import annotations

from typing import Annotated

from litestar.di import NamedDependency
from litestar.params import PathParameter
from sqlalchemy import ColumnElement, true
from sqlalchemy.ext.asyncio import AsyncSession

from service.api.auth import Owner
from service.api.schemas import TASK_ID_MAX_LENGTH, TASK_ID_PATTERN
from service.clients.service import Caller
from service.models import TaskEvent
from service.runtime import Runtime
from service.tracking.repository import owned_by
from service.webhooks.jobs import Dispatcher

# The request's unit of work: committed after the handler returns, rolled back if it raises.
DbSession = NamedDependency[AsyncSession]
AppRuntime = NamedDependency[Runtime]
# Who is asking (service.api.auth), and whose tasks the request addresses.
AppCaller = NamedDependency[Caller]
TaskOwner = NamedDependency[Owner]
# This process's webhook dispatcher; None when it runs no background jobs.
AppDispatcher = NamedDependency[Dispatcher | None]

TaskIdPath = Annotated[
    str,
    PathParameter(
        description="The relay's task id",
        min_length=1,
        max_length=TASK_ID_MAX_LENGTH,
        pattern=TASK_ID_PATTERN,
    ),
]


def task_scope(owner: Owner) -> ColumnElement[bool]:
    """The tasks a request may see, as one condition on tasks: every client's for the admin without
    ?client, else the owner's (the admin's own when client_id is None)."""
    return true() if owner.every_client else owned_by(owner.client_id)


def event_scope(owner: Owner) -> ColumnElement[bool]:
    """The same, on the feed's events (each carries its task's client_id: ix_task_events_client_feed)."""
    if owner.every_client:
        return true()
    client_id = owner.client_id
    return TaskEvent.client_id.is_(None) if client_id is None else TaskEvent.client_id == client_id
