"""The normalised vocabulary every other part of the service speaks about relay tasks."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import ClassVar

import msgspec

from service.vocabulary import TaskStatus


class Dialect(enum.StrEnum):
    """Which relay document shape a task is read in."""

    FETCH = "fetch"
    V1 = "v1"


class ClipContent(msgspec.Struct, kw_only=True):
    """What a clip says about itself, declared once: the parsed answer (ClipSnapshot), the stored row
    (tracking.repository.ClipState and the clips table), the task JSON and webhook bodies (ClipView)."""

    title: str | None = None
    audio_url: str | None = None
    image_url: str | None = None
    image_large_url: str | None = None
    video_url: str | None = None
    model_name: str | None = None
    duration: float | None = None
    error: str | None = None


class Lyrics(msgspec.Struct, frozen=True, kw_only=True):
    """The words of a finished lyrics task."""

    title: str | None
    text: str


class ClipView(ClipContent, kw_only=True):
    """A clip as sunotrack shows it: in the task JSON and in webhook bodies."""

    id: str
    status: TaskStatus | None


class ClipSnapshot(ClipView, kw_only=True, array_like=True):
    """A clip as the relay reported it, normalised; `raw_status` is the relay's own word. Encoded as an
    array (only the snapshot digest encodes it): no field names to hash on every poll."""

    raw_status: str | None


class TaskSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One relay answer about one task, normalised.

    `status` is None when the relay gave no usable status and none could be derived from the clips:
    the caller keeps the previous status and records an anomaly. `raw` is the task object's JSON
    exactly as received. `notify_hook` is the hook the relay says the task was submitted with (None
    when it names none).
    """

    task_id: str
    status: TaskStatus | None
    raw_status: str | None
    progress: int | None
    fail_reason: str | None
    submitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    clips: tuple[ClipSnapshot, ...]
    lyrics: Lyrics | None
    raw: bytes
    notify_hook: str | None = None


class UpstreamError(Exception):
    """Anything that went wrong talking to the relay or reading its answer.

    `error_class` says what the caller may do: retry later (transient), stop asking (permanent), or
    treat the answer as unusable (malformed). `code` is a stable machine-readable reason.
    """

    error_class: ClassVar[str]

    def __init__(
        self,
        code: str,
        message: str,
        *,
        http_status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"http_status={self.http_status!r}, retry_after_s={self.retry_after_s!r})"
        )


class TransientUpstreamError(UpstreamError):
    error_class = "transient"


class PermanentUpstreamError(UpstreamError):
    error_class = "permanent"


class MalformedUpstreamError(UpstreamError):
    error_class = "malformed"
