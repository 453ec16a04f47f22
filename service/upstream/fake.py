"""A fake relay: a real aiohttp server that speaks the documented relay shapes.

Tasks follow scripted lifecycles (a list of stages). A task's current stage is

    min(last stage, advance() calls + successful serves [per_poll] + elapsed // stage_s [timed])

so a `per_poll` task is served its first stage on the first fetch and moves one stage after every
answer that included it (any endpoint; a request that failed through an injected fault or left the
task out does not count, because the client never saw that stage). `timed` tasks move every
`stage_s` seconds (the demo), `manual` ones only on `advance()`. The last stage sticks.

Documents are rendered from per-(kind, stage, shape) templates with the task's ids spliced in as
bytes, so serving a batch of 6.5 KB tasks costs a few joins, not dict building and encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hmac
import os
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import msgspec
import structlog
from aiohttp import web

from service.vocabulary import TaskKind

__all__ = [
    "Advance",
    "FakeRelay",
    "Fault",
    "FaultKind",
    "Lifecycle",
    "Stage",
    "run_fake_relay",
    "stage",
]

log = structlog.get_logger()

Window = tuple[float, float]


class Advance(enum.StrEnum):
    PER_POLL = "per_poll"
    TIMED = "timed"
    MANUAL = "manual"


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of a scripted lifecycle.

    `status` is the relay's task status (NOT_START, SUBMITTED, QUEUED, IN_PROGRESS, SUCCESS,
    FAILURE, UNKNOWN, or anything else to test unrecognised values). `part` is the status of the
    clips (or of the lyrics object) at this stage; None means the relay has no clips yet.
    """

    status: str
    part: str | None
    progress: str = "0%"
    error: str | None = None
    fail_reason: str = ""


_MODERATION = "Unable to generate audio: the lyrics were flagged by moderation. Try different lyrics."

_STAGES: dict[str, Stage] = {
    "NOT_START": Stage("NOT_START", None),
    "SUBMITTED": Stage("SUBMITTED", "submitted"),
    "QUEUED": Stage("QUEUED", "queued"),
    "IN_PROGRESS": Stage("IN_PROGRESS", "streaming", "45%"),
    "SUCCESS": Stage("SUCCESS", "complete", "100%"),
    "FAILURE": Stage("FAILURE", "error", "100%", error=_MODERATION),
    "UNKNOWN": Stage("UNKNOWN", None),
}


def stage(status: str) -> Stage:
    """The default stage for a relay status name (unknown names get no clips)."""
    return _STAGES.get(status, Stage(status, None))


class Lifecycle(enum.StrEnum):
    MUSIC_SUCCESS = "music_success"
    MUSIC_FAILURE = "music_failure"
    LYRICS = "lyrics"
    STEMS = "stems"
    UNKNOWN_BLIP = "unknown_blip"  # an UNKNOWN stage (no clips) between queued and streaming
    REGRESSION = "regression"  # complete, then queued once, then complete again
    NEVER_FINISHES = "never_finishes"


def _script(*names: str) -> tuple[Stage, ...]:
    return tuple(stage(name) for name in names)


_SCRIPTS: dict[Lifecycle, tuple[TaskKind, tuple[Stage, ...]]] = {
    Lifecycle.MUSIC_SUCCESS: (TaskKind.MUSIC, _script("SUBMITTED", "QUEUED", "IN_PROGRESS", "SUCCESS")),
    Lifecycle.MUSIC_FAILURE: (TaskKind.MUSIC, _script("SUBMITTED", "QUEUED", "IN_PROGRESS", "FAILURE")),
    Lifecycle.LYRICS: (TaskKind.LYRICS, _script("SUBMITTED", "IN_PROGRESS", "SUCCESS")),
    Lifecycle.STEMS: (TaskKind.STEMS, _script("QUEUED", "IN_PROGRESS", "SUCCESS")),
    Lifecycle.UNKNOWN_BLIP: (
        TaskKind.MUSIC,
        _script("SUBMITTED", "QUEUED", "UNKNOWN", "IN_PROGRESS", "SUCCESS"),
    ),
    Lifecycle.REGRESSION: (
        TaskKind.MUSIC,
        _script("SUBMITTED", "QUEUED", "IN_PROGRESS", "SUCCESS", "QUEUED", "SUCCESS"),
    ),
    Lifecycle.NEVER_FINISHES: (TaskKind.MUSIC, _script("SUBMITTED", "QUEUED", "IN_PROGRESS")),
}


class FaultKind(enum.StrEnum):
    LATENCY = "latency"  # answer after `latency_s`
    HTTP_ERROR = "http_error"  # answer `status` (default 500) with an error envelope
    RATE_LIMIT = "rate_limit"  # 429 with Retry-After
    GARBAGE = "garbage"  # 200 with an HTML page (or `body`)
    DROP = "drop"  # close the connection without answering
    TRUNCATE = "truncate"  # promise the whole body, send half, close
    MISSING = "missing"  # leave the task out of batch answers
    NOT_FOUND = "not_found"  # answer task_not_exist for it, and leave it out of batches


_RESPONSE_FAULTS = frozenset(
    {FaultKind.HTTP_ERROR, FaultKind.RATE_LIMIT, FaultKind.GARBAGE, FaultKind.DROP, FaultKind.TRUNCATE}
)


@dataclass(slots=True, eq=False)
class Fault:
    """An injected fault. `remaining` None means until cleared; `hits` counts requests it affected."""

    kind: FaultKind
    task_id: str | None = None
    remaining: int | None = None
    latency_s: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    body: bytes | None = None
    hits: int = 0

    @property
    def active(self) -> bool:
        return self.remaining is None or self.remaining > 0

    def hit(self) -> None:
        self.hits += 1
        if self.remaining is not None:
            self.remaining -= 1


class _Shape(enum.Enum):
    FETCH = "fetch"  # the task object of the fetch family (inside the envelope or a batch array)
    V1 = "v1"  # the `data` object of the v1 document
    STEMS = "stems"  # the whole stems document


@dataclass(slots=True, eq=False)
class _Task:
    task_id: str
    kind: TaskKind
    stages: tuple[Stage, ...]
    advance: Advance
    stage_s: float
    values: dict[str, bytes]
    clip_ids: tuple[str, ...]
    created: float = field(default_factory=time.monotonic)
    offset: int = 0
    served: int = 0
    started_at: int = 0
    finished_at: int = 0
    # A verbatim document (test fixtures): served as is, its `data` object inside batch answers.
    document: bytes | None = None
    document_task: bytes | None = None

    def stage_index(self, now: float) -> int:
        index = self.offset
        if self.advance is Advance.PER_POLL:
            index += self.served
        elif self.advance is Advance.TIMED:
            index += int((now - self.created) / self.stage_s)
        return min(index, len(self.stages) - 1)


class _SavedTask(msgspec.Struct):
    """A task as `state_file` keeps it; `created_at` is wall-clock time, so timed tasks move on across
    restarts as if the relay had never stopped."""

    task_id: str
    kind: TaskKind
    stages: tuple[Stage, ...]
    advance: Advance
    stage_s: float
    values: dict[str, str]
    clip_ids: tuple[str, ...]
    created_at: float
    offset: int


class _BatchRequest(msgspec.Struct):
    ids: list[str]
    action: str | None = None


class _EnvelopeData(msgspec.Struct):
    data: msgspec.Raw = msgspec.Raw()


_batch_request = msgspec.json.Decoder(_BatchRequest)
_json_object = msgspec.json.Decoder(dict[str, Any])
_HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
_JSON = "application/json"


class FakeRelay:
    """An in-process relay for tests, benchmarks and the demo.

    `requests` counts requests per endpoint (fetch, fetch_batch, submit_fetch, v1, stems,
    submit_music, submit_lyrics); `task_requests` counts requests that named each task; `windows`
    holds each such request's (start, end) on the monotonic clock, so `overlaps()` can show a task
    polled by two requests at once; `batches` lists the ids of each batch request in arrival order,
    `submitted` the body of each submit.
    The last two grow with every request: a long-running relay turns them off (`record_windows`).
    With a `state_file` (the demo's), the scripted tasks are kept there and reloaded on start, so a
    restarted relay still knows the tasks it was asked about before.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        default_advance: Advance = Advance.PER_POLL,
        stage_s: float = 4.0,
        record_windows: bool = True,
        state_file: Path | None = None,
    ) -> None:
        self._auth = f"Bearer {api_key}".encode() if api_key else None
        self.default_advance = default_advance
        self.stage_s = stage_s
        self.record_windows = record_windows
        self._tasks: dict[str, _Task] = {}
        self._clip_owner: dict[str, str] = {}
        self._global_faults: list[Fault] = []
        self._task_faults: dict[str, list[Fault]] = {}
        self.requests: Counter[str] = Counter()
        self.task_requests: Counter[str] = Counter()
        self.windows: defaultdict[str, list[Window]] = defaultdict(list)
        self.batches: list[tuple[str, ...]] = []
        # Every submit body that was read, in arrival order.
        self.submitted: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.state_file = state_file
        if state_file is not None and state_file.exists():
            self._load(state_file)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = any free port) and return the base URL."""
        app = web.Application()
        app.router.add_get("/suno/fetch/{task_id}", self._fetch)
        app.router.add_post("/suno/fetch", self._fetch_batch)
        app.router.add_post("/suno/submit/fetch", self._submit_fetch)
        app.router.add_get("/suno/v1/v3.0/music/{task_id}", self._fetch_v1)
        app.router.add_get("/suno/act/stems/{clip_id}", self._fetch_stems)
        app.router.add_post("/suno/submit/music", self._submit_music)
        app.router.add_post("/suno/submit/lyrics", self._submit_lyrics)
        # A short shutdown grace: handlers sleeping on injected latency must not hold up stop().
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        self.base_url = f"http://{_url_host(bound_host)}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def add_task(
        self,
        task_id: str | None = None,
        lifecycle: Lifecycle = Lifecycle.MUSIC_SUCCESS,
        *,
        stages: Sequence[Stage | str] | None = None,
        kind: TaskKind | None = None,
        advance: Advance | None = None,
        stage_s: float | None = None,
        title: str = "Neon Harbor",
        notify_hook: str = "",
    ) -> str:
        """Create a task following `lifecycle` (or the given `stages`) and return its id."""
        script_kind, script = _SCRIPTS[lifecycle]
        if stages is not None:
            script = tuple(stage(s) if isinstance(s, str) else s for s in stages)
            if not script:
                raise ValueError("a task needs at least one stage")
        kind = kind or script_kind
        if task_id is None:
            task_id = f"task_{uuid.uuid4().hex}" if kind is TaskKind.LYRICS else str(uuid.uuid4())
        clip_count = 1 if kind is TaskKind.LYRICS else 2
        clip_ids = tuple(str(uuid.uuid4()) for _ in range(clip_count))
        submitted = int(time.time())
        values = {
            "task_id": _inner(task_id),
            "title": _inner(title),
            "notify_hook": _inner(notify_hook),
            "submit_time": str(submitted).encode(),
            "created": datetime.fromtimestamp(submitted, UTC).isoformat().encode(),
        }
        for n, clip_id in enumerate(clip_ids):
            values[f"c{n}"] = clip_id.encode()
            if kind is TaskKind.MUSIC:
                self._clip_owner[clip_id] = task_id
        self._tasks[task_id] = _Task(
            task_id=task_id,
            kind=kind,
            stages=script,
            advance=advance or self.default_advance,
            stage_s=stage_s or self.stage_s,
            values=values,
            clip_ids=clip_ids,
        )
        if self.state_file is not None:
            self._save(self.state_file)
        return task_id

    def add_document(self, task_id: str, body: bytes) -> str:
        """Serve `body` verbatim for `task_id` on the single-task endpoints (doc examples)."""
        task_id = self.add_task(task_id, stages=[stage("UNKNOWN")], advance=Advance.MANUAL)
        task = self._tasks[task_id]
        task.document = body
        with contextlib.suppress(msgspec.DecodeError):
            data = bytes(msgspec.json.decode(body, type=_EnvelopeData).data)
            task.document_task = data if data.startswith(b"{") else None
        return task_id

    def advance(self, task_id: str, steps: int = 1) -> None:
        self._tasks[task_id].offset += steps
        if self.state_file is not None:
            self._save(self.state_file)

    def set_notify_hook(self, task_id: str, notify_hook: str) -> None:
        """Name another hook (or none: "") in the task's fetch answers from now on."""
        self._tasks[task_id].values["notify_hook"] = _inner(notify_hook)
        if self.state_file is not None:
            self._save(self.state_file)

    def stage_of(self, task_id: str) -> Stage:
        task = self._tasks[task_id]
        return task.stages[task.stage_index(time.monotonic())]

    def clip_ids(self, task_id: str) -> tuple[str, ...]:
        return self._tasks[task_id].clip_ids

    def inject(
        self,
        kind: FaultKind,
        *,
        task_id: str | None = None,
        times: int | None = None,
        latency_s: float = 0.0,
        status: int | None = None,
        retry_after: str | None = None,
        body: bytes | None = None,
    ) -> Fault:
        """Inject a fault for every request (task_id None) or those naming `task_id`.

        It lasts for the next `times` requests it affects, or until cleared when `times` is None.
        """
        if task_id is None and kind in (FaultKind.MISSING, FaultKind.NOT_FOUND):
            raise ValueError(f"a {kind} fault needs a task_id")
        fault = Fault(kind, task_id, times, latency_s, status, retry_after, body)
        if task_id is None:
            self._global_faults.append(fault)
        else:
            self._task_faults.setdefault(task_id, []).append(fault)
        return fault

    def clear_faults(self, task_id: str | None = None) -> None:
        """Clear the faults of one task, or every fault when task_id is None."""
        if task_id is None:
            self._global_faults.clear()
            self._task_faults.clear()
        else:
            self._task_faults.pop(task_id, None)

    def overlaps(self) -> dict[str, list[tuple[Window, Window]]]:
        """Tasks named by two requests that were being served at the same time."""
        found: dict[str, list[tuple[Window, Window]]] = {}
        for task_id, windows in self.windows.items():
            pairs: list[tuple[Window, Window]] = []
            longest: Window | None = None
            for window in sorted(windows):
                if longest is not None and window[0] < longest[1]:
                    pairs.append((longest, window))
                if longest is None or window[1] > longest[1]:
                    longest = window
            if pairs:
                found[task_id] = pairs
        return found

    def _save(self, path: Path) -> None:
        offset = time.time() - time.monotonic()
        saved = [
            _SavedTask(
                task_id=task.task_id,
                kind=task.kind,
                stages=task.stages,
                advance=task.advance,
                stage_s=task.stage_s,
                values={name: value.decode() for name, value in task.values.items()},
                clip_ids=task.clip_ids,
                created_at=task.created + offset,
                offset=task.offset,
            )
            for task in self._tasks.values()
            if task.document is None
        ]
        partial = path.with_name(path.name + ".tmp")
        partial.write_bytes(msgspec.json.encode(saved))
        os.replace(partial, path)

    def _load(self, path: Path) -> None:
        offset = time.time() - time.monotonic()
        for saved in msgspec.json.decode(path.read_bytes(), type=list[_SavedTask]):
            self._tasks[saved.task_id] = _Task(
                task_id=saved.task_id,
                kind=saved.kind,
                stages=saved.stages,
                advance=saved.advance,
                stage_s=saved.stage_s,
                values={name: value.encode() for name, value in saved.values.items()},
                clip_ids=saved.clip_ids,
                created=saved.created_at - offset,
                offset=saved.offset,
            )
            if saved.kind is TaskKind.MUSIC:
                self._clip_owner.update(dict.fromkeys(saved.clip_ids, saved.task_id))

    def reset_counters(self) -> None:
        self.requests.clear()
        self.task_requests.clear()
        self.windows.clear()
        self.batches.clear()
        self.submitted.clear()

    # -- HTTP handlers -------------------------------------------------------------------------

    async def _fetch(self, request: web.Request) -> web.StreamResponse:
        return await self._single(request, "fetch", request.match_info["task_id"], _Shape.FETCH)

    async def _fetch_v1(self, request: web.Request) -> web.StreamResponse:
        return await self._single(request, "v1", request.match_info["task_id"], _Shape.V1)

    async def _fetch_stems(self, request: web.Request) -> web.StreamResponse:
        clip_id = request.match_info["clip_id"]
        owner = self._clip_owner.get(clip_id)
        if clip_id not in self._tasks and owner is not None:
            # Like a relay, the first stems call for a song's clip starts the separation job.
            source = self._tasks[owner]
            self.add_task(clip_id, Lifecycle.STEMS, advance=source.advance, stage_s=source.stage_s)
            self._tasks[clip_id].values["title"] = source.values["title"]
        return await self._single(request, "stems", clip_id, _Shape.STEMS)

    async def _fetch_batch(self, request: web.Request) -> web.StreamResponse:
        return await self._batch(request, "fetch_batch")

    async def _submit_fetch(self, request: web.Request) -> web.StreamResponse:
        return await self._batch(request, "submit_fetch")

    async def _submit_music(self, request: web.Request) -> web.StreamResponse:
        return await self._submit(request, "submit_music", Lifecycle.MUSIC_SUCCESS)

    async def _submit_lyrics(self, request: web.Request) -> web.StreamResponse:
        return await self._submit(request, "submit_lyrics", Lifecycle.LYRICS)

    async def _single(
        self, request: web.Request, endpoint: str, task_id: str, shape: _Shape
    ) -> web.StreamResponse:
        start = time.monotonic()
        self.requests[endpoint] += 1
        if not self._authorised(request):
            return _unauthorised()
        task = self._tasks.get(task_id)
        faults = self._faults_for((task_id,) if task is not None else ())
        try:
            response = await self._faulted(request, faults, lambda: self._single_body(task, shape))
            if response is not None:
                return response
            if task is None or _take(faults, task_id, FaultKind.NOT_FOUND):
                return _task_not_exist()
            body = self._single_body(task, shape)
            task.served += 1
            return web.Response(body=body, content_type=_JSON)
        finally:
            if task is not None:
                self._record(task_id, start)

    async def _batch(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        start = time.monotonic()
        self.requests[endpoint] += 1
        if not self._authorised(request):
            return _unauthorised()
        try:
            ids = _batch_request.decode(await request.read()).ids
        except (msgspec.DecodeError, UnicodeDecodeError):
            return _error(400, "invalid_request", 'expected {"ids": [...], "action": "MUSIC"}')
        if self.record_windows:
            self.batches.append(tuple(ids))
        known = [task_id for task_id in dict.fromkeys(ids) if task_id in self._tasks]
        faults = self._faults_for(known)
        try:
            response = await self._faulted(request, faults, lambda: self._batch_body(known, faults, False))
            if response is not None:
                return response
            return web.Response(body=self._batch_body(known, faults, True), content_type=_JSON)
        finally:
            for task_id in known:
                self._record(task_id, start)

    async def _submit(self, request: web.Request, endpoint: str, default: Lifecycle) -> web.StreamResponse:
        self.requests[endpoint] += 1
        if not self._authorised(request):
            return _unauthorised()
        try:
            payload = _json_object.decode(await request.read())
        except (msgspec.DecodeError, UnicodeDecodeError):
            return _error(400, "invalid_request", "expected a JSON object")
        self.submitted.append(payload)
        response = await self._faulted(request, self._faults_for(()), lambda: b"{}")
        if response is not None:
            return response
        # Not a relay field: lets the demo and tests pick how a submitted task behaves.
        wanted = payload.get("fake_lifecycle", default)
        try:
            lifecycle = Lifecycle(wanted) if isinstance(wanted, str) else None
        except ValueError:
            lifecycle = None
        if lifecycle is None:
            return _error(400, "invalid_request", f"unknown fake_lifecycle {wanted!r}")
        title = payload.get("title")
        hook = payload.get("notify_hook")
        task_id = self.add_task(
            lifecycle=lifecycle,
            title=title if isinstance(title, str) and title else "Neon Harbor",
            notify_hook=hook if isinstance(hook, str) else "",
        )
        body = b'{"code":"success","message":"","data":' + msgspec.json.encode(task_id) + b"}"
        return web.Response(body=body, content_type=_JSON)

    # -- rendering and faults ------------------------------------------------------------------

    def _single_body(self, task: _Task | None, shape: _Shape) -> bytes:
        if task is None:
            return b'{"code":"task_not_exist","message":"task_not_exist","data":null}'
        if task.document is not None:
            return task.document
        body = self._render(task, shape)
        if shape is _Shape.FETCH:
            return b'{"code":"success","message":"","data":' + body + b"}"
        if shape is _Shape.V1:
            return b'{"code":200,"data":' + body + b',"message":"success"}'
        return body

    def _batch_body(self, known: list[str], faults: list[Fault], serve: bool) -> bytes:
        parts = []
        for task_id in known:
            task = self._tasks[task_id]
            if serve and (
                _take(faults, task_id, FaultKind.NOT_FOUND) or _take(faults, task_id, FaultKind.MISSING)
            ):
                continue
            if task.document is not None:
                if task.document_task is not None:
                    parts.append(task.document_task)
            else:
                parts.append(self._render(task, _Shape.FETCH))
            if serve:
                task.served += 1
        return b'{"code":"success","message":"","data":[' + b",".join(parts) + b"]}"

    def _render(self, task: _Task, shape: _Shape) -> bytes:
        current = task.stages[task.stage_index(time.monotonic())]
        values = task.values
        if current.status in _STARTED and not task.started_at:
            task.started_at = int(time.time())
            values["start_time"] = str(task.started_at).encode()
        if current.status in _FINISHED and not task.finished_at:
            task.finished_at = int(time.time())
            values["finish_time"] = str(task.finished_at).encode()
        template = _template(task.kind, current, shape)
        return b"".join([part if isinstance(part, bytes) else values[part] for part in template])

    def _faults_for(self, task_ids: Sequence[str]) -> list[Fault]:
        faults = [fault for fault in self._global_faults if fault.active]
        if self._task_faults:
            for task_id in task_ids:
                faults.extend(fault for fault in self._task_faults.get(task_id, ()) if fault.active)
        return faults

    async def _faulted(
        self, request: web.Request, faults: list[Fault], body: Callable[[], bytes]
    ) -> web.StreamResponse | None:
        """Apply latency and the first response-replacing fault; None when the request goes on."""
        if not faults:
            return None
        delay = 0.0
        for fault in faults:
            if fault.kind is FaultKind.LATENCY:
                delay = max(delay, fault.latency_s)
                fault.hit()
        if delay:
            await asyncio.sleep(delay)
        for fault in faults:
            if fault.kind in _RESPONSE_FAULTS and fault.active:
                fault.hit()
                return await _fault_response(request, fault, body)
        return None

    def _authorised(self, request: web.Request) -> bool:
        if self._auth is None:
            return True
        given = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(given, self._auth)

    def _record(self, task_id: str, start: float) -> None:
        self.task_requests[task_id] += 1
        if self.record_windows:
            self.windows[task_id].append((start, time.monotonic()))


_STARTED = frozenset({"IN_PROGRESS", "SUCCESS", "FAILURE"})
_FINISHED = frozenset({"SUCCESS", "FAILURE"})


async def _fault_response(
    request: web.Request, fault: Fault, body: Callable[[], bytes]
) -> web.StreamResponse:
    if fault.kind is FaultKind.DROP:
        if request.transport is not None:
            request.transport.close()
        return web.Response()
    if fault.kind is FaultKind.TRUNCATE:
        whole = body()
        response = web.StreamResponse(headers={"Content-Type": _JSON, "Content-Length": str(len(whole))})
        await response.prepare(request)
        await response.write(whole[: len(whole) // 2])
        if request.transport is not None:
            request.transport.close()
        return response
    if fault.kind is FaultKind.GARBAGE:
        page = web.Response(status=fault.status or 200, body=fault.body or _HTML, content_type="text/html")
        if fault.retry_after is not None:
            page.headers["Retry-After"] = fault.retry_after
        return page
    if fault.kind is FaultKind.RATE_LIMIT:
        response = _error(fault.status or 429, "rate_limit", "fake relay: too many requests")
        response.headers["Retry-After"] = fault.retry_after or "1"
        return response
    status = fault.status or 500
    response = _error(status, "upstream_error", f"fake relay: injected HTTP {status}")
    if fault.retry_after is not None:
        response.headers["Retry-After"] = fault.retry_after
    return response


def _take(faults: list[Fault], task_id: str, kind: FaultKind) -> bool:
    for fault in faults:
        if fault.kind is kind and fault.task_id == task_id and fault.active:
            fault.hit()
            return True
    return False


def _error(status: int, code: str, message: str) -> web.Response:
    body = msgspec.json.encode({"code": code, "message": message, "data": None})
    return web.Response(status=status, body=body, content_type=_JSON)


def _unauthorised() -> web.Response:
    return _error(401, "unauthorized", "invalid or missing API key")


def _task_not_exist() -> web.Response:
    return _error(400, "task_not_exist", "task_not_exist")


def _inner(text: str) -> bytes:
    """`text` escaped for splicing inside a JSON string."""
    return msgspec.json.encode(text)[1:-1]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- document templates --------------------------------------------------------------------------

_PLACEHOLDER = re.compile(rb'"##(\w+)##"|@@(\w+)@@')

_LYRICS = """[Verse]
Harbor lights are humming on the water tonight
Cranes like sleeping giants in the sodium light
I count the container ships that drift out to sea
Every one is carrying a piece of me

[Pre-Chorus]
Salt on the railings, static on the line
You said meet me where the river meets the brine

[Chorus]
Neon harbor, hold me till the morning
Neon harbor, every wave a warning
We were paper boats in a concrete bay
Neon harbor, do not let me drift away

[Verse 2]
Fog rolls in like a rumor from the east
Foghorns singing to the restless and the least
Your jacket on my shoulders and your name on my tongue
We were old before we ever had the chance to be young

[Bridge]
And the tide keeps time
And the gulls keep score
And I keep coming back
To this electric shore

[Chorus]
Neon harbor, hold me till the morning
Neon harbor, every wave a warning"""

_TAGS = "synthwave, dreamy, female vocals, nostalgic"
_DURATIONS = (201.48, 187.32)
_V1_INPUT = msgspec.json.encode(
    {
        "custom_mode": False,
        "gpt_description_prompt": "a synthwave song about a harbor at night",
        "make_instrumental": False,
        "prompt": "",
        "title": "",
        "continue_at": 0,
        "continue_clip_id": "",
        "mv": "chirp-v4",
        "tags": "",
    }
).decode()
_LYRICS_PART = {"streaming": "running"}


def _urls(n: int, part: str) -> tuple[str, str, str]:
    clip = f"@@c{n}@@"
    if part == "complete":
        return (
            f"https://cdn1.suno.ai/{clip}.mp3",
            f"https://cdn2.suno.ai/image_{clip}.jpeg",
            f"https://cdn1.suno.ai/{clip}.mp4",
        )
    if part == "streaming":
        return f"https://audiopipe.suno.ai/?item_id={clip}", f"https://cdn2.suno.ai/image_{clip}.jpeg", ""
    return "", "", ""


def _song_clip(n: int, current: Stage) -> dict[str, Any]:
    part = current.part or ""
    audio, image, video = _urls(n, part)
    duration = _DURATIONS[n] if part == "complete" else None
    clip: dict[str, Any] = {
        "id": f"@@c{n}@@",
        "tags": _TAGS,
        "title": "@@title@@",
        "handle": "harborlights",
        "prompt": _LYRICS,
        "status": part,
        "clip_id": f"@@c{n}@@",
        "duration": duration,
        "is_liked": False,
        "metadata": {
            "tags": _TAGS,
            "type": "gen",
            "prompt": _LYRICS,
            "stream": True,
            "duration": duration,
            "is_remix": False,
            "priority": 0,
            "can_remix": True,
            "error_type": "moderation" if current.error else None,
            "error_message": current.error,
            "refund_credits": bool(current.error),
            "free_quota_category": "web_v4_gen",
            "gpt_description_prompt": "a synthwave song about a harbor at night",
        },
        "audio_url": audio,
        "image_url": image,
        "is_public": False,
        "video_url": video,
        "created_at": "@@created@@",
        "flag_count": 0,
        "is_trashed": False,
        "model_name": "chirp-v4",
        "play_count": 0,
        "entity_type": "song_schema",
        "display_name": "harborlights",
        "upvote_count": 0,
        "comment_count": 0,
        "allow_comments": True,
        "image_large_url": image.replace("image_", "image_large_"),
        "avatar_image_url": "https://cdn1.suno.ai/sAura19.jpg",
        "is_handle_updated": False,
        "major_model_version": "v4",
        "is_following_creator": False,
    }
    if part == "complete":
        clip["state"] = "succeeded"
    return clip


def _stem_clip(n: int, current: Stage) -> dict[str, Any]:
    part = current.part or ""
    return {
        "audio_url": f"https://cdn1.suno.ai/@@c{n}@@.mp3" if part == "complete" else "",
        "id": f"@@c{n}@@",
        "image_url": "",
        "major_model_version": "",
        "metadata": {
            "can_remix": True,
            "duration": _DURATIONS[0],
            "is_remix": False,
            "prompt": _LYRICS if n == 0 else "",
            "stem_from_id": "@@task_id@@",
            "tags": _TAGS,
            "type": "stem",
            "error_message": current.error,
        },
        "model_name": "",
        "status": part,
        "title": "@@title@@ - " + ("Vocals" if n == 0 else "Instrumental"),
        "video_url": "",
    }


def _clips(kind: TaskKind, current: Stage) -> list[dict[str, Any]]:
    if current.part is None or kind is TaskKind.LYRICS:
        return []
    make = _stem_clip if kind is TaskKind.STEMS else _song_clip
    return [make(0, current), make(1, current)]


_V1_STATUS = {
    "NOT_START": "submitted",
    "SUBMITTED": "submitted",
    "QUEUED": "queued",
    "IN_PROGRESS": "processing",
    "SUCCESS": "completed",
    "FAILURE": "failed",
}


def _document(kind: TaskKind, current: Stage, shape: _Shape) -> dict[str, Any]:
    clips = _clips(kind, current)
    if shape is _Shape.STEMS:
        return {"clips": clips}
    if shape is _Shape.V1:
        return {
            "task_id": "@@task_id@@",
            "status": _V1_STATUS.get(current.status, current.status.lower()),
            "input": _V1_INPUT,
            "clips": {clip["id"]: clip for clip in clips},
        }
    data: Any = clips
    if kind is TaskKind.LYRICS:
        part = current.part
        data = None
        if part is not None:
            done = part == "complete"
            data = {
                "id": "@@c0@@",
                "text": _LYRICS if done else "",
                "title": "@@title@@" if done else "",
                "status": _LYRICS_PART.get(part, part),
            }
    return {
        "task_id": "@@task_id@@",
        "notify_hook": "@@notify_hook@@",
        "action": "LYRICS" if kind is TaskKind.LYRICS else "MUSIC",
        "status": current.status,
        "fail_reason": current.fail_reason,
        "submit_time": "##submit_time##",
        "start_time": "##start_time##" if current.status in _STARTED else 0,
        "finish_time": "##finish_time##" if current.status in _FINISHED else 0,
        "progress": current.progress,
        "data": data,
    }


@functools.cache
def _template(kind: TaskKind, current: Stage, shape: _Shape) -> tuple[bytes | str, ...]:
    """The document as literal byte runs and placeholder names, in order."""
    pieces = _PLACEHOLDER.split(msgspec.json.encode(_document(kind, current, shape)))
    parts: list[bytes | str] = []
    for i in range(0, len(pieces), 3):
        parts.append(pieces[i])
        if i + 1 < len(pieces):
            name = pieces[i + 1] or pieces[i + 2]
            parts.append(name.decode())
    return tuple(part for part in parts if part != b"")


def run_fake_relay(
    port: int = 8787, host: str = "127.0.0.1", *, api_key: str | None = None, stage_s: float = 4.0
) -> None:
    """Serve a fake relay until interrupted (`sunotrack fake-relay --port N`).

    Tasks created through the submit endpoints move a stage every `stage_s` seconds.
    """

    async def serve() -> None:
        relay = FakeRelay(
            api_key=api_key, default_advance=Advance.TIMED, stage_s=stage_s, record_windows=False
        )
        base_url = await relay.start(host, port)
        log.info("fake_relay.started", base_url=base_url, stage_s=stage_s, auth=api_key is not None)
        try:
            await asyncio.Event().wait()
        finally:
            await relay.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
