"""The long-lived resources the lifespan builds once and every edge and job shares."""

from __future__ import annotations

from dataclasses import dataclass

# Real imports, not TYPE_CHECKING ones: Litestar resolves these annotations when it injects a Runtime.
import aiohttp
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from service.db import SessionMaker
from service.upstream.client import RelayClient


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: SessionMaker
    http: aiohttp.ClientSession
    relay: RelayClient | None  # None when SUNO_BASE_URL is unset: nothing to poll
    scheduler: AsyncIOScheduler
    # Identifies this process in logs and leases (host:pid:random).
    instance_id: str
