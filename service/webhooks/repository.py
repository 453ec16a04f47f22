"""The dispatcher's database work: claim due deliveries under a lease, settle attempts, release claims.

The claim and the settle run on a plain asyncpg connection, not a SQLAlchemy session (docs/design.md,
"The dispatcher's driver connection"); each statement is atomic on its own, and the lease protects
what spans several. Rows are declared once as NamedTuples named by their columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import rows_as, sql_type
from service.models import Delivery, DeliveryAttempt
from service.webhooks.outbox import notify_dispatchers

_DELIVERIES: Table = Delivery.__table__  # type: ignore[assignment]
_ATTEMPTS: Table = DeliveryAttempt.__table__  # type: ignore[assignment]


class Driver(Protocol):
    """The asyncpg connection methods used here (asyncpg ships no type hints)."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...

    async def execute(self, query: str, *args: Any) -> str: ...


# A lane of deliveries: (client key, host key), deliveries.client_key and deliveries.host. Shares and
# fair turns are per lane, so one client's backlog to a host never takes another client's share of it.
Lane = tuple[int, str]


class ClaimedDelivery(NamedTuple):
    """A delivery leased to this process, as the claim returns it."""

    id: int
    task_id: str
    webhook_id: str
    url: str
    host: str  # the host key deliveries.host: scheme://host:port
    body: bytes
    attempts: int  # attempts made before this one, in the current round
    # The next_attempt_at our claim wrote: writes back only land while the row still carries it.
    lease: datetime
    client_key: int = 0  # deliveries.client_key: the task's client id, 0 for the admin's tasks
    # The task's client's secrets (None: the admin's task, signed with SUNOTRACK_WEBHOOK_SECRET); the
    # previous one only while its grace period after a rotation lasts.
    webhook_secret: str | None = None
    previous_webhook_secret: str | None = None

    @property
    def lane(self) -> Lane:
        return (self.client_key, self.host)


@dataclass(frozen=True, slots=True)
class Quotas:
    """How many deliveries a claim may take: per lane `lane_default`, or a host's share from `by_host`
    (a slow host's), or exactly `by_lane` (lanes with sends in flight); per client `client_default`,
    or `by_client` (clients with sends in flight).

    When the claim finds one lane alone with due rows, that lane may take more (work-conserving): up
    to `alone_by_lane` (its lane has sends in flight) or `alone_by_host`; a host in neither gets no
    more than its share."""

    lane_default: int
    client_default: int
    by_host: Mapping[str, int] = field(default_factory=dict)
    by_lane: Mapping[Lane, int] = field(default_factory=dict)
    by_client: Mapping[int, int] = field(default_factory=dict)
    alone_by_host: Mapping[str, int] = field(default_factory=dict)
    alone_by_lane: Mapping[Lane, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Blocked:
    """What a claim left due rows of because it had no free slot: lanes at their quota, clients at
    theirs. Worth claiming again when one of their sends finishes; everything else due was taken."""

    lanes: frozenset[Lane] = frozenset()
    clients: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class DeliveryClaim:
    deliveries: list[ClaimedDelivery]
    # Rows put back because their host is paused, and when the earliest of them becomes due again.
    deferred: int
    wake_at: datetime | None
    blocked: Blocked = field(default_factory=Blocked)
    # How many lanes had due rows, and the lane when it was the only one (it got its quota when alone).
    due_lanes: int = 0
    alone: Lane | None = None


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


# The fair claim, one statement (docs/design.md, "Fair delivery claims"):
# - lanes: every (client, host) with rows waiting, and its earliest next_attempt_at, by a loose index
#   scan of ix_deliveries_lane_due (one index probe per lane, however deep a lane's backlog);
# - each lane due now gets a quota: its free slots in this process, capped by the claim's size (or,
#   when it is the only lane due, its quota when alone: no other lane waits for the slots); a host
#   the circuit breaker tripped gets 0, or 1 (in one of its lanes) for the one process that wins its
#   half-open probe (the row lock on hook_hosts serialises them);
# - each lane's oldest due rows, up to its quota, are locked (FOR UPDATE SKIP LOCKED) and numbered;
#   then numbered again per client by that turn, and taken in client turns (every client's first,
#   then every client's second, ...), each client up to its own quota, up to the claim's size;
# - a paused host's due rows are put back until its pause ends, so they burn no attempt.
# Without SUNOTRACK_WEBHOOK_SECRET ($14 false) the admin's lane (client key 0) is left alone.
# Rows are updated by their addresses (a TID scan), which keeps the generic plan good on any table.
_CLAIM = """
    WITH RECURSIVE lanes AS (
        (SELECT client_key, host, next_attempt_at AS oldest FROM deliveries
         WHERE next_attempt_at IS NOT NULL ORDER BY client_key, host, next_attempt_at LIMIT 1)
        UNION ALL
        SELECT later.* FROM lanes, LATERAL (
            SELECT client_key, host, next_attempt_at AS oldest FROM deliveries
            WHERE next_attempt_at IS NOT NULL AND (client_key, host) > (lanes.client_key, lanes.host)
            ORDER BY client_key, host, next_attempt_at LIMIT 1
        ) AS later
    ), due AS (
        SELECT l.client_key, l.host, h.paused_until,
            coalesce(h.consecutive_failures >= $3, false) AS tripped,
            row_number() OVER (PARTITION BY l.host ORDER BY l.oldest) AS nth_of_host,
            least(CASE WHEN count(*) OVER () = 1
                       THEN greatest(coalesce(al.quota, ah.quota, 0), coalesce(lq.quota, hq.quota, $5))
                       ELSE coalesce(lq.quota, hq.quota, $5) END, $1) AS quota
        FROM lanes AS l
        LEFT JOIN hook_hosts AS h ON h.host = l.host
        LEFT JOIN unnest($6::text[], $7::integer[]) AS hq(host, quota) ON hq.host = l.host
        LEFT JOIN unnest($8::bigint[], $9::text[], $10::integer[]) AS lq(client_key, host, quota)
            ON lq.client_key = l.client_key AND lq.host = l.host
        LEFT JOIN unnest($15::text[], $16::integer[]) AS ah(host, quota) ON ah.host = l.host
        LEFT JOIN unnest($17::bigint[], $18::text[], $19::integer[]) AS al(client_key, host, quota)
            ON al.client_key = l.client_key AND al.host = l.host
        WHERE l.oldest <= now() AND ($14 OR l.client_key <> 0)
    ), probes AS (
        UPDATE hook_hosts AS h
        SET paused_until = now() + make_interval(secs => $4), updated_at = now()
        FROM due
        WHERE h.host = due.host AND due.tripped AND due.quota > 0 AND due.nth_of_host = 1
            AND (h.paused_until IS NULL OR h.paused_until <= now())
        RETURNING h.host
    ), turns AS (
        SELECT due.client_key, due.host, due.tripped,
            CASE WHEN NOT due.tripped THEN due.quota
                 WHEN p.host IS NOT NULL AND due.nth_of_host = 1 THEN 1 ELSE 0 END AS quota,
            -- Lost the probe race to another process: its pause (the probe's lease) is moments old.
            CASE WHEN due.paused_until > now() THEN due.paused_until
                 ELSE now() + make_interval(secs => $4) END AS until
        FROM due LEFT JOIN probes AS p ON p.host = due.host
    ), taken AS (
        SELECT o.client_key, t.* FROM turns AS o CROSS JOIN LATERAL (
            SELECT locked.*, row_number() OVER (ORDER BY locked.next_attempt_at) AS turn FROM (
                SELECT ctid, host, next_attempt_at FROM deliveries
                WHERE client_key = o.client_key AND host = o.host AND next_attempt_at <= now()
                ORDER BY next_attempt_at LIMIT o.quota
                FOR UPDATE SKIP LOCKED
            ) AS locked
        ) AS t
        WHERE o.quota > 0
    ), picked AS (
        SELECT ctid, client_key, host FROM (
            SELECT taken.*,
                row_number() OVER (PARTITION BY client_key ORDER BY turn, next_attempt_at) AS client_turn
            FROM taken
        ) AS ranked
        LEFT JOIN unnest($11::bigint[], $12::integer[]) AS cq(client_key, quota) USING (client_key)
        WHERE client_turn <= coalesce(cq.quota, $13)
        ORDER BY client_turn, next_attempt_at
        LIMIT $1
    ), claimed AS (
        UPDATE deliveries AS d SET next_attempt_at = now() + make_interval(secs => $2)
        WHERE d.ctid = ANY(ARRAY(SELECT ctid FROM picked))
        RETURNING d.id, d.task_pk, d.webhook_id, d.url, d.host, d.client_key, d.body, d.attempts,
                  d.next_attempt_at AS lease
    ), held AS (
        UPDATE deliveries AS d SET next_attempt_at = o.until
        FROM turns AS o
        WHERE d.ctid = ANY(ARRAY(
                SELECT x.ctid FROM turns AS p CROSS JOIN LATERAL (
                    SELECT ctid FROM deliveries
                    WHERE client_key = p.client_key AND host = p.host AND next_attempt_at <= now()
                    ORDER BY next_attempt_at LIMIT $1
                    FOR UPDATE SKIP LOCKED
                ) AS x
                WHERE p.tripped AND p.quota = 0
            ))
            AND o.client_key = d.client_key AND o.host = d.host
        RETURNING d.next_attempt_at
    ), blocked AS (
        SELECT o.client_key, o.host FROM turns AS o
        WHERE NOT o.tripped AND o.quota <= (
            SELECT count(*) FROM picked WHERE picked.client_key = o.client_key AND picked.host = o.host
        )
    ), summary AS (
        SELECT
            (SELECT array_agg(client_key ORDER BY client_key, host) FROM blocked) AS blocked_keys,
            (SELECT array_agg(host ORDER BY client_key, host) FROM blocked) AS blocked_hosts,
            (SELECT array_agg(client_key) FROM (
                SELECT DISTINCT client_key FROM taken
                LEFT JOIN unnest($11::bigint[], $12::integer[]) AS cq(client_key, quota) USING (client_key)
                WHERE coalesce(cq.quota, $13)
                    <= (SELECT count(*) FROM picked WHERE picked.client_key = taken.client_key)
            ) AS full_clients) AS blocked_clients,
            (SELECT count(*) FROM held) AS deferred,
            (SELECT min(next_attempt_at) FROM held) AS wake_at,
            (SELECT count(*) FROM due) AS due_lanes,
            (SELECT min(client_key) FROM due HAVING count(*) = 1) AS alone_key,
            (SELECT min(host) FROM due HAVING count(*) = 1) AS alone_host
    )
    -- One row even when nothing was claimed: it carries the summary.
    SELECT c.*, t.task_id, cl.webhook_secret,
           CASE WHEN cl.previous_secret_until > now() THEN cl.previous_webhook_secret END
               AS previous_webhook_secret,
           s.*
    FROM summary AS s LEFT JOIN (
        claimed AS c JOIN tasks AS t ON t.id = c.task_pk LEFT JOIN clients AS cl ON cl.id = t.client_id
    ) ON true
"""

# The claim's connection plans it once: asyncpg prepares it, and Postgres would otherwise plan it anew
# for each call (its custom plans look cheaper than the generic one), 1-2 ms a claim; the generic plan
# is as good (docs/design.md, "Fair delivery claims").
CLAIM_SESSION = {"plan_cache_mode": "force_generic_plan"}


async def claim_due_deliveries(
    driver: Driver,
    *,
    limit: int,
    lease_s: float,
    breaker_failures: int,
    probe_s: float,
    quotas: Quotas | None = None,
    signs_admin: bool = True,
) -> DeliveryClaim:
    """Lease up to `limit` due deliveries to this process, taken across clients and their hosts in
    turns, each lane and client up to its quota (no quotas: up to `limit`); puts back the due rows of
    hosts the circuit breaker paused. Only clients' deliveries unless `signs_admin`
    (SUNOTRACK_WEBHOOK_SECRET is set).

    A host tripped by the circuit breaker gets one probe delivery once its pause is over; its other
    deliveries wait for the probe's outcome instead of each burning an attempt on a host that is down.
    """
    quotas = quotas or Quotas(limit, limit)
    hosts, lanes, clients = list(quotas.by_host), list(quotas.by_lane), list(quotas.by_client)
    alone_hosts, alone_lanes = list(quotas.alone_by_host), list(quotas.alone_by_lane)
    rows = await driver.fetch(
        _CLAIM,
        limit,
        lease_s,
        breaker_failures,
        probe_s,
        quotas.lane_default,
        hosts,
        [quotas.by_host[host] for host in hosts],
        [client for client, _ in lanes],
        [host for _, host in lanes],
        [quotas.by_lane[lane] for lane in lanes],
        clients,
        [quotas.by_client[client] for client in clients],
        quotas.client_default,
        signs_admin,
        alone_hosts,
        [quotas.alone_by_host[host] for host in alone_hosts],
        [client for client, _ in alone_lanes],
        [host for _, host in alone_lanes],
        [quotas.alone_by_lane[lane] for lane in alone_lanes],
    )
    first = rows[0]
    claimed = rows_as(list(first.keys()), rows, ClaimedDelivery) if first["id"] is not None else []
    blocked = Blocked(
        frozenset(zip(first["blocked_keys"] or (), first["blocked_hosts"] or (), strict=True)),
        frozenset(first["blocked_clients"] or ()),
    )
    alone = (first["alone_key"], first["alone_host"]) if first["alone_host"] is not None else None
    return DeliveryClaim(claimed, first["deferred"], first["wake_at"], blocked, first["due_lanes"], alone)


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

# A pause lasts breaker_pause_s plus up to `jitter` of it, drawn per host: hosts tripped together (one
# network outage) do not all come back, and send their backlogs, at the same instant.
_HOSTS_FAILED = """
    INSERT INTO hook_hosts AS h (host, consecutive_failures, paused_until, updated_at)
    SELECT v.host, v.failures,
        CASE WHEN v.failures >= $3 THEN now() + make_interval(secs => $4 * (1 + $5 * random())) END,
        now()
    FROM unnest($1::text[], $2::integer[]) AS v(host, failures)
    ON CONFLICT (host) DO UPDATE SET
        consecutive_failures = h.consecutive_failures + excluded.consecutive_failures,
        paused_until = CASE
            WHEN h.consecutive_failures + excluded.consecutive_failures >= $3
            THEN now() + make_interval(secs => $4 * (1 + $5 * random()))
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
    jitter: float,
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
        _HOSTS_FAILED, hosts, [failures[host] for host in hosts], breaker_failures, breaker_pause_s, jitter
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
