"""Request and response structs of the public API (keys may be added, never renamed)."""

from __future__ import annotations

import base64
import binascii
import enum
import re
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from litestar import Request

from service.config import RELAY_NAME
from service.errors import InvalidInput
from service.models import Client, Clip, Delivery, DeliveryAttempt, Task, TaskEvent
from service.redact import mask_credentials, mask_json
from service.tracking.repository import clip_view, timeline_seconds
from service.tracking.service import REGISTER_GROUP_MAX
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


# An absolute http(s) URL (webhooks.ssrf checks it: length, host, addresses). Spelled out so the
# OpenAPI document says what is accepted: an IPv6 literal or a name of letters, digits, dots and
# hyphens, a port 1-65535, optional user info, no spaces or control characters.
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
_H16 = "[0-9A-Fa-f]{1,4}"
_IPV6 = (
    f"(({_H16}:){{7}}{_H16}|({_H16}:){{1,7}}:|({_H16}:){{1,6}}:{_H16}|({_H16}:){{1,5}}(:{_H16}){{1,2}}"
    f"|({_H16}:){{1,4}}(:{_H16}){{1,3}}|({_H16}:){{1,3}}(:{_H16}){{1,4}}|({_H16}:){{1,2}}(:{_H16}){{1,5}}"
    f"|{_H16}:(:{_H16}){{1,6}}|:((:{_H16}){{1,7}}|:))"
)
HOOK_PATTERN = (
    r"^[Hh][Tt][Tt][Pp][Ss]?://([A-Za-z0-9._~!$&'()*+,;=-]+(:[A-Za-z0-9._~!$&'()*+,;=-]*)?@)?"
    r"([A-Za-z0-9.-]+|\[" + _IPV6 + r"\])(:" + _PORT + r")?([/?#][^\s\x00-\x1f\x7f]*)?$"
)
# Documented, not enforced here: an internationalised host name is accepted too (IDNA-encoded by the check).
HookUrl = Annotated[
    str, msgspec.Meta(min_length=1, max_length=HOOK_MAX_LENGTH, extra_json_schema={"pattern": HOOK_PATTERN})
]


class RegisterTask(msgspec.Struct, forbid_unknown_fields=True):
    task_id: TaskIdStr
    kind: TaskKind = TaskKind.MUSIC
    notify_hook: HookUrl | None = None
    notify_format: NotifyFormat | None = None
    metadata: dict[str, Any] | None = None
    # Where the task is polled: the client's relay unless given (the admin's: `default`).
    relay: RelayName | None = None


BATCH_MAX = REGISTER_GROUP_MAX


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


AwareTime = Annotated[datetime, msgspec.Meta(tz=True, description="RFC 3339 with its UTC offset")]
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)", re.ASCII)


def parse_time(name: str, value: str) -> datetime:
    """An RFC 3339 time with its offset (a leap second reads as :59); InvalidInput naming `name`."""
    match = _RFC3339.fullmatch(value)
    try:
        if match is None:
            raise ValueError
        year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
        fraction, offset = match.group(7) or "", match.group(8).upper()
        clean = (
            f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{min(second, 59):02d}{fraction[:7]}"
        )
        return datetime.fromisoformat(clean + ("+00:00" if offset == "Z" else offset))
    except ValueError:
        raise InvalidInput(
            f"{name}: not an RFC 3339 time with its UTC offset, e.g. 2026-11-29T10:00:00Z"
        ) from None


REPLAY_TASK_IDS_MAX = 1000


# A pending delivery is queued already: replay takes the others.
Replayable = enum.StrEnum(  # type: ignore[misc]
    "Replayable", {status.name: status.value for status in DeliveryStatus if status != DeliveryStatus.PENDING}
)


class ReplayDeliveries(msgspec.Struct, forbid_unknown_fields=True):
    since: AwareTime
    # Unset: now.
    until: AwareTime | None = None
    # `delivered` counts only with include_delivered.
    status: Annotated[list[Replayable], msgspec.Meta(min_length=1, max_length=len(Replayable))] = (
        msgspec.field(default_factory=lambda: [Replayable("failed"), Replayable("dead")])
    )
    task_ids: Annotated[list[TaskIdStr], msgspec.Meta(max_length=REPLAY_TASK_IDS_MAX)] | None = None
    include_delivered: bool = False


class ReplayResult(msgspec.Struct):
    requeued: int


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
        # Not convert(..., Lyrics | None): that union is a new type each call, 6 µs to look up.
        lyrics=None if task.lyrics is None else msgspec.convert(task.lyrics, Lyrics),
        client=msgspec.UNSET
        if client_names is None
        else (None if task.client_id is None else client_names[task.client_id]),
        timeline=msgspec.UNSET,  # GET /tasks/{task_id} fills it in
    )


# TaskOut's fields a tasks row holds as they are shown or as task_out starts from (by the same name);
# the others are computed.
TASK_VIEW_COLUMNS = tuple(
    name for name in TaskOut.__struct_fields__ if name not in {"clips", "client", "timeline"}
)
_decode_clips = msgspec.json.Decoder(list[ClipView]).decode
_decode_lyrics = msgspec.json.Decoder(Lyrics | None).decode
_decode_object = msgspec.json.Decoder(dict[str, Any] | None).decode
_decode_timeline = msgspec.json.Decoder(dict[str, float] | None).decode


def task_view_out(row: Any, *, shows_client: bool, timeline: bool = True) -> TaskOut:
    """A row of repository.task_view_statement(TASK_VIEW_COLUMNS) as task_out shows the task (its JSON
    columns are text, as the statement gives them), with its timeline unless not asked for (a
    registration's answer has none: its row may have no `timeline`)."""
    hook = row["notify_hook"]
    metadata, lyrics, clips = row["metadata"], row["lyrics"], row["clips"]
    values = {name: row[name] for name in TASK_VIEW_COLUMNS}
    values.update(
        notify_hook=None if hook is None else mask_credentials(hook),
        notify_format=delivery_format(row["notify_format"], row["notify_hook_source"]),
        metadata=None if metadata is None else _decode_object(metadata),
        lyrics=None if lyrics is None else _decode_lyrics(lyrics),
        clips=[] if clips is None else _decode_clips(clips),
        client=row["client_name"] if shows_client else msgspec.UNSET,
        timeline=timeline_seconds(None if row["timeline"] is None else _decode_timeline(row["timeline"]))
        if timeline
        else msgspec.UNSET,
    )
    return TaskOut(**values)


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


async def strict_body(request: Request[Any, Any, Any], struct: type[_Out]) -> _Out:
    """The body decoded again without the lax conversions Litestar applies (a 0 or "true" for a
    boolean), so that it takes exactly what the OpenAPI document says."""
    try:
        return msgspec.json.decode(await request.body(), type=struct)
    except msgspec.ValidationError as exc:
        where = str(exc).rpartition("at `$.")[2].rstrip("`") or "body"
        raise InvalidInput(f"{where}: {str(exc).partition(' - at ')[0]}", extra={"field": where}) from None


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


# The relay front's formats (README, "Adopt sunotrack by changing one URL"): the relay's own, as its
# documentation gives them (../shared/upstream-docs), for the OpenAPI document only. Open objects:
# the relay's fields we do not store come from its last answer, whatever they are.
class RelaySubmitBody(msgspec.Struct):
    """The relay's submit body, passed on; of it sunotrack reads only `notify_hook`."""

    notify_hook: Annotated[
        HookUrl | Literal[""] | None, msgspec.Meta(description="Becomes the task's hook; never forwarded")
    ] = None


class RelayClip(msgspec.Struct):
    id: str
    status: str | None = None


class RelayTask(msgspec.Struct):
    task_id: str
    status: str
    notify_hook: str
    action: str | None = None
    fail_reason: str | None = None
    submit_time: int | None = None
    start_time: int | None = None
    finish_time: int | None = None
    progress: str | None = None
    data: list[RelayClip] | dict[str, Any] | None = None


class RelayTaskAnswer(msgspec.Struct):
    """The task in the relay's format, from our database (fields we do not store: from the relay's last
    answer)."""

    code: str
    message: str
    data: RelayTask


class RelayBatchAnswer(msgspec.Struct):
    """The tracked tasks among those asked, in the relay's format and the order asked."""

    code: str
    message: str
    data: list[RelayTask]


class RelayStemsAnswer(msgspec.Struct):
    """The stems in the relay's format, from our state (queued clips at first)."""

    clips: list[RelayClip]


class RelayEnvelope(msgspec.Struct):
    """The relay's answer as it came: its envelope, `data` the new task's id after a submit."""

    code: str | int | None = None
    message: str | None = None
    data: Any = None


class RelayNotExist(msgspec.Struct):
    """The relay's answer for an id it does not know: here, one the caller does not track."""

    code: Annotated[str, msgspec.Meta(pattern="^task_not_exist$")]
    message: str
    data: None
