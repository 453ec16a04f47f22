"""Inbound relay callbacks: point a task's relay-side notify_hook at /api/v1/callbacks/suno/<token>.

A callback is a hint, never a fact: whoever holds the token could say anything in its body. It makes
sunotrack poll that task at once (the refresh route's path, source `callback`), and only what the
relay answers is recorded; the body is kept in the detail of the first event that poll records. A
poll already in flight for the task (a poller's page, another callback) is taken as the poll this one
would have been, and a relay failing at that moment leaves the task as it was: polling goes on.
"""

from __future__ import annotations

import hmac
from typing import Any

import structlog
from litestar import Request, Response, post
from litestar.exceptions import NotAuthorizedException
from litestar.params import FromPath
from sqlalchemy.ext.asyncio import AsyncSession

from service.api import AppRuntime, DbSession
from service.api.schemas import decode_json, is_task_id
from service.config import Settings
from service.errors import InvalidInput, NotFound, UpstreamUnavailable
from service.metrics import CALLBACKS
from service.redact import mask_json
from service.runtime import CALLBACK_POLLS, Runtime
from service.tracking.service import poll_task
from service.upstream.dialects import parse_callback
from service.upstream.schemas import UpstreamError
from service.vocabulary import DEFAULT_RELAY, EventSource

log = structlog.get_logger()

# A callback body kept in an event's detail; a larger one is only described there.
HINT_MAX_BYTES = 16 * 1024


def _hint(body: bytes, value: Any, token: str) -> dict[str, Any]:
    if len(body) > HINT_MAX_BYTES:
        return {"omitted": f"a body of {len(body)} bytes (more than {HINT_MAX_BYTES})"}
    # The relay names the hook it calls, this route: its token is not kept.
    return {"body": mask_json(value, secret=token)}


@post(
    "/api/v1/callbacks/suno/{token:str}",
    status_code=200,
    summary="The `default` relay's notify_hook call for a tracked task: polls that task now",
    security=[],
)
async def relay_callback(
    token: FromPath[str], request: Request[Any, Any, Any], session: DbSession, runtime: AppRuntime
) -> Response[dict[str, str]]:
    return await _callback(DEFAULT_RELAY, token, request, session, runtime)


@post(
    "/api/v1/callbacks/suno/{relay:str}/{token:str}",
    status_code=200,
    summary="A named relay's notify_hook call for a tracked task: polls that task now",
    security=[],
)
async def named_relay_callback(
    relay: FromPath[str],
    token: FromPath[str],
    request: Request[Any, Any, Any],
    session: DbSession,
    runtime: AppRuntime,
) -> Response[dict[str, str]]:
    if relay not in runtime.settings.relays:
        raise NotFound(f"no relay is named {relay!r}")
    return await _callback(relay, token, request, session, runtime)


async def _callback(
    relay: str, token: str, request: Request[Any, Any, Any], session: AsyncSession, runtime: Runtime
) -> Response[dict[str, str]]:
    expected = runtime.settings.callback_token
    if expected is None:
        raise NotFound("relay callbacks are off (SUNOTRACK_CALLBACK_TOKEN is unset)")
    if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        CALLBACKS.labels("unauthorized").inc()
        raise NotAuthorizedException("invalid callback token")
    body = await request.body()
    value = decode_json(body)  # depth and NUL: 400 naming where
    try:
        snapshot = parse_callback(body)
    except UpstreamError as exc:
        CALLBACKS.labels("malformed").inc()
        raise InvalidInput(f"body: not a relay task object ({exc.code}): {exc.message}") from None
    task_id = snapshot.task_id
    answer = {"task_id": task_id}
    outcome: str
    try:
        if not is_task_id(task_id):
            raise NotFound("no task can have this id")
        if runtime.callback_polls.locked():
            raise UpstreamUnavailable(f"{CALLBACK_POLLS} callbacks' polls are in flight in this process")
        async with runtime.callback_polls:
            outcome = await poll_task(
                session,
                runtime.relays,
                task_id,
                source=EventSource.CALLBACK,
                settings=runtime.settings,
                relay=relay,
                hint=_hint(body, value, expected.get_secret_value()),
            )
    except NotFound:
        # Acknowledged so the relay does not retry a task nobody asked us to track.
        outcome = "ignored"
    except UpstreamUnavailable as exc:
        log.warning("callback.poll_failed", relay=relay, task_id=task_id, error=exc.detail)
        outcome = "deferred"
        answer["reason"] = exc.detail
    CALLBACKS.labels(outcome).inc()
    log.info("callback.received", relay=relay, task_id=task_id, outcome=outcome, reported=snapshot.raw_status)
    status_code = 200 if outcome in ("polled", "finished") else 202
    return Response({"status": outcome, **answer}, status_code=status_code)


CALLBACK_ROUTES = [relay_callback, named_relay_callback]


def callback_url(settings: Settings, relay: str = DEFAULT_RELAY) -> str | None:
    """Where `relay` reaches its callback route (None without SUNOTRACK_PUBLIC_URL). It holds the
    callback token: it goes to the relay only, never to a client."""
    if settings.public_url is None or settings.callback_token is None:
        return None
    named = "" if relay == DEFAULT_RELAY else f"{relay}/"
    return f"{settings.public_url}/api/v1/callbacks/suno/{named}{settings.callback_token.get_secret_value()}"
