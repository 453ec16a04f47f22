"""Parsers for every relay document shape, each producing a normalised TaskSnapshot.

Decoding goes straight into msgspec structs that declare only the fields we read (docs/design.md,
"Shapes declared once"), which validates the shape at the same time. The task object is first captured as
`msgspec.Raw` so its exact bytes can be kept (stored and re-sent verbatim) without re-encoding.

Whatever bytes arrive, the public functions return a snapshot or raise an UpstreamError subclass:
non-JSON (HTML, truncated, bad UTF-8) is transient `bad_json`, valid JSON of the wrong shape is
malformed `bad_shape`, and an error envelope is classified by its code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import msgspec

from service.upstream.schemas import (
    ClipContent,
    ClipSnapshot,
    ClipView,
    Lyrics,
    MalformedUpstreamError,
    PermanentUpstreamError,
    TaskSnapshot,
    TransientUpstreamError,
    UpstreamError,
)
from service.vocabulary import STATUS_RANK, TaskStatus

__all__ = [
    "TASK_NOT_EXIST",
    "BatchParse",
    "derive_status",
    "error_code",
    "parse_callback",
    "parse_fetch",
    "parse_fetch_batch",
    "parse_stems",
    "parse_submit",
    "parse_v1",
    "render_batch_answer",
    "render_fetch_answer",
    "render_stems",
    "render_task",
]

# Both directions of the relay's status words. Parsing looks a word up here; rendering a status
# (render_task) uses the first word listed for it, and FAILED's for a terminal status the relay has no
# word for.
_TASK_STATUS: dict[str, TaskStatus] = {
    "SUBMITTED": TaskStatus.SUBMITTED,
    "NOT_START": TaskStatus.SUBMITTED,
    "QUEUED": TaskStatus.QUEUED,
    "IN_PROGRESS": TaskStatus.IN_PROGRESS,
    "SUCCESS": TaskStatus.COMPLETE,
    "FAILURE": TaskStatus.FAILED,
}

# Clip statuses of the fetch family plus the v1 vocabulary, looked up lowercased: one
# table serves clips of both dialects, the `state` field of newer clips, and v1 task statuses.
_PART_STATUS: dict[str, TaskStatus] = {
    "submitted": TaskStatus.SUBMITTED,
    "queued": TaskStatus.QUEUED,
    "pending": TaskStatus.QUEUED,
    "streaming": TaskStatus.IN_PROGRESS,
    "processing": TaskStatus.IN_PROGRESS,
    "running": TaskStatus.IN_PROGRESS,
    "in_progress": TaskStatus.IN_PROGRESS,
    "complete": TaskStatus.COMPLETE,
    "completed": TaskStatus.COMPLETE,
    "succeeded": TaskStatus.COMPLETE,
    "success": TaskStatus.COMPLETE,
    "error": TaskStatus.FAILED,
    "failed": TaskStatus.FAILED,
    "failure": TaskStatus.FAILED,
}


def _words(table: dict[str, TaskStatus]) -> dict[TaskStatus, str]:
    words = {status: word for word, status in reversed(table.items())}
    return {status: words.get(status, words[TaskStatus.FAILED]) for status in TaskStatus}


_TASK_WORD = _words(_TASK_STATUS)
_PART_WORD = _words(_PART_STATUS)

_SUCCESS_CODES: frozenset[str | int] = frozenset({"success", 200, "200"})
_TERMINAL_RANK = STATUS_RANK[TaskStatus.COMPLETE]
_MAX_MESSAGE = 200
# Above this a "unix seconds" value is after year 5000: the relay sent milliseconds.
_MS_THRESHOLD = 1e11


class _Metadata(msgspec.Struct):
    error_message: str | None = None
    duration: float | None = None


class _Clip(ClipContent, kw_only=True):
    """A relay clip: ClipContent's fields are named as the relay names them (but `error`, which
    `_clip` reads from the metadata)."""

    id: str | None = None
    status: str | None = None
    state: str | None = None
    metadata: _Metadata | None = None


class _Lyrics(msgspec.Struct):
    text: str | None = None
    title: str | None = None
    status: str | None = None


# Relays are inconsistent about numbers: progress is "45%" or 45, times are seconds as int, float or
# string. These fields are accepted in any of those forms; garbage in them reads as "unknown".
_Number = float | str | None
_Data = list[_Clip] | _Lyrics | None


# The hook is only ever read as a string: any other JSON there (a relay's null, a number) is "none",
# never a reason to reject the whole answer.
_Hook = msgspec.Raw


class _Task(msgspec.Struct):
    task_id: str
    notify_hook: _Hook = msgspec.Raw()
    status: str | None = None
    fail_reason: str | None = None
    submit_time: _Number = None
    start_time: _Number = None
    finish_time: _Number = None
    progress: _Number = None
    data: _Data = None


class _CallbackTask(msgspec.Struct):
    task_id: str | None = None
    task_id_camel: str | None = msgspec.field(default=None, name="taskId")
    notify_hook: _Hook = msgspec.Raw()
    notify_hook_camel: _Hook = msgspec.field(default_factory=msgspec.Raw, name="notifyHook")
    status: str | None = None
    fail_reason: str | None = None
    fail_reason_camel: str | None = msgspec.field(default=None, name="failReason")
    submit_time: _Number = None
    submit_time_camel: _Number = msgspec.field(default=None, name="submitTime")
    start_time: _Number = None
    start_time_camel: _Number = msgspec.field(default=None, name="startTime")
    finish_time: _Number = None
    finish_time_camel: _Number = msgspec.field(default=None, name="finishTime")
    progress: _Number = None
    data: _Data = None


class _CallbackProbe(msgspec.Struct):
    code: Any = None
    message: Any = None
    task_id: Any = None
    task_id_camel: Any = msgspec.field(default=None, name="taskId")
    data: msgspec.Raw = msgspec.Raw()


class _V1Task(msgspec.Struct):
    task_id: str
    status: str | None = None
    fail_reason: str | None = None
    clips: dict[str, _Clip] | list[_Clip] | None = None


class _Envelope(msgspec.Struct):
    code: Any = None
    message: Any = None
    data: msgspec.Raw = msgspec.Raw()


class _BatchEnvelope(msgspec.Struct):
    code: Any = None
    message: Any = None
    data: list[msgspec.Raw] | None = None


class _StemsDoc(msgspec.Struct):
    code: Any = None
    message: Any = None
    clips: list[_Clip] | None = None


class _TaskIdOnly(msgspec.Struct):
    task_id: str | None = None


_T = TypeVar("_T")

_envelope = msgspec.json.Decoder(_Envelope)
_batch_envelope = msgspec.json.Decoder(_BatchEnvelope)
_task = msgspec.json.Decoder(_Task)
_v1_task = msgspec.json.Decoder(_V1Task)
_stems = msgspec.json.Decoder(_StemsDoc)
_callback_probe = msgspec.json.Decoder(_CallbackProbe)
_callback_task = msgspec.json.Decoder(_CallbackTask)
_task_id_only = msgspec.json.Decoder(_TaskIdOnly)
_str = msgspec.json.Decoder(str)


class BatchParse(NamedTuple):
    snapshots: list[TaskSnapshot]
    # Tasks in the answer that could not be read, keyed by their id where it could be found.
    errors: dict[str, UpstreamError]


def parse_fetch(body: bytes) -> TaskSnapshot:
    """`GET /suno/fetch/{id}`: `{"code": "success", "message": "", "data": <task>}`."""
    env = _decode(_envelope, body)
    raw = _envelope_data(env.code, env.message, env.data)
    return _fetch_task(raw)


def _fetch_task(raw: bytes) -> TaskSnapshot:
    """One task object of the fetch family, as the single and the batch answers both carry it."""
    task = _decode(_task, raw)
    return _snapshot(
        task_id=task.task_id,
        raw_status=task.status,
        status=_task_status(task.status),
        fail_reason=task.fail_reason,
        submit_time=task.submit_time,
        start_time=task.start_time,
        finish_time=task.finish_time,
        progress=task.progress,
        data=task.data,
        raw=raw,
        notify_hook=_hook(task.notify_hook),
    )


def parse_fetch_batch(body: bytes) -> BatchParse:
    """`POST /suno/fetch`: `{"code": "success", "data": [<task>, ...]}`.

    One unreadable task does not spoil the others: it is reported under its id (when that much can
    be read) and the rest are returned.
    """
    env = _decode(_batch_envelope, body)
    _check_code(env.code, env.message)
    snapshots: list[TaskSnapshot] = []
    errors: dict[str, UpstreamError] = {}
    for item in env.data or ():
        raw = bytes(item)
        try:
            snapshot = _fetch_task(raw)
        except UpstreamError as exc:
            task_id = _salvage_task_id(raw)
            if task_id is not None:
                errors[task_id] = exc
            continue
        snapshots.append(snapshot)
    return BatchParse(snapshots, errors)


def parse_v1(body: bytes) -> TaskSnapshot:
    """`GET /suno/v1/v3.0/music/{id}`: `{"code": 200, "data": {task_id, status, clips: {id: clip}}}`."""
    env = _decode(_envelope, body)
    raw = _envelope_data(env.code, env.message, env.data)
    task = _decode(_v1_task, raw)
    if task.clips is None:
        clips: tuple[ClipSnapshot, ...] = ()
    elif isinstance(task.clips, dict):
        clips = tuple(_clip(clip, key) for key, clip in task.clips.items())
    else:
        clips = tuple(_clip(clip, None) for clip in task.clips)
    raw_status = task.status
    status = _PART_STATUS.get(raw_status.lower()) if raw_status is not None else None
    return _finish(
        task_id=task.task_id,
        raw_status=raw_status,
        status=status,
        fail_reason=task.fail_reason,
        submitted_at=None,
        started_at=None,
        finished_at=None,
        progress=None,
        clips=clips,
        lyrics=None,
        lyrics_status=None,
        raw=raw,
    )


def parse_stems(body: bytes, clip_id: str) -> TaskSnapshot:
    """`GET /suno/act/stems/{clip_id}`: `{"clips": [...]}`, read as a task named after the source clip."""
    doc = _decode(_stems, body)
    if doc.clips is None:
        _check_code(doc.code, doc.message)
        raise MalformedUpstreamError("bad_shape", "stems answer has no clips list")
    return _finish(
        task_id=clip_id,
        raw_status=None,
        status=None,
        fail_reason=None,
        submitted_at=None,
        started_at=None,
        finished_at=None,
        progress=None,
        clips=tuple(_clip(clip, None) for clip in doc.clips),
        lyrics=None,
        lyrics_status=None,
        raw=body,
    )


def parse_callback(body: bytes) -> TaskSnapshot:
    """The relay's notify_hook call: the task, bare or in the `{"code", "data"}` envelope.

    Keys may be snake_case (as in fetch answers) or camelCase (`taskId`, `failReason`, ...).
    """
    probe = _decode(_callback_probe, body)
    if probe.task_id is not None or probe.task_id_camel is not None:
        raw = body
    else:
        raw = _envelope_data(probe.code, probe.message, probe.data)
    task = _decode(_callback_task, raw)
    return _snapshot(
        task_id=task.task_id or task.task_id_camel or "",
        raw_status=task.status,
        status=_task_status(task.status),
        fail_reason=task.fail_reason if task.fail_reason is not None else task.fail_reason_camel,
        submit_time=task.submit_time if task.submit_time is not None else task.submit_time_camel,
        start_time=task.start_time if task.start_time is not None else task.start_time_camel,
        finish_time=task.finish_time if task.finish_time is not None else task.finish_time_camel,
        progress=task.progress,
        data=task.data,
        raw=raw,
        notify_hook=_hook(task.notify_hook) or _hook(task.notify_hook_camel),
    )


def parse_submit(body: bytes) -> str:
    """`POST /suno/submit/*`: `{"code": "success", "data": "<task_id>"}`."""
    env = _decode(_envelope, body)
    task_id = _decode(_str, _envelope_data(env.code, env.message, env.data))
    if not task_id:
        raise MalformedUpstreamError("bad_shape", "submit answer has an empty task id")
    return task_id


def error_code(body: bytes) -> str | None:
    """The relay's error code in an error answer (`{"code": "task_not_exist", ...}`), if it has one."""
    try:
        code = _envelope.decode(body).code
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return code if isinstance(code, str) else None


def derive_status(statuses: Sequence[TaskStatus | None]) -> TaskStatus | None:
    """The task status implied by its clips: that of the least-finished clip.

    A failed clip counts as finished, so once every clip is terminal the task is complete if any
    clip completed and failed only if none did. A clip in an unrecognised status makes the answer
    unknowable (None).
    """
    if not statuses:
        return None
    least: TaskStatus | None = None
    for status in statuses:
        if status is None:
            return None
        if least is None or STATUS_RANK[status] < STATUS_RANK[least]:
            least = status
    assert least is not None
    if STATUS_RANK[least] < _TERMINAL_RANK:
        return least
    return TaskStatus.COMPLETE if TaskStatus.COMPLETE in statuses else least


def _decode(decoder: msgspec.json.Decoder[_T], data: bytes) -> _T:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise MalformedUpstreamError("bad_shape", f"unexpected JSON shape: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise TransientUpstreamError("bad_json", f"answer is not JSON: {_clip_text(str(exc))}") from exc
    except RecursionError as exc:
        raise MalformedUpstreamError("bad_shape", "JSON nested too deeply") from exc


def _check_code(code: Any, message: Any) -> None:
    if code is None or (isinstance(code, str | int) and code in _SUCCESS_CODES):
        return
    text = _clip_text(str(message)) if message else ""
    if code == "task_not_exist":
        raise PermanentUpstreamError("task_not_exist", f"relay says the task does not exist: {text}")
    raise TransientUpstreamError("upstream_error", f"relay answered code {_clip_text(repr(code))}: {text}")


def _envelope_data(code: Any, message: Any, data: msgspec.Raw) -> bytes:
    _check_code(code, message)
    raw = bytes(data)
    if not raw or raw == b"null":
        raise MalformedUpstreamError("bad_shape", "answer carries no data")
    return raw


def _salvage_task_id(raw: bytes) -> str | None:
    try:
        return _task_id_only.decode(raw).task_id or None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


def _snapshot(
    *,
    task_id: str,
    raw_status: str | None,
    status: TaskStatus | None,
    fail_reason: str | None,
    submit_time: _Number,
    start_time: _Number,
    finish_time: _Number,
    progress: _Number,
    data: _Data,
    raw: bytes,
    notify_hook: str | None,
) -> TaskSnapshot:
    clips: tuple[ClipSnapshot, ...] = ()
    lyrics = lyrics_status = None
    # `data` is read by its shape, never by `action`: relays label song clips LYRICS and vice versa.
    if isinstance(data, list):
        clips = tuple([_clip(clip, None) for clip in data])
    elif data is not None:
        lyrics = Lyrics(title=data.title or None, text=data.text) if data.text else None
        lyrics_status = _part_status(data.status)
    return _finish(
        task_id=task_id,
        raw_status=raw_status,
        status=status,
        fail_reason=fail_reason,
        submitted_at=_timestamp(submit_time),
        started_at=_timestamp(start_time),
        finished_at=_timestamp(finish_time),
        progress=_progress(progress),
        clips=clips,
        lyrics=lyrics,
        lyrics_status=lyrics_status,
        raw=raw,
        notify_hook=notify_hook,
    )


def _finish(
    *,
    task_id: str,
    raw_status: str | None,
    status: TaskStatus | None,
    fail_reason: str | None,
    submitted_at: datetime | None,
    started_at: datetime | None,
    finished_at: datetime | None,
    progress: int | None,
    clips: tuple[ClipSnapshot, ...],
    lyrics: Lyrics | None,
    lyrics_status: TaskStatus | None,
    raw: bytes,
    notify_hook: str | None = None,
) -> TaskSnapshot:
    if not task_id:
        raise MalformedUpstreamError("bad_shape", "task without an id")
    if status is None:
        if clips:
            status = derive_status([clip.status for clip in clips])
        elif lyrics_status is not None:
            status = lyrics_status
    reason = fail_reason if fail_reason and not fail_reason.isspace() else None
    if reason is None:
        reason = next((clip.error for clip in clips if clip.error), None)
    if reason is None and status is TaskStatus.FAILED:
        reason = (
            f"relay reported status {raw_status!r} without a reason"
            if raw_status is not None
            else "relay reported failure without a status or reason"
        )
    return TaskSnapshot(
        task_id=task_id,
        status=status,
        raw_status=raw_status,
        progress=progress,
        fail_reason=reason,
        submitted_at=submitted_at,
        started_at=started_at,
        finished_at=finished_at,
        clips=clips,
        lyrics=lyrics,
        raw=raw,
        notify_hook=notify_hook,
    )


def _clip(clip: _Clip, fallback_id: str | None) -> ClipSnapshot:
    clip_id = clip.id or fallback_id
    if not clip_id:
        raise MalformedUpstreamError("bad_shape", "clip without an id")
    status = _part_status(clip.status)
    raw_status = clip.status
    if status is None and clip.state is not None:
        status = _part_status(clip.state)
        raw_status = clip.status if clip.status is not None else clip.state
    meta = clip.metadata
    error = None
    duration = clip.duration
    if meta is not None:
        if meta.error_message and not meta.error_message.isspace():
            error = meta.error_message
        if duration is None:
            duration = meta.duration
    return ClipSnapshot(
        id=clip_id,
        status=status,
        raw_status=raw_status,
        title=clip.title or None,
        audio_url=clip.audio_url or None,
        image_url=clip.image_url or None,
        image_large_url=clip.image_large_url or None,
        video_url=clip.video_url or None,
        model_name=clip.model_name or None,
        duration=duration,
        error=error,
    )


def _hook(raw: msgspec.Raw) -> str | None:
    if len(raw) <= 2:  # absent or ""
        return None
    try:
        hook = _str.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return hook.strip() or None


def _task_status(raw: str | None) -> TaskStatus | None:
    return _TASK_STATUS.get(raw.upper()) if raw is not None else None


def _part_status(raw: str | None) -> TaskStatus | None:
    return _PART_STATUS.get(raw.lower()) if raw is not None else None


def _number(value: _Number) -> float | None:
    if value is None:
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    try:
        number = float(value.strip().removesuffix("%"))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _progress(value: _Number) -> int | None:
    number = _number(value)
    if number is None or not 0 <= number <= 100:
        return None
    return int(number)


def _timestamp(value: _Number) -> datetime | None:
    seconds = _number(value)
    if seconds is None or seconds <= 0:
        return None
    if seconds > _MS_THRESHOLD:
        seconds /= 1000
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _clip_text(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def render_task(
    *,
    task_id: str,
    kind: str,
    status: TaskStatus,
    progress: int | None,
    fail_reason: str | None,
    finished_at: datetime | None,
    notify_hook: str | None,
    clips: Sequence[ClipView],
    last_answer: bytes | None = None,
) -> bytes:
    """A task object as `GET /suno/fetch/{id}` returns it: what parse_fetch reads, written back.

    `last_answer` is the relay's last task object for it: every field we do not store comes from it,
    and while it agrees with our state (same status, same clip statuses, no other hook) it is returned
    as received. Our state wins where they disagree (a timeout, a cancellation, a failure after errors:
    states the relay never reported), and the hook shown is always the task's own."""
    answer = _answer_object(last_answer)
    if answer and _task_status(_text(answer.get("status"))) is status:
        theirs_hook = answer.get("notify_hook")
        data = answer.get("data")
        if (
            last_answer is not None
            and (theirs_hook is None or theirs_hook == (notify_hook or ""))
            and _clips_agree(data, clips)
        ):
            return last_answer
        rendered = dict(answer)
    else:
        if progress is None:
            progress = 100 if status is TaskStatus.COMPLETE else 0
        finish = None if finished_at is None else int(finished_at.timestamp())
        rendered = {
            "task_id": task_id,
            "notify_hook": "",
            "action": kind.upper(),
            "status": _TASK_WORD[status],
            "fail_reason": fail_reason or "",
            "submit_time": None,
            "start_time": None,
            "finish_time": finish,
            "progress": f"{progress}%",
            "data": [],
        }
        # The relay's fields we keep nothing of (times, extra keys) stay; ours replace the rest.
        for key, value in answer.items():
            if key not in rendered or key in _RELAY_KEEPS or (rendered[key] is None and value is not None):
                rendered[key] = value
        data = answer.get("data")
    rendered["task_id"] = task_id
    rendered["notify_hook"] = notify_hook or ""
    if clips or not isinstance(data, dict):
        rendered["data"] = _render_clips(clips, data)
    return _encode_task(rendered)


def render_stems(clips: Sequence[ClipView], last_answer: bytes | None = None) -> bytes:
    """The stems answer (`{"clips": [...]}`) for these clips; `last_answer` as in render_task."""
    answer = _answer_object(last_answer)
    if last_answer is not None and answer and _clips_agree(answer.get("clips"), clips):
        return last_answer
    return _encode_task({**answer, "clips": _render_clips(clips, answer.get("clips"))})


def render_fetch_answer(task: bytes) -> bytes:
    """`GET /suno/fetch/{id}`'s answer around one task object."""
    return b'{"code":"success","message":"","data":' + task + b"}"


def render_batch_answer(tasks: Sequence[bytes]) -> bytes:
    """`POST /suno/fetch`'s answer around task objects (unknown ids are left out, as the relay does)."""
    return b'{"code":"success","message":"","data":[' + b",".join(tasks) + b"]}"


# Fields only the relay knows: kept from its last answer even where our state differs from it.
_RELAY_KEEPS = frozenset({"action", "submit_time", "start_time"})

# The relay's answer for an id it does not know, with HTTP 400.
TASK_NOT_EXIST = b'{"code":"task_not_exist","message":"task_not_exist","data":null}'


def _answer_object(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        answer = _object.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return {}
    return answer if isinstance(answer, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _their_clips(data: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(data, list):
        return {}
    clips: dict[str, dict[str, Any]] = {}
    for clip in data:
        if isinstance(clip, dict):
            clip_id = _text(clip.get("id")) or _text(clip.get("clip_id"))
            if clip_id:
                clips[clip_id] = clip
    return clips


def _their_status(clip: dict[str, Any]) -> TaskStatus | None:
    return _part_status(_text(clip.get("status"))) or _part_status(_text(clip.get("state")))


def _clips_agree(data: Any, clips: Sequence[ClipView]) -> bool:
    """Whether the relay's clips are ours: the same ids in the same order, each in the same status."""
    if not clips:
        return not isinstance(data, list) or not data
    theirs = _their_clips(data)
    if list(theirs) != [clip.id for clip in clips]:
        return False
    return all(_their_status(theirs[clip.id]) is clip.status for clip in clips)


def _render_clips(clips: Sequence[ClipView], data: Any) -> list[dict[str, Any]]:
    """Our clips, each over the relay's object for it: the relay's as received while its status is
    ours, else with what we store written over it."""
    theirs = _their_clips(data)
    rendered = []
    for clip in clips:
        their = theirs.get(clip.id)
        if their is not None and _their_status(their) is clip.status:
            rendered.append(their)
            continue
        ours = _render_clip(clip)
        if their is None:
            rendered.append(ours)
            continue
        merged = dict(their)
        metadata = merged.get("metadata")
        error = ours.pop("metadata")["error_message"]
        merged.update({key: value for key, value in ours.items() if value is not None or key == "status"})
        if error is not None or not isinstance(metadata, dict):
            merged["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), "error_message": error}
        rendered.append(merged)
    return rendered


def _render_clip(clip: ClipView) -> dict[str, Any]:
    rendered = msgspec.structs.asdict(clip)
    rendered["clip_id"] = clip.id
    rendered["status"] = None if clip.status is None else _PART_WORD[clip.status]
    rendered["metadata"] = {"error_message": rendered.pop("error")}
    return rendered


_object = msgspec.json.Decoder()
_encode_task = msgspec.json.Encoder().encode
