"""Webhook bodies: one renderer per notify format, chosen from RENDERERS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from service.upstream.dialects import render_task
from service.upstream.schemas import ClipView, Lyrics
from service.vocabulary import TERMINAL_STATUSES, HookSource, NotifyFormat, TaskStatus


@dataclass(frozen=True, slots=True)
class TransitionNotice:
    """One task-level transition to announce, as the recorder saw it."""

    task_pk: int
    task_id: str
    kind: str
    seq: int
    status: TaskStatus
    previous_status: str | None
    progress: int | None
    fail_reason: str | None
    clips: list[ClipView]
    lyrics: Lyrics | None
    metadata: dict[str, Any] | None
    at: datetime
    notify_hook: str
    notify_format: str
    # The relay's own answer that caused the transition, when one did.
    relay_payload: bytes | None


def delivery_format(chosen: str | None, hook_source: str | None) -> str:
    """The body a task's webhooks carry: the format its registration chose, else the relay's own task
    object for a hook adopted from the relay (that consumer was written for the relay's callback),
    else ours."""
    if chosen is not None:
        return chosen
    return NotifyFormat.RELAY if hook_source == HookSource.RELAY else NotifyFormat.SUNOTRACK


_encode = msgspec.json.Encoder().encode


def sunotrack_body(notice: TransitionNotice) -> bytes:
    return _encode(
        {
            "type": "task.status_changed",
            "timestamp": notice.at.astimezone(UTC),
            "data": {
                "task_id": notice.task_id,
                "kind": notice.kind,
                "seq": notice.seq,
                "status": notice.status,
                "previous_status": notice.previous_status,
                "progress": notice.progress,
                "fail_reason": notice.fail_reason,
                "clips": notice.clips,
                "lyrics": notice.lyrics,
                # Receivers get an object whether or not the client attached metadata.
                "metadata": notice.metadata or {},
            },
        }
    )


def relay_body(notice: TransitionNotice) -> bytes:
    """The relay's task object: its own answer as received, or rendered for a state it never reported."""
    if notice.relay_payload is not None:
        return notice.relay_payload
    return render_task(
        task_id=notice.task_id,
        kind=notice.kind,
        status=notice.status,
        progress=notice.progress,
        fail_reason=notice.fail_reason,
        finished_at=notice.at if notice.status in TERMINAL_STATUSES else None,
        notify_hook=notice.notify_hook,
        clips=notice.clips,
    )


RENDERERS: dict[str, Callable[[TransitionNotice], bytes]] = {
    NotifyFormat.SUNOTRACK: sunotrack_body,
    NotifyFormat.RELAY: relay_body,
}


def render_body(notice: TransitionNotice) -> bytes:
    return RENDERERS[notice.notify_format](notice)
