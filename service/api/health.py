"""Liveness, readiness and metrics: unauthenticated, for orchestrators and scrapers."""

from __future__ import annotations

from litestar import MediaType, Response, get
from litestar.exceptions import ServiceUnavailableException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.api import AppRuntime
from service.metrics import REGISTRY


@get("/healthz", summary="The process is up", include_in_schema=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="The database answers")
async def readyz(runtime: AppRuntime) -> dict[str, str]:
    try:
        async with runtime.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as exc:
        raise ServiceUnavailableException(f"database unreachable: {type(exc).__name__}") from None
    return {"status": "ok", "database": "ok"}


@get("/metrics", summary="Prometheus metrics (text exposition format)", media_type=MediaType.TEXT)
async def metrics() -> Response[bytes]:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


HEALTH_ROUTES = [healthz, readyz, metrics]
