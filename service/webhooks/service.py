"""The webhook outbox: enqueue in the caller's transaction, sign, claim, settle attempts, re-queue.

Functions take the session first (the dispatcher's hot path: its driver connection) and never commit;
the dispatcher (jobs.py) and the API own transactions.
"""

from __future__ import annotations

import base64
import hmac
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import msgspec
from pydantic import SecretStr
from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.errors import NotFound
from service.models import Delivery, DeliveryAttempt, HookHost, Task
from service.upstream.schemas import ClipContent
from service.vocabulary import TERMINAL_STATUSES, DeliveryStatus, HookSource, NotifyFormat
from service.webhooks.ssrf import check_hook_url, hook_host

__all__ = [
    "CHANNEL",
    "AttemptResult",
    "ClaimedDelivery",
    "TransitionNotice",
    "build_body",
    "check_hook_url",
    "delivery_format",
    "enqueue_deliveries",
]

# Postgres NOTIFY channel the dispatchers LISTEN on; a notification is sent only when the writer commits.
CHANNEL = "sunotrack_deliveries"
RESPONSE_BODY_LIMIT = 4096
# Retries wait their scheduled delay plus up to this fraction, so receivers coming back are not stampeded.
JITTER = 0.2
# A Retry-After may stretch the schedule, but not park a delivery beyond a day.
RETRY_AFTER_CAP_S = 86_400.0
# Statuses that count against a host's health: it is down, overloaded or too slow.
BREAKER_STATUS_CODES = frozenset({408, 429})
BREAKER_ERROR_CLASSES = frozenset({"dns", "connect", "timeout", "tls", "http"})

_RELAY_STATUS = {
    "submitted": "SUBMITTED",
    "queued": "QUEUED",
    "in_progress": "IN_PROGRESS",
    "complete": "SUCCESS",
    "failed": "FAILURE",
    "timed_out": "FAILURE",
    "cancelled": "FAILURE",
}
_RELAY_CLIP_STATUS = {
    "submitted": "submitted",
    "queued": "queued",
    "in_progress": "streaming",
    "complete": "complete",
    "failed": "error",
    "timed_out": "error",
    "cancelled": "error",
}


class ClipView(ClipContent, kw_only=True):
    """A clip as the task JSON shows it."""

    id: str
    status: str | None


@dataclass(frozen=True, slots=True)
class TransitionNotice:
    task_pk: int
    task_id: str
    kind: str
    seq: int
    status: str
    previous_status: str | None
    progress: int | None
    fail_reason: str | None
    clips: list[ClipView]
    metadata: dict[str, Any] | None
    at: datetime
    notify_hook: str
    notify_format: str
    relay_payload: bytes | None


def delivery_format(chosen: str | None, hook_source: str | None) -> str:
    """The body a task's webhooks carry: the format its registration chose, else the relay's own task
    object for a hook adopted from the relay (that consumer was written for the relay's callback),
    else ours."""
    if chosen is not None:
        return chosen
    return NotifyFormat.RELAY if hook_source == HookSource.RELAY else NotifyFormat.SUNOTRACK


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _relay_object(notice: TransitionNotice) -> dict[str, Any]:
    """What the relay's fetch endpoint would return for this state, for transitions the relay never saw."""
    progress = notice.progress if notice.progress is not None else (100 if notice.status == "complete" else 0)
    finished = int(_utc(notice.at).timestamp()) if notice.status in TERMINAL_STATUSES else None
    return {
        "task_id": notice.task_id,
        "notify_hook": notice.notify_hook,
        "action": notice.kind.upper(),
        "status": _RELAY_STATUS.get(notice.status, notice.status.upper()),
        "fail_reason": notice.fail_reason or "",
        "submit_time": None,
        "start_time": None,
        "finish_time": finished,
        "progress": f"{progress}%",
        "data": [
            {
                "id": clip.id,
                "clip_id": clip.id,
                "status": _RELAY_CLIP_STATUS.get(str(clip.status), clip.status),
                "title": clip.title,
                "audio_url": clip.audio_url,
                "image_url": clip.image_url,
                "video_url": clip.video_url,
                "duration": clip.duration,
                "metadata": {"error_message": clip.error},
            }
            for clip in notice.clips
        ],
    }


def build_body(notice: TransitionNotice) -> bytes:
    if notice.notify_format == "relay":
        if notice.relay_payload is not None:
            return notice.relay_payload
        return msgspec.json.encode(_relay_object(notice))
    return msgspec.json.encode(
        {
            "type": "task.status_changed",
            "timestamp": _utc(notice.at),
            "data": {
                "task_id": notice.task_id,
                "kind": notice.kind,
                "seq": notice.seq,
                "status": notice.status,
                "previous_status": notice.previous_status,
                "progress": notice.progress,
                "fail_reason": notice.fail_reason,
                "clips": notice.clips,
                # Receivers get an object whether or not the client attached metadata.
                "metadata": notice.metadata or {},
            },
        }
    )


def new_webhook_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


async def notify_dispatchers(session: AsyncSession) -> None:
    """Wake every dispatcher once this transaction commits (Postgres folds repeats into one)."""
    await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


async def enqueue_deliveries(session: AsyncSession, notices: Sequence[TransitionNotice]) -> None:
    """Insert one outbox row per notice in the caller's transaction and wake the dispatchers on commit."""
    if not notices:
        return
    rows = [
        {
            "task_pk": notice.task_pk,
            "event_seq": notice.seq,
            "webhook_id": new_webhook_id(),
            "url": notice.notify_hook,
            "body": build_body(notice),
        }
        for notice in notices
    ]
    await session.execute(
        pg_insert(Delivery).values(rows).on_conflict_do_nothing(index_elements=["task_pk", "event_seq"])
    )
    await notify_dispatchers(session)


# --- signing ------------------------------------------------------------------------------------------


def secret_keys(secrets: Sequence[SecretStr]) -> tuple[bytes, ...]:
    """HMAC keys from whsec_ secrets, decoded the way the standardwebhooks package decodes them."""
    keys = []
    for secret in secrets:
        raw = secret.get_secret_value().removeprefix("whsec_")
        keys.append(base64.b64decode(raw + "=="))
    return tuple(keys)


def signature_header(keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<sig>` per key, space separated: receivers accept a message if any signature matches."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode() for key in keys)


# --- claiming and settling ----------------------------------------------------------------------------
#
# The dispatcher's two hot statements (claim, settle) run on a plain asyncpg connection, not a session:
# SQLAlchemy's per-statement overhead measured 2.5x the driver's own client cost on these batches, and
# each statement is atomic on its own (the lease protects what spans several).


class Driver(Protocol):
    """The asyncpg connection methods used here (asyncpg ships no type hints)."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...

    async def execute(self, query: str, *args: Any) -> str: ...


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    id: int
    task_id: str
    webhook_id: str
    url: str
    body: bytes
    attempts: int  # attempts made before this one, in the current round
    host: str
    # The next_attempt_at our claim wrote: writes back only land while the row still carries it.
    lease: datetime


@dataclass(frozen=True, slots=True)
class AttemptResult:
    at: datetime
    duration_ms: float
    status_code: int | None = None
    error_class: str | None = None  # dns | connect | timeout | tls | http | ssrf
    error: str | None = None
    response_body: str | None = None
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def host_failed(self) -> bool:
        """Whether this attempt says the host is unhealthy (a refused address never reached it)."""
        if self.status_code is not None:
            return self.status_code >= 500 or self.status_code in BREAKER_STATUS_CODES
        return self.error_class in BREAKER_ERROR_CLASSES


@dataclass(frozen=True, slots=True)
class Settlement:
    status: str
    next_attempt_at: datetime | None


@dataclass(frozen=True, slots=True)
class Claim:
    deliveries: list[ClaimedDelivery]
    # Rows put back because their host is paused, and when the earliest of them becomes due again.
    deferred: int
    wake_at: datetime | None


def settle(
    delivery: ClaimedDelivery,
    result: AttemptResult,
    schedule: Sequence[float],
    *,
    rng: random.Random | None = None,
) -> Settlement:
    """The delivery's state after this attempt: delivered, dead, or failed with its next attempt time."""
    if result.ok:
        return Settlement(DeliveryStatus.DELIVERED, None)
    attempt = delivery.attempts + 1
    if result.status_code == 410 or attempt > len(schedule):
        return Settlement(DeliveryStatus.DEAD, None)
    delay = schedule[attempt - 1] * (1 + (rng or random).uniform(0, JITTER))
    if result.retry_after_s is not None:
        delay = max(delay, min(result.retry_after_s, RETRY_AFTER_CAP_S))
    finished = result.at + timedelta(milliseconds=result.duration_ms)
    return Settlement(DeliveryStatus.FAILED, finished + timedelta(seconds=delay))


# One round trip: the claim, plus the (few) hosts the circuit breaker has tripped. hook_hosts only holds
# hosts on a failure streak (a success deletes the row), so the scan stays small.
_CLAIM = """
    WITH due AS (
        SELECT id FROM deliveries
        WHERE next_attempt_at <= now()
        ORDER BY next_attempt_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE deliveries AS d
        SET next_attempt_at = now() + make_interval(secs => $2)
        FROM due
        WHERE d.id = due.id
        RETURNING d.id, d.task_pk, d.webhook_id, d.url, d.body, d.attempts, d.next_attempt_at
    ), tripped AS (
        SELECT array_agg(host ORDER BY host) AS hosts, array_agg(paused_until ORDER BY host) AS untils
        FROM hook_hosts WHERE consecutive_failures >= $3
    )
    SELECT c.id, t.task_id, c.webhook_id, c.url, c.body, c.attempts, c.next_attempt_at, now(),
        tripped.hosts, tripped.untils
    FROM claimed AS c JOIN tasks AS t ON t.id = c.task_pk CROSS JOIN tripped
"""

# Only one process wins the probe of a host whose pause is over: the row lock serialises the others,
# which then see the new paused_until and defer.
_TAKE_PROBES = """
    UPDATE hook_hosts SET paused_until = now() + make_interval(secs => $2), updated_at = now()
    WHERE host = ANY($1::text[]) AND (paused_until IS NULL OR paused_until <= now())
    RETURNING host, paused_until
"""

_DEFER = """
    UPDATE deliveries AS d SET next_attempt_at = v.until
    FROM unnest($1::bigint[], $2::timestamptz[]) AS v(id, until)
    WHERE d.id = v.id
"""


async def claim_due(
    driver: Driver, *, limit: int, lease_s: float, breaker_failures: int, probe_s: float
) -> Claim:
    """Lease up to `limit` due deliveries to this process, putting back those whose host is paused.

    A host tripped by the circuit breaker gets one probe delivery once its pause is over; its other
    deliveries wait for the probe's outcome instead of each burning an attempt on a host that is down.
    """
    rows = await driver.fetch(_CLAIM, limit, lease_s, breaker_failures)
    if not rows:
        return Claim([], 0, None)
    now: datetime = rows[0][7]
    claimed = [
        ClaimedDelivery(
            id=row[0],
            task_id=row[1],
            webhook_id=row[2],
            url=row[3],
            body=row[4],
            attempts=row[5],
            host=hook_host(row[3]),
            lease=row[6],
        )
        for row in rows
    ]
    hosts = {delivery.host for delivery in claimed}
    tripped: dict[str, datetime | None] = {
        host: until for host, until in zip(rows[0][8] or (), rows[0][9] or (), strict=True) if host in hosts
    }
    if not tripped:
        return Claim(claimed, 0, None)

    probes: set[str] = set()
    half_open = [host for host, until in tripped.items() if until is None or until <= now]
    if half_open:
        for host, until in await driver.fetch(_TAKE_PROBES, half_open, probe_s):
            probes.add(host)
            tripped[host] = until
    sendable: list[ClaimedDelivery] = []
    deferred_ids: list[int] = []
    deferred_until: list[datetime] = []
    for delivery in claimed:
        if delivery.host not in tripped:
            sendable.append(delivery)
        elif delivery.host in probes:
            probes.discard(delivery.host)
            sendable.append(delivery)
        else:
            until = tripped[delivery.host]
            # Lost the probe race to another process: its pause (the probe's lease) is moments old.
            deferred_ids.append(delivery.id)
            deferred_until.append(
                until if until is not None and until > now else now + timedelta(seconds=probe_s)
            )
    if deferred_ids:
        await driver.execute(_DEFER, deferred_ids, deferred_until)
    return Claim(sendable, len(deferred_ids), min(deferred_until) if deferred_until else None)


# One statement settles a batch: each delivery's new state, its attempt log row, and a reset of the hosts
# that answered (their failure streak is over).
_SETTLE = """
    WITH v AS (
        SELECT * FROM unnest(
            $1::bigint[], $2::timestamptz[], $3::text[], $4::timestamptz[], $5::smallint[], $6::text[],
            $7::timestamptz[], $8::integer[], $9::timestamptz[], $10::float8[], $11::text[], $12::text[],
            $13::text[]
        ) AS v(id, lease, status, next_attempt_at, status_code, error, delivered_at, attempt, at,
            duration_ms, error_class, attempt_error, response_body)
    ), settled AS (
        UPDATE deliveries AS d
        SET status = v.status,
            attempts = v.attempt,
            next_attempt_at = v.next_attempt_at,
            last_status_code = v.status_code,
            last_error = v.error,
            delivered_at = COALESCE(v.delivered_at, d.delivered_at)
        FROM v
        WHERE d.id = v.id AND d.next_attempt_at = v.lease
    ), recovered AS (
        DELETE FROM hook_hosts WHERE host = ANY($14::text[])
    )
    INSERT INTO delivery_attempts (
        delivery_id, attempt, at, duration_ms, status_code, error_class, error, response_body,
        next_attempt_at
    )
    SELECT id, attempt, at, duration_ms, status_code, error_class, attempt_error, response_body,
        next_attempt_at
    FROM v
"""

_HOSTS_FAILED = """
    INSERT INTO hook_hosts AS h (host, consecutive_failures, paused_until, updated_at)
    SELECT v.host, v.failures,
        CASE WHEN v.failures >= $3 THEN now() + make_interval(secs => $4) END, now()
    FROM unnest($1::text[], $2::integer[]) AS v(host, failures)
    ON CONFLICT (host) DO UPDATE SET
        consecutive_failures = h.consecutive_failures + excluded.consecutive_failures,
        paused_until = CASE
            WHEN h.consecutive_failures + excluded.consecutive_failures >= $3
            THEN now() + make_interval(secs => $4)
            ELSE h.paused_until END,
        updated_at = now()
    RETURNING host, paused_until
"""


def _error_text(result: AttemptResult) -> str | None:
    if result.error is not None:
        return result.error
    if result.status_code is not None and not result.ok:
        return f"HTTP {result.status_code}"
    return None


async def record_results(
    driver: Driver,
    outcomes: Sequence[tuple[ClaimedDelivery, AttemptResult, Settlement]],
    *,
    breaker_failures: int,
    breaker_pause_s: float,
) -> list[tuple[str, datetime]]:
    """Write a batch of attempts in one statement (two if a host failed); returns the hosts it paused.

    Outcomes must be in completion order: a host's failures count from its last success in the batch.
    A row whose lease was lost (expired and claimed again elsewhere) keeps the other process's state;
    its attempt is still logged, since it happened.
    """
    if not outcomes:
        return []
    recovered: set[str] = set()
    failures: dict[str, int] = {}
    for delivery, result, _ in outcomes:
        if result.host_failed:
            failures[delivery.host] = failures.get(delivery.host, 0) + 1
        elif result.error_class is None:
            recovered.add(delivery.host)
            failures.pop(delivery.host, None)
    await driver.execute(
        _SETTLE,
        [delivery.id for delivery, _, _ in outcomes],
        [delivery.lease for delivery, _, _ in outcomes],
        [settlement.status for _, _, settlement in outcomes],
        [settlement.next_attempt_at for _, _, settlement in outcomes],
        [result.status_code for _, result, _ in outcomes],
        [_error_text(result) for _, result, _ in outcomes],
        [result.at if result.ok else None for _, result, _ in outcomes],
        [delivery.attempts + 1 for delivery, _, _ in outcomes],
        [result.at for _, result, _ in outcomes],
        [result.duration_ms for _, result, _ in outcomes],
        [result.error_class for _, result, _ in outcomes],
        [result.error for _, result, _ in outcomes],
        [result.response_body for _, result, _ in outcomes],
        sorted(recovered),
    )
    if not failures:
        return []
    hosts = sorted(failures)
    paused = await driver.fetch(
        _HOSTS_FAILED,
        hosts,
        [failures[host] for host in hosts],
        breaker_failures,
        breaker_pause_s,
    )
    return [(host, until) for host, until in paused if until is not None and host in failures]


_RELEASE = text(
    """
    UPDATE deliveries AS d SET next_attempt_at = now()
    FROM unnest(CAST(:ids AS bigint[]), CAST(:leases AS timestamptz[])) AS v(id, lease)
    WHERE d.id = v.id AND d.next_attempt_at = v.lease
    """
)


async def release_claims(session: AsyncSession, deliveries: Sequence[ClaimedDelivery]) -> None:
    """Hand unsent claimed rows back at once instead of making them wait out the lease."""
    if deliveries:
        await session.execute(
            _RELEASE,
            {
                "ids": [delivery.id for delivery in deliveries],
                "leases": [delivery.lease for delivery in deliveries],
            },
        )
    await notify_dispatchers(session)


async def count_paused_hosts(session: AsyncSession) -> int:
    query = text("SELECT count(*) FROM hook_hosts WHERE paused_until > now()")
    return int((await session.execute(query)).scalar_one())


# --- the API's reads and re-queues --------------------------------------------------------------------


async def task_pk_of(session: AsyncSession, task_id: str) -> int:
    pk = (await session.execute(select(Task.id).where(Task.task_id == task_id))).scalar_one_or_none()
    if pk is None:
        raise NotFound(f"task {task_id!r} is not tracked", extra={"task_id": task_id})
    return pk


async def deliveries_of_task(
    session: AsyncSession, task_pk: int
) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
    deliveries = list(
        (
            await session.execute(
                select(Delivery).where(Delivery.task_pk == task_pk).order_by(Delivery.event_seq, Delivery.id)
            )
        ).scalars()
    )
    attempts: dict[int, list[DeliveryAttempt]] = {delivery.id: [] for delivery in deliveries}
    if deliveries:
        rows = await session.execute(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id.in_(list(attempts)))
            .order_by(DeliveryAttempt.delivery_id, DeliveryAttempt.id)
        )
        for attempt in rows.scalars():
            attempts[attempt.delivery_id].append(attempt)
    return [(delivery, attempts[delivery.id]) for delivery in deliveries]


async def list_deliveries(
    session: AsyncSession, *, status: str | None, limit: int, before_id: int | None
) -> list[tuple[Delivery, str]]:
    """Newest first by id (a stable keyset cursor), each with its task's task_id."""
    query = (
        select(Delivery, Task.task_id)
        .join(Task, Task.id == Delivery.task_pk)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(Delivery.status == status)
    if before_id is not None:
        query = query.where(Delivery.id < before_id)
    return [(delivery, task_id) for delivery, task_id in await session.execute(query)]


async def requeue(
    session: AsyncSession,
    *,
    task_pk: int | None = None,
    delivery_id: int | None = None,
    statuses: Sequence[str],
) -> list[Delivery]:
    """Make matching deliveries due now with a fresh round of attempts; wakes the dispatchers on commit.

    `attempts` restarts at 0 so the retry schedule applies again; the attempt log keeps every earlier try.
    """
    query = (
        update(Delivery)
        .where(Delivery.status.in_(statuses))
        .values(status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=func.now())
        .returning(Delivery)
        # The API may have loaded these rows already: refresh them from RETURNING.
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    if task_pk is not None:
        query = query.where(Delivery.task_pk == task_pk)
    if delivery_id is not None:
        query = query.where(Delivery.id == delivery_id)
    requeued = list((await session.execute(query)).scalars())
    if requeued:
        await notify_dispatchers(session)
    return sorted(requeued, key=lambda delivery: delivery.id)


async def get_delivery(session: AsyncSession, delivery_id: int) -> tuple[Delivery, str]:
    query = select(Delivery, Task.task_id).join(Task, Task.id == Delivery.task_pk)
    row = (await session.execute(query.where(Delivery.id == delivery_id))).one_or_none()
    if row is None:
        raise NotFound(f"delivery {delivery_id} does not exist", extra={"delivery_id": delivery_id})
    delivery, task_id = row
    return delivery, task_id


async def list_hook_hosts(session: AsyncSession) -> list[HookHost]:
    query = select(HookHost).order_by(HookHost.paused_until.desc().nulls_last(), HookHost.host)
    return list((await session.execute(query)).scalars())


async def database_now(session: AsyncSession) -> datetime:
    now: datetime = (await session.execute(text("SELECT now()"))).scalar_one()
    return now
