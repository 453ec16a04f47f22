"""The dispatcher's database work: claim due deliveries under a lease, settle attempts, release claims.

The claim and the settle run on a plain asyncpg connection, not a SQLAlchemy session (docs/design.md,
"The dispatcher's driver connection"); each statement is atomic on its own, and the lease protects
what spans several. Rows are declared once as NamedTuples named by their columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import rows_as, sql_type
from service.models import Delivery, DeliveryAttempt
from service.webhooks.outbox import notify_dispatchers
from service.webhooks.ssrf import hook_host

_DELIVERIES: Table = Delivery.__table__  # type: ignore[assignment]
_ATTEMPTS: Table = DeliveryAttempt.__table__  # type: ignore[assignment]


class Driver(Protocol):
    """The asyncpg connection methods used here (asyncpg ships no type hints)."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...

    async def execute(self, query: str, *args: Any) -> str: ...


class ClaimedDelivery(NamedTuple):
    """A delivery leased to this process, as the claim returns it."""

    id: int
    task_id: str
    webhook_id: str
    url: str
    body: bytes
    attempts: int  # attempts made before this one, in the current round
    # The next_attempt_at our claim wrote: writes back only land while the row still carries it.
    lease: datetime
    # The task's client's secrets (None: the admin's task, signed with SUNOTRACK_WEBHOOK_SECRET); the
    # previous one only while its grace period after a rotation lasts.
    webhook_secret: str | None = None
    previous_webhook_secret: str | None = None

    @property
    def host(self) -> str:
        return hook_host(self.url)


@dataclass(frozen=True, slots=True)
class DeliveryClaim:
    deliveries: list[ClaimedDelivery]
    # Rows put back because their host is paused, and when the earliest of them becomes due again.
    deferred: int
    wake_at: datetime | None


class AttemptOutcome(NamedTuple):
    """One attempt as the settle statement writes it: its delivery_attempts row, then what it makes
    of its delivery (the deliveries row's new status, last error and delivery time)."""

    delivery_id: int
    attempt: int
    at: datetime
    duration_ms: float | None
    status_code: int | None
    error_class: str | None
    error: str | None
    response_body: str | None
    next_attempt_at: datetime | None
    lease: datetime
    status: str
    last_error: str | None
    delivered_at: datetime | None


# One round trip: the claim, plus the (few) hosts the circuit breaker has tripped. hook_hosts only holds
# hosts on a failure streak (a success deletes the row), so the scan stays small.
_CLAIM = """
    WITH due AS (
        SELECT id FROM deliveries
        WHERE next_attempt_at <= now()
            -- Without SUNOTRACK_WEBHOOK_SECRET only clients' deliveries can be signed.
            AND ($4 OR EXISTS (SELECT FROM tasks AS t WHERE t.id = task_pk AND t.client_id IS NOT NULL))
        ORDER BY next_attempt_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE deliveries AS d
        SET next_attempt_at = now() + make_interval(secs => $2)
        FROM due
        WHERE d.id = due.id
        RETURNING d.id, d.task_pk, d.webhook_id, d.url, d.body, d.attempts, d.next_attempt_at AS lease
    ), tripped AS (
        SELECT array_agg(host ORDER BY host) AS hosts, array_agg(paused_until ORDER BY host) AS untils
        FROM hook_hosts WHERE consecutive_failures >= $3
    )
    SELECT c.*, t.task_id, now() AS now, tripped.hosts, tripped.untils, cl.webhook_secret,
           CASE WHEN cl.previous_secret_until > now() THEN cl.previous_webhook_secret END
               AS previous_webhook_secret
    FROM claimed AS c JOIN tasks AS t ON t.id = c.task_pk CROSS JOIN tripped
        LEFT JOIN clients AS cl ON cl.id = t.client_id
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


async def claim_due_deliveries(
    driver: Driver,
    *,
    limit: int,
    lease_s: float,
    breaker_failures: int,
    probe_s: float,
    signs_admin: bool = True,
) -> DeliveryClaim:
    """Lease up to `limit` due deliveries to this process, putting back those whose host is paused;
    only clients' deliveries unless `signs_admin` (SUNOTRACK_WEBHOOK_SECRET is set).

    A host tripped by the circuit breaker gets one probe delivery once its pause is over; its other
    deliveries wait for the probe's outcome instead of each burning an attempt on a host that is down.
    """
    rows = await driver.fetch(_CLAIM, limit, lease_s, breaker_failures, signs_admin)
    if not rows:
        return DeliveryClaim([], 0, None)
    first = rows[0]
    now: datetime = first["now"]
    claimed = rows_as(list(first.keys()), rows, ClaimedDelivery)
    hosts = {delivery.host for delivery in claimed}
    tripped: dict[str, datetime | None] = {
        host: until
        for host, until in zip(first["hosts"] or (), first["untils"] or (), strict=True)
        if host in hosts
    }
    if not tripped:
        return DeliveryClaim(claimed, 0, None)

    probes: set[str] = set()
    half_open = [host for host, until in tripped.items() if until is None or until <= now]
    if half_open:
        for probe in await driver.fetch(_TAKE_PROBES, half_open, probe_s):
            probes.add(probe["host"])
            tripped[probe["host"]] = probe["paused_until"]
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
    return DeliveryClaim(sendable, len(deferred_ids), min(deferred_until) if deferred_until else None)


def _outcome_column(name: str) -> str:
    """The SQL type of an AttemptOutcome field: its delivery_attempts column, else its deliveries one."""
    column = _ATTEMPTS.c.get(name)
    if column is None:
        column = _DELIVERIES.c.next_attempt_at if name == "lease" else _DELIVERIES.c[name]
    return sql_type(column)


_OUTCOME_FIELDS = AttemptOutcome._fields
_ATTEMPT_LOG = ", ".join(name for name in _OUTCOME_FIELDS if name in _ATTEMPTS.c)
_UNNEST = ", ".join(f"${n}::{_outcome_column(name)}[]" for n, name in enumerate(_OUTCOME_FIELDS, 1))

# One statement settles a batch: each delivery's new state, its attempt log row, and a reset of the hosts
# that answered (their failure streak is over).
_SETTLE = f"""
    WITH v AS (
        SELECT * FROM unnest({_UNNEST}) AS v({", ".join(_OUTCOME_FIELDS)})
    ), settled AS (
        UPDATE deliveries AS d
        SET status = v.status,
            attempts = v.attempt,
            next_attempt_at = v.next_attempt_at,
            last_status_code = v.status_code,
            last_error = v.last_error,
            delivered_at = COALESCE(v.delivered_at, d.delivered_at)
        FROM v
        WHERE d.id = v.delivery_id AND d.next_attempt_at = v.lease
    ), recovered AS (
        DELETE FROM hook_hosts WHERE host = ANY(${len(_OUTCOME_FIELDS) + 1}::text[])
    )
    INSERT INTO delivery_attempts ({_ATTEMPT_LOG})
    SELECT {_ATTEMPT_LOG} FROM v
"""  # noqa: S608

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


async def record_attempts(
    driver: Driver,
    outcomes: Sequence[tuple[str, bool, AttemptOutcome]],
    *,
    breaker_failures: int,
    breaker_pause_s: float,
) -> list[tuple[str, datetime]]:
    """Write a batch of attempts, each as (host, whether it says the host failed, outcome), in one
    statement (two if a host failed); returns the hosts it paused.

    Outcomes must be in completion order: a host's failures count from its last success in the batch.
    A row whose lease was lost (expired and claimed again elsewhere) keeps the other process's state;
    its attempt is still logged, since it happened.
    """
    if not outcomes:
        return []
    recovered: set[str] = set()
    failures: dict[str, int] = {}
    for host, host_failed, outcome in outcomes:
        if host_failed:
            failures[host] = failures.get(host, 0) + 1
        elif outcome.error_class is None:
            recovered.add(host)
            failures.pop(host, None)
    columns = [list(column) for column in zip(*(outcome for _, _, outcome in outcomes), strict=True)]
    await driver.execute(_SETTLE, *columns, sorted(recovered))
    if not failures:
        return []
    hosts = sorted(failures)
    paused = await driver.fetch(
        _HOSTS_FAILED, hosts, [failures[host] for host in hosts], breaker_failures, breaker_pause_s
    )
    return [(row["host"], row["paused_until"]) for row in paused if row["paused_until"] is not None]


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
