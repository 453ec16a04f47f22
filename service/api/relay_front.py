"""The relay front: the relay's own routes, answered by sunotrack (README, "Adopt sunotrack by changing
one URL").

A backend written against the relay points its base URL here and changes nothing else. Submits go to
the relay with the relay's key and come back as the relay answered them, the task registered first;
polls are answered from our database in the relay's format, so they cost the relay nothing however
often they come. The caller's `notify_hook` becomes the task's (signed, retried, relay-format bodies)
and never reaches the relay.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
import structlog
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from sqlalchemy.ext.asyncio import AsyncSession

from service.api import AppRuntime, DbSession
from service.api.auth import REGISTERS
from service.api.callbacks import callback_url
from service.api.connection import AUTOCOMMIT
from service.api.contract import ANSWERS, BODY, PASSED_THROUGH, PassedThrough
from service.api.schemas import (
    RelayBatchAnswer,
    RelayEnvelope,
    RelayNotExist,
    RelayStemsAnswer,
    RelaySubmitBody,
    RelayTaskAnswer,
    decode_json,
    is_task_id,
)
from service.clients.service import Caller
from service.errors import InvalidInput, NotFound, ServiceError, UpstreamUnavailable
from service.redact import mask_credentials
from service.runtime import Runtime
from service.tracking.repository import RelayView, relay_views
from service.tracking.service import record_snapshot, register_task
from service.upstream.client import RelayAnswer, RelayClient
from service.upstream.dialects import (
    TASK_NOT_EXIST,
    parse_stems,
    parse_submit,
    render_batch_answer,
    render_fetch_answer,
    render_stems,
    render_task,
)
from service.upstream.schemas import Dialect, UpstreamError
from service.vocabulary import EventSource, NotifyFormat, TaskKind
from service.webhooks.ssrf import check_hook_url

log = structlog.get_logger()

_JSON = "application/json"
_ACTION = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A batch poll names at most this many ids (the relay documents no limit; 10x its usual 50).
BATCH_MAX_IDS = 500
# Errors that mean the request never reached the relay: nothing can have been submitted.
_NOT_SENT = frozenset({"connect", "client_closed", "invalid_url"})


class SubmitAnswerLost(ServiceError):
    status_code = 504
    code = "submit_answer_lost"


class FetchBatch(msgspec.Struct):
    ids: Annotated[list[str], msgspec.Meta(max_length=BATCH_MAX_IDS)]
    action: str | None = None


_fetch_batch = msgspec.json.Decoder(FetchBatch)


@post(
    "/suno/submit/{action:str}",
    status_code=200,
    summary="The relay's submit, passed through to the caller's relay",
    opt={
        REGISTERS: True,
        BODY: RelaySubmitBody,
        PASSED_THROUGH: PassedThrough(
            RelayEnvelope,
            "The relay's answer, status and body as it came (a task registered only from a 2xx one "
            "carrying its id)",
        ),
    },
)
async def submit(
    action: FromPath[str],
    request: Request[Any, Any, Any],
    session: DbSession,
    runtime: AppRuntime,
    caller: NamedDependency[Caller],
) -> Response[bytes]:
    """Forwarded to the relay with its key; its answer is returned as it came. A task id in a success
    answer is registered (kind from the action) before the answer is returned; the body's notify_hook
    becomes the task's and is not forwarded. Never retried: a retry can create a second paid job."""
    if not _ACTION.fullmatch(action):
        raise NotFound(f"no relay action {action!r}")
    relay = _relay(runtime, caller)
    body = await request.body()
    payload = decode_json(body)
    if not isinstance(payload, dict):
        raise InvalidInput("body: must be a JSON object, as the relay takes it")
    hook = await _take_hook(payload, runtime)
    public_hook = callback_url(runtime.settings, relay.name)
    if public_hook is not None:
        payload["notify_hook"] = public_hook
    forwarded = msgspec.json.encode(payload) if hook is not None or public_hook is not None else body
    try:
        answer = await relay.forward("POST", f"/suno/submit/{action}", forwarded)
    except UpstreamError as exc:
        if exc.code in _NOT_SENT:
            raise UpstreamUnavailable(
                f"the relay could not be reached, nothing was submitted: {exc.message}",
                extra={"upstream_code": exc.code},
            ) from exc
        log.warning("relay_front.submit_answer_lost", action=action, code=exc.code)
        raise SubmitAnswerLost(
            f"the relay took the submit but its answer was lost ({exc.code}): the job may exist "
            "upstream; it was not retried, and nothing was registered",
            extra={"upstream_code": exc.code},
        ) from exc
    task_id = _submitted_task_id(answer)
    if task_id is not None:
        kind = TaskKind.LYRICS if action.lower() == "lyrics" else TaskKind.MUSIC
        await register_task(
            session,
            client_id=caller.client_id,
            task_id=task_id,
            kind=kind,
            default_relay=caller.relay,
            notify_hook=hook,
            notify_format=None if hook is None else NotifyFormat.RELAY,
            metadata=None,
            settings=runtime.settings,
        )
        log.info(
            "relay_front.submitted", task_id=task_id, kind=kind, client=caller.name, hook=hook is not None
        )
    return _passed_back(answer)


@get(
    "/suno/fetch/{task_id:str}",
    summary="The relay's task poll, answered from our database",
    opt={ANSWERS: {200: RelayTaskAnswer, 400: RelayNotExist}, AUTOCOMMIT: True},
)
async def fetch_one(
    task_id: FromPath[str], session: DbSession, runtime: AppRuntime, caller: NamedDependency[Caller]
) -> Response[bytes]:
    """400 `task_not_exist`, as the relay answers, for an id the caller does not track."""
    views = await relay_views(session, caller.client_id, [task_id]) if is_task_id(task_id) else {}
    view = views.get(task_id)
    if view is None:
        return Response(TASK_NOT_EXIST, status_code=400, media_type=_JSON)
    return Response(render_fetch_answer(_render(view, runtime)), media_type=_JSON)


@post(
    "/suno/fetch",
    status_code=200,
    summary="The relay's batch poll, answered from our database",
    opt={BODY: FetchBatch, ANSWERS: {200: RelayBatchAnswer}, AUTOCOMMIT: True},
)
async def fetch_batch(
    request: Request[Any, Any, Any], session: DbSession, runtime: AppRuntime, caller: NamedDependency[Caller]
) -> Response[bytes]:
    """`{"ids": [...], "action": ...}`: the tasks the caller tracks, in the order asked; others are
    left out, as the relay leaves out ids it does not know."""
    return await _batch(await request.body(), session, runtime, caller)


@post(
    "/suno/submit/fetch",
    status_code=200,
    summary="The relay's batch poll (its submit-style path)",
    opt={BODY: FetchBatch, ANSWERS: {200: RelayBatchAnswer}, AUTOCOMMIT: True},
)
async def submit_fetch(
    request: Request[Any, Any, Any], session: DbSession, runtime: AppRuntime, caller: NamedDependency[Caller]
) -> Response[bytes]:
    return await _batch(await request.body(), session, runtime, caller)


@get(
    "/suno/act/stems/{clip_id:str}",
    summary="The relay's stem separation, tracked",
    opt={
        ANSWERS: {200: RelayStemsAnswer, 400: RelayNotExist},
        PASSED_THROUGH: PassedThrough(
            RelayEnvelope,
            "First call: the relay's answer, status and body as it came, when it is not a stems answer "
            "(nothing registered then)",
        ),
    },
)
async def stems(
    clip_id: FromPath[str], session: DbSession, runtime: AppRuntime, caller: NamedDependency[Caller]
) -> Response[bytes]:
    """The first call asks the relay (which starts the separation) and registers a stems task for the
    clip; this call and every later one are answered from our state. A relay failure on the first
    call is passed back as it came, and nothing is registered."""
    if not is_task_id(clip_id):
        return Response(TASK_NOT_EXIST, status_code=400, media_type=_JSON)
    view = (await relay_views(session, caller.client_id, [clip_id])).get(clip_id)
    if view is None or view.kind != TaskKind.STEMS:
        relay = _relay(runtime, caller)
        try:
            answer = await relay.forward("GET", f"/suno/act/stems/{clip_id}")
        except UpstreamError as exc:
            raise UpstreamUnavailable(
                f"the relay did not answer: {exc.message}", extra={"upstream_code": exc.code}
            ) from exc
        if not 200 <= answer.status < 300:
            return _passed_back(answer)
        try:
            snapshot = parse_stems(answer.body, clip_id)
        except UpstreamError:
            return _passed_back(answer)
        settings = runtime.settings
        task, _created = await register_task(
            session, client_id=caller.client_id, task_id=clip_id, kind=TaskKind.STEMS,
            default_relay=caller.relay, notify_hook=None, notify_format=None, metadata=None,
            settings=settings,
        )  # fmt: skip
        await record_snapshot(session, snapshot, source=EventSource.API, settings=settings, pks=[task["id"]])
        view = (await relay_views(session, caller.client_id, [clip_id]))[clip_id]
    return Response(render_stems(view.clips, _last_answer(view, runtime)), media_type=_JSON)


RELAY_FRONT_ROUTES = [submit, fetch_one, fetch_batch, submit_fetch, stems]


async def _batch(body: bytes, session: AsyncSession, runtime: Runtime, caller: Caller) -> Response[bytes]:
    decode_json(body)  # depth and NUL: 400 naming where
    try:
        ids = _fetch_batch.decode(body).ids
    except msgspec.DecodeError as exc:
        raise InvalidInput(f'body: expected {{"ids": [...], "action": "MUSIC"}} ({exc})') from None
    wanted = [task_id for task_id in dict.fromkeys(ids) if is_task_id(task_id)]
    views = await relay_views(session, caller.client_id, wanted)
    tasks = [_render(views[task_id], runtime) for task_id in wanted if task_id in views]
    return Response(render_batch_answer(tasks), media_type=_JSON)


def _render(view: RelayView, runtime: Runtime) -> bytes:
    return render_task(
        task_id=view.task_id,
        kind=view.kind,
        status=view.status,
        progress=view.progress,
        fail_reason=view.fail_reason,
        finished_at=view.finished_at,
        notify_hook=None if view.notify_hook is None else mask_credentials(view.notify_hook),
        clips=view.clips,
        last_answer=_last_answer(view, runtime),
    )


def _last_answer(view: RelayView, runtime: Runtime) -> bytes | None:
    """The relay's last answer, when it is in the shape we answer in (a v1 relay's is not)."""
    if view.last_answer is None:
        return None
    relay = runtime.settings.relays.get(view.relay)
    if view.kind != TaskKind.STEMS and (relay is None or relay.dialect is not Dialect.FETCH):
        return None
    return view.last_answer.encode()


def _relay(runtime: Runtime, caller: Caller) -> RelayClient:
    """The caller's relay: the one its client was created with (the admin's: `default`)."""
    relay = runtime.relays.get(caller.relay)
    if relay is None:
        raise UpstreamUnavailable(f"relay {caller.relay!r} is not configured")
    return relay


async def _take_hook(payload: dict[str, Any], runtime: Runtime) -> str | None:
    """The body's notify_hook, checked like a registered one (400 before anything is submitted) and
    taken out of the body."""
    hook = payload.pop("notify_hook", None)
    if hook is None or hook == "":
        return None
    if not isinstance(hook, str):
        raise InvalidInput("notify_hook: must be a URL string", extra={"field": "notify_hook"})
    await check_hook_url(hook, allow_private=runtime.settings.allow_private_hooks)
    return hook


def _submitted_task_id(answer: RelayAnswer) -> str | None:
    if not 200 <= answer.status < 300:
        return None
    try:
        task_id = parse_submit(answer.body)
    except UpstreamError:
        return None
    if not is_task_id(task_id):
        log.warning("relay_front.unusable_task_id", length=len(task_id))
        return None
    return task_id


def _passed_back(answer: RelayAnswer) -> Response[bytes]:
    # As a header, not a media type: Litestar would add a second charset to a text/* one that has one.
    headers = {"Content-Type": answer.content_type or _JSON}
    if answer.retry_after is not None:
        headers["Retry-After"] = answer.retry_after
    return Response(answer.body, status_code=answer.status, headers=headers)
