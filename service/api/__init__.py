"""The HTTP edge. Handlers receive these two app-wide dependencies (provided in service.app)."""

from __future__ import annotations

from typing import Annotated

from litestar.di import NamedDependency
from litestar.params import PathParameter
from sqlalchemy.ext.asyncio import AsyncSession

from service.runtime import Runtime

# The request's unit of work: committed after the handler returns, rolled back if it raises.
DbSession = NamedDependency[AsyncSession]
AppRuntime = NamedDependency[Runtime]

TaskIdPath = Annotated[str, PathParameter(description="The relay's task id", max_length=128)]
