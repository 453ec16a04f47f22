"""The words the service stores and speaks, each declared once as an enum.

CHECK constraints (models), request and response types (api.schemas), status ranks and the terminal
set are derived from these; nothing else spells the values out.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

# The relay SUNO_BASE_URL, SUNO_API_KEY and SUNO_API_DIALECT configure; tasks are polled there unless
# their registration (or their client) names another.
DEFAULT_RELAY = "default"


class TaskStatus(enum.StrEnum):
    """Normalised status of a task, and of each of its clips, in the order a task moves through them.

    The last four are terminal and share one rank: none is "more finished" than another.
    """

    SUBMITTED = "submitted"
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETE = "complete"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


TERMINAL_STATUSES: frozenset[TaskStatus] = frozenset(
    {TaskStatus.COMPLETE, TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED}
)
_FINISHED_RANK = min(index for index, status in enumerate(TaskStatus) if status in TERMINAL_STATUSES)
STATUS_RANK: Mapping[TaskStatus, int] = MappingProxyType(
    {status: min(index, _FINISHED_RANK) for index, status in enumerate(TaskStatus)}
)


class TaskKind(enum.StrEnum):
    MUSIC = "music"
    LYRICS = "lyrics"
    STEMS = "stems"


class NotifyFormat(enum.StrEnum):
    """The body a task's webhooks carry (webhooks.bodies renders each)."""

    SUNOTRACK = "sunotrack"
    RELAY = "relay"


class HookSource(enum.StrEnum):
    """Who gave a task its notify_hook."""

    CLIENT = "client"  # the registration: never replaced by the relay's
    RELAY = "relay"  # a relay answer: adopted by a task registered without one


class RelayHooks(enum.StrEnum):
    """What to do with the notify_hook a relay answer names, for a task registered without one."""

    ADOPT = "adopt"  # deliver to it (tracking.service.relay_hook_news)
    IGNORE = "ignore"  # for relays that call their clients' hooks themselves


class EventType(enum.StrEnum):
    TRANSITION = "transition"
    ANOMALY = "anomaly"


class EventSource(enum.StrEnum):
    """What recorded an event."""

    REGISTER = "register"
    POLL = "poll"
    CALLBACK = "callback"
    API = "api"
    DEADLINE = "deadline"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD = "dead"
