"""Request and response structs of the public API (CONTRACT.md: keys may be added, never renamed)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from service.models import Clip, Task, TaskEvent

TaskIdStr = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
KindStr = Literal["music", "lyrics", "stems"]
StatusStr = Literal["submitted", "queued", "in_progress", "complete", "failed", "timed_out", "cancelled"]
METADATA_MAX_BYTES = 16 * 1024
HOOK_MAX_LENGTH = 2048


class RegisterTask(msgspec.Struct, forbid_unknown_fields=True):
    task_id: TaskIdStr
    kind: KindStr = "music"
    notify_hook: Annotated[str, msgspec.Meta(min_length=1, max_length=HOOK_MAX_LENGTH)] | None = None
    notify_format: Literal["sunotrack", "relay"] | None = None
    metadata: dict[str, Any] | None = None


class ClipOut(msgspec.Struct):
    id: str
    status: str | None
    title: str | None
    audio_url: str | None
    image_url: str | None
    video_url: str | None
    duration: float | None
    error: str | None


class TaskOut(msgspec.Struct):
    task_id: str
    kind: str
    status: str
    upstream_status: str | None
    progress: int | None
    fail_reason: str | None
    notify_hook: str | None
    notify_format: str
    metadata: dict[str, Any] | None
    clips: list[ClipOut]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    last_polled_at: datetime | None
    next_poll_at: datetime | None
    poll_count: int
    last_error: str | None


class TaskPage(msgspec.Struct):
    items: list[TaskOut]
    next_cursor: str | None


class EventOut(msgspec.Struct):
    seq: int
    at: datetime
    type: str
    from_status: str | None
    to_status: str
    source: str
    clip_id: str | None
    detail: dict[str, Any] | None


class EventList(msgspec.Struct):
    items: list[EventOut]


def clip_out(clip: Clip) -> ClipOut:
    return ClipOut(
        id=clip.clip_id,
        status=clip.status,
        title=clip.title,
        audio_url=clip.audio_url,
        image_url=clip.image_url,
        video_url=clip.video_url,
        duration=clip.duration,
        error=clip.error,
    )


def task_out(task: Task, clips: list[Clip]) -> TaskOut:
    return TaskOut(
        task_id=task.task_id,
        kind=task.kind,
        status=task.status,
        upstream_status=task.upstream_status,
        progress=task.progress,
        fail_reason=task.fail_reason,
        notify_hook=task.notify_hook,
        notify_format=task.notify_format,
        metadata=task.client_metadata,
        clips=[clip_out(clip) for clip in clips],
        created_at=task.created_at,
        updated_at=task.updated_at,
        finished_at=task.finished_at,
        last_polled_at=task.last_polled_at,
        next_poll_at=task.next_poll_at,
        poll_count=task.poll_count,
        last_error=task.last_error,
    )


def event_out(event: TaskEvent) -> EventOut:
    return EventOut(
        seq=event.seq,
        at=event.at,
        type=event.type,
        from_status=event.from_status,
        to_status=event.to_status,
        source=event.source,
        clip_id=event.clip_id,
        detail=event.detail,
    )
