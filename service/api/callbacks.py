"""Inbound relay callbacks: point a task's relay-side notify_hook at /api/v1/callbacks/suno/<token>.

The relay's own callbacks are fire-and-forget, so they only speed things up; polling stays the source
of truth. A callback goes through the same recording function as a poll (source `callback`), under the
task's row lock, so a callback and a poll racing each other never record a change twice.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request, Response, post
from litestar.exceptions import NotAuthorizedException
from litestar.params import FromPath

from service.api import AppRuntime, DbSession
from service.api.schemas import decode_json
from service.errors import InvalidInput, NotFound
from service.metrics import CALLBACKS
from service.tracking.service import record_snapshot
from service.upstream.dialects import parse_callback
from service.upstream.schemas import UpstreamError
from service.vocabulary import EventSource


@post(
    "/api/v1/callbacks/suno/{token:str}",
    status_code=200,
    summary="The relay's notify_hook call for a tracked task",
    security=[],
)
async def relay_callback(
    token: FromPath[str], request: Request[Any, Any, Any], session: DbSession, runtime: AppRuntime
) -> Response[dict[str, str]]:
    expected = runtime.settings.callback_token
    if expected is None:
        raise NotFound("relay callbacks are off (SUNOTRACK_CALLBACK_TOKEN is unset)")
    if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        CALLBACKS.labels("unauthorized").inc()
        raise NotAuthorizedException("invalid callback token")
    body = await request.body()
    decode_json(body)  # depth and NUL: 400 naming where
    try:
        snapshot = parse_callback(body)
    except UpstreamError as exc:
        CALLBACKS.labels("malformed").inc()
        raise InvalidInput(f"body: not a relay task object ({exc.code}): {exc.message}") from None
    if not await record_snapshot(session, snapshot, source=EventSource.CALLBACK, settings=runtime.settings):
        # Acknowledged so the relay does not retry a task nobody asked us to track.
        CALLBACKS.labels("unknown_task").inc()
        return Response({"status": "ignored", "task_id": snapshot.task_id}, status_code=202)
    CALLBACKS.labels("recorded").inc()
    return Response({"status": "recorded", "task_id": snapshot.task_id}, status_code=200)


CALLBACK_ROUTES = [relay_callback]
