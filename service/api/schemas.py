"""Request and response structs of the public API (keys may be added, never renamed)."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated, Any, TypeVar

import msgspec

from service.config import RELAY_NAME
from service.errors import InvalidInput
from service.models import Client, Clip, Delivery, DeliveryAttempt, Task, TaskEvent
from service.redact import mask_credentials, mask_json
from service.tracking.repository import clip_view
from service.upstream.schemas import ClipView, Lyrics
from service.vocabulary import DeliveryStatus, NotifyFormat, RelayHooks, TaskKind
from service.webhooks.bodies import delivery_format
from service.webhooks.ssrf import HOOK_MAX_LENGTH

# (?!\n): Python's $ (msgspec matches with re.search) also matches before a final newline.
TASK_ID_PATTERN = r"^[A-Za-z0-9_-]+$(?!\n)"
TASK_ID_MAX_LENGTH = 128
TaskIdStr = Annotated[str, msgspec.Meta(min_length=1, max_length=TASK_ID_MAX_LENGTH, pattern=TASK_ID_PATTERN)]
_TASK_ID = re.compile(TASK_ID_PATTERN)


def is_task_id(value: str) -> bool:
    """Whether `value` is a TaskIdStr: a task could be registered under it."""
    return len(value) <= TASK_ID_MAX_LENGTH and _TASK_ID.search(value) is not None


METADATA_MAX_BYTES = 16 * 1024
# Integers from a request are bounded by the column they reach (Integer, BigInteger).
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
JSON_MAX_DEPTH = 64


ClientName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
RelayName = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=f"^{RELAY_NAME.pattern}$")]


class RegisterTask(msgspec.Struct, forbid_unknown_fields=True):
    task_id: TaskIdStr
    kind: TaskKind = TaskKind.MUSIC
    notify_hook: Annotated[str, msgspec.Meta(min_length=1, max_length=HOOK_MAX_LENGTH)] | None = None
    notify_format: NotifyFormat | None = None
    metadata: dict[str, Any] | None = None
    # Where the task is polled: the client's relay unless given (the admin's: `default`).
    relay: RelayName | None = None


<<<<<<< HEAD
BATCH_MAX = 500


class RegisterBatch(msgspec.Struct, forbid_unknown_fields=True):
    # Each item is checked on its own (a bad one is its own 4xx item), so they arrive unparsed.
    tasks: Annotated[list[Any], msgspec.Meta(min_length=1, max_length=BATCH_MAX)]


class BatchItem(msgspec.Struct, omit_defaults=True):
    """One registration's answer: `task` when status_code is 200 or 201, else `detail`."""

    task_id: str | None
    status_code: int
    task: TaskOut | msgspec.UnsetType = msgspec.UNSET
    detail: str | msgspec.UnsetType = msgspec.UNSET


class BatchOut(msgspec.Struct):
    items: list[BatchItem]
=======
AwareTime = Annotated[datetime, msgspec.Meta(tz=True, description="RFC 3339 with its UTC offset")]
REPLAY_TASK_IDS_MAX = 1000


class ReplayDeliveries(msgspec.Struct, forbid_unknown_fields=True):
    since: AwareTime
    # Unset: now.
    until: AwareTime | None = None
    status: Annotated[list[DeliveryStatus], msgspec.Meta(min_length=1, max_length=len(DeliveryStatus))] = (
        msgspec.field(default_factory=lambda: [DeliveryStatus.FAILED, DeliveryStatus.DEAD])
    )
    task_ids: Annotated[list[TaskIdStr], msgspec.Meta(max_length=REPLAY_TASK_IDS_MAX)] | None = None
    include_delivered: bool = False


class ReplayResult(msgspec.Struct):
    requeued: int
>>>>>>> 27788ab (Global event feed numbered in commit order (a sequencer after commit), GET /events and /events/stream (SSE, Last-Event-ID, keep-alive, LISTEN/NOTIFY across replicas); GET /tasks search filters (status repeatable, kind, times, task_id_prefix, metadata.<key>=<value> on a GIN jsonb_path_ops index); timeline; GET /stats and /stats/series; POST /deliveries/replay)


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
    clips: list[ClipView]
    # A lyrics task's words, null until it completes (and on other kinds).
    lyrics: Lyrics | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    last_polled_at: datetime | None
    next_poll_at: datetime | None
    poll_count: int
    last_error: str | None
    # `client` (given at registration), `relay` (adopted from a relay answer) or None (no hook).
    notify_hook_source: str | None
    relay: str
    # Only in the admin's view: the client that registered the task (None: the admin).
    client: str | msgspec.UnsetType | None = msgspec.UNSET
    # Only on GET /tasks/{task_id}: seconds spent in each status so far.
    timeline: dict[str, float] | msgspec.UnsetType = msgspec.UNSET


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


_Out = TypeVar("_Out", bound=msgspec.Struct)


def _filled(shape: type[_Out], row: Any, **values: Any) -> _Out:
    """`shape` with each field read from the row's attribute of the same name, unless given."""
    for name in shape.__struct_fields__:
        if name not in values:
            values[name] = getattr(row, name)
    return shape(**values)


class FeedEventOut(EventOut, kw_only=True):
    """An event of the global feed: its position (`id`) and whose it is."""

    id: int
    task_id: str
    kind: str
    client: str | None


class FeedPage(msgspec.Struct):
    items: list[FeedEventOut]
    # Pass as `after` to read on; the same `after` when nothing new was there yet.
    next_after: int


def task_out(task: Task, clips: list[Clip], client_names: dict[int, str] | None = None) -> TaskOut:
    """`client_names` (by client id) for the admin's view, which names each task's client."""
    return _filled(
        TaskOut,
        task,
        notify_hook=None if task.notify_hook is None else mask_credentials(task.notify_hook),
        notify_format=delivery_format(task.notify_format, task.notify_hook_source),
        metadata=task.client_metadata,
        clips=[clip_view(clip) for clip in clips],
        lyrics=msgspec.convert(task.lyrics, Lyrics | None),
        client=msgspec.UNSET
        if client_names is None
        else (None if task.client_id is None else client_names[task.client_id]),
        timeline=msgspec.UNSET,  # GET /tasks/{task_id} fills it in
    )


def event_out(event: TaskEvent) -> EventOut:
    return _filled(EventOut, event, detail=mask_json(event.detail))


def feed_event_out(event: TaskEvent, task_id: str, kind: str, client: str | None) -> FeedEventOut:
    assert event.feed_id is not None  # the feed reads numbered events only
    return _filled(
        FeedEventOut,
        event,
        detail=mask_json(event.detail),
        id=event.feed_id,
        task_id=task_id,
        kind=kind,
        client=client,
    )


class AttemptOut(msgspec.Struct):
    attempt: int
    at: datetime
    duration_ms: float | None
    status_code: int | None
    error_class: str | None
    error: str | None
    response_body: str | None
    next_attempt_at: datetime | None


class DeliveryOut(msgspec.Struct):
    id: int
    task_id: str
    event_seq: int
    webhook_id: str
    url: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    # Only on the per-task route, where a task's few deliveries come with their whole history.
    attempt_log: list[AttemptOut] | msgspec.UnsetType = msgspec.UNSET


class DeliveryList(msgspec.Struct):
    items: list[DeliveryOut]


class DeliveryPage(msgspec.Struct):
    items: list[DeliveryOut]
    next_cursor: str | None


class HookHostOut(msgspec.Struct):
    host: str  # scheme://host:port
    # The circuit breaker, shared by every process through the database.
    consecutive_failures: int
    paused: bool
    paused_until: datetime | None
    updated_at: datetime | None  # of the breaker's row; null for a host on no failure streak
    # The dispatcher of the process that answered (HookHostList.instance_id).
    in_flight: int
    share: int
    slow: bool
    recent_attempts: int
    p50_ms: float | None
    p90_ms: float | None


class HookHostList(msgspec.Struct):
    # The process whose dispatcher the in-flight counts, shares and answer times are from; null when
    # this process sends no webhooks (every host then shows its full share and nothing in flight).
    instance_id: str | None
    host_concurrency: int
    items: list[HookHostOut]


def delivery_out(
    delivery: Delivery, task_id: str, attempts: list[DeliveryAttempt] | None = None
) -> DeliveryOut:
    return _filled(
        DeliveryOut,
        delivery,
        task_id=task_id,
        url=mask_credentials(delivery.url),
        attempt_log=msgspec.UNSET if attempts is None else [_filled(AttemptOut, a) for a in attempts],
    )


def encode_cursor(prefix: str, pk: int) -> str:
    """Opaque keyset cursor: the last primary key a page returned, tagged with the resource."""
    return base64.urlsafe_b64encode(f"{prefix}{pk}".encode()).decode().rstrip("=")


def decode_cursor(prefix: str, cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    digits = raw.removeprefix(prefix)
    if not (raw.startswith(prefix) and digits.isascii() and digits.isdigit() and len(digits) <= 19) or not (
        1 <= int(digits) <= INT64_MAX
    ):
        raise InvalidInput("cursor: not a cursor this API returned")
    return int(digits)


# -- JSON bodies -----------------------------------------------------------------------------------
# Postgres refuses NUL in text and in JSONB, and msgspec recurses (a RecursionError) about a thousand
# levels down: every JSON body is checked here before anything of it is used.

_TOO_DEEP = f"JSON may be nested at most {JSON_MAX_DEPTH} levels deep"
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def too_deep(body: bytes) -> InvalidInput:
    """The error for a body too deep to decode, naming the top-level key that holds the depth."""
    depth, raw_key, last_string = 0, b"", b""
    for match in _JSON_TOKEN.finditer(body):
        token = match.group()
        if token in (b"{", b"["):
            depth += 1
            if depth > JSON_MAX_DEPTH:
                break
        elif token in (b"}", b"]"):
            depth -= 1
        elif token == b":":
            if depth == 1:
                raw_key = last_string
        else:
            last_string = token
    try:
        key = msgspec.json.decode(raw_key, type=str) or "body"
    except msgspec.DecodeError:
        key = "body"
    return InvalidInput(f"{key}: {_TOO_DEEP}", extra={"field": key})


def check_json(value: Any) -> None:
    """Refuse a decoded JSON body that nests deeper than JSON_MAX_DEPTH or holds a NUL in any text,
    naming where (`metadata.a.0`)."""
    # (value, depth, (key, parent-entry)): the path is only spelled out for the error.
    stack: list[tuple[Any, int, tuple[Any, Any] | None]] = [(value, 1, None)]
    while stack:
        node, depth, entry = stack.pop()
        problem = None
        if isinstance(node, str):
            if "\x00" in node:
                problem = "text may not contain NUL (\\u0000)"
        elif isinstance(node, dict | list):
            if depth > JSON_MAX_DEPTH:
                problem = _TOO_DEEP
            else:
                items = node.items() if isinstance(node, dict) else enumerate(node)
                for key, child in items:
                    if isinstance(key, str) and "\x00" in key:
                        problem = "a key may not contain NUL (\\u0000)"
                        break
                    stack.append((child, depth + 1, (key, entry)))
        if problem is not None:
            path: list[str] = []
            while entry is not None:
                path.append(str(entry[0]))
                entry = entry[1]
            path.reverse()
            if problem is _TOO_DEEP:
                del path[2:]  # the path is as deep as the limit: its start says where
            where = ".".join(path) or "body"
            raise InvalidInput(f"{where}: {problem}", extra={"field": where})


def decode_json(body: bytes) -> Any:
    """A JSON request body decoded and checked (check_json); InvalidInput naming what is wrong."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"body: not valid JSON ({exc})") from None
    except RecursionError:
        raise too_deep(body) from None
    check_json(value)
    return value


class CreateClient(msgspec.Struct, forbid_unknown_fields=True):
    name: ClientName
    # Where its tasks are polled unless a registration names another (default: `default`).
    relay: RelayName | None = None
    # Registrations per second, bursts to twice that (default: SUNOTRACK_CLIENT_RATE).
    rate: Annotated[float, msgspec.Meta(gt=0, le=1e6)] | None = None
    # What its tasks do with the notify_hook a relay answer names (default: SUNOTRACK_RELAY_HOOKS).
    relay_hooks: RelayHooks | None = None


class ClientOut(msgspec.Struct):
    """A client as listed: never its token or secrets."""

    name: str
    relay: str
    # None: SUNOTRACK_CLIENT_RATE and SUNOTRACK_RELAY_HOOKS.
    rate: float | None
    relay_hooks: str | None
    created_at: datetime
    revoked_at: datetime | None
    task_count: int


class ClientList(msgspec.Struct):
    items: list[ClientOut]


def client_out(client: Client, task_count: int) -> ClientOut:
    return _filled(ClientOut, client, task_count=task_count)
