"""A million-task history for the read benchmarks, written with COPY (bench_search.py, bench_reads.py).

Shaped like a month of a busy deployment: tasks spread over 30 days, most finished, 1% live (among
the newest, due now: poll lag), over three kinds and eight clients of unequal size plus the admin;
three events each (registered, started, finished; a live task's last are its clips'), numbered in the
feed; a webhook delivery for the tasks of the clients that set a hook, most delivered, some failed,
dead or pending; an attempt for each delivery of the last two days.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
from sqlalchemy.engine import make_url

from service.vocabulary import TERMINAL_STATUSES

ADMIN_TOKEN = "bench-admin-token-0123456789"
SPAN = timedelta(days=30)
STEP = 100_000
# (status, weight per 1,000). Tasks finish within minutes to hours: the live ones (1% of all) are among
# the newest 2%; older tasks are all finished.
FINISHED = (("complete", 920), ("failed", 45), ("timed_out", 20), ("cancelled", 15))
NEWEST = (
    ("complete", 460), ("failed", 25), ("timed_out", 10), ("cancelled", 5),
    ("in_progress", 250), ("queued", 150), ("submitted", 100),
)  # fmt: skip
KINDS = (("music", 80), ("lyrics", 15), ("stems", 5))
# Client i (1-based) has CLIENT_WEIGHTS[i - 1] per 100 tasks; the rest are the admin's (client_id NULL).
CLIENT_WEIGHTS = (30, 20, 15, 10, 8, 7, 5, 3)
HOOKED_CLIENTS = frozenset({1, 2, 3, 5})
DELIVERY_STATUSES = (("delivered", 970), ("failed", 20), ("dead", 8), ("pending", 2))


# The order id lookup as bare SQL. LIMIT as a parameter, as the API sends it: with a literal one, the
# generic plan Postgres switches to after five executions of a prepared statement scans the primary key.
SEARCH_SQL = "SELECT * FROM tasks WHERE metadata @> $1::jsonb ORDER BY id DESC LIMIT $2"


def order_id(n: int) -> str:
    """Task number n's metadata.order_id."""
    return f"O-{n:07d}"


def client_token(number: int) -> str:
    return f"bench-client-{number}-token-0123456789"


def _draw(table: tuple[tuple[str, int], ...], count: int, rng: random.Random) -> list[str]:
    return rng.choices([name for name, _ in table], [weight for _, weight in table], k=count)


def _clients(n: int) -> int | None:
    slot = n % 100
    for number, weight in enumerate(CLIENT_WEIGHTS, start=1):
        if slot < weight:
            return number
        slot -= weight
    return None


class Plan:
    """Every seeded row is a function of its task's number: the benchmark knows what it will find."""

    def __init__(self, count: int, now: datetime | None = None) -> None:
        self.count = count
        self.now = now or datetime.now(UTC)
        rng = random.Random(11)
        newest = count - count // 50
        self.statuses = _draw(FINISHED, newest, rng) + _draw(NEWEST, count - newest, rng)
        self.kinds = _draw(KINDS, count, rng)

    def created(self, n: int) -> datetime:
        return self.now - SPAN * ((self.count - n) / self.count)

    def task_id(self, n: int) -> str:
        return f"task-{n:07d}"

    def client(self, n: int) -> int | None:
        return _clients(n)


def _tasks(plan: Plan, start: int, stop: int) -> Iterator[tuple[object, ...]]:
    rng = random.Random(start)
    for n in range(start, stop):
        status, created = plan.statuses[n], plan.created(n)
        live = status not in TERMINAL_STATUSES
        finished = None if live else created + timedelta(seconds=rng.uniform(40, 300))
        client = plan.client(n)
        metadata = {"order_id": order_id(n), "shop": f"shop-{n % 20}", "customer": f"c-{n % 50_000}"}
        yield (
            n + 1, plan.task_id(n), client, plan.kinds[n], status, json.dumps(metadata),
            created, finished or created, finished,
            plan.now + timedelta(seconds=rng.uniform(-5, 5)) if live else None,
            f"https://hooks.example/{client}" if client in HOOKED_CLIENTS else None,
            "client" if client in HOOKED_CLIENTS else None, 3,
        )  # fmt: skip


TASK_COLUMNS = [
    "id", "task_id", "client_id", "kind", "status", "metadata",
    "created_at", "updated_at", "finished_at", "next_poll_at",
    "notify_hook", "notify_hook_source", "last_seq",
]  # fmt: skip


def _events(plan: Plan, start: int, stop: int) -> Iterator[tuple[object, ...]]:
    for n in range(start, stop):
        status, created, client = plan.statuses[n], plan.created(n), plan.client(n)
        pk = n + 1
        # (from, to, clip): task-level transitions up to the task's status, then clips' for a live one.
        steps: list[tuple[str | None, str, str | None]] = [(None, "submitted", None)]
        if status in TERMINAL_STATUSES:
            steps += [("submitted", "in_progress", None), ("in_progress", status, None)]
        elif status != "submitted":
            steps += [("submitted", status, None), (None, status, "c1")]
        else:
            steps += [(None, status, "c1"), (None, status, "c2")]
        for seq, (before, after, clip) in enumerate(steps, start=1):
            event_id = n * 3 + seq
            at = created + timedelta(seconds=(seq - 1) * 30)
            source = "register" if seq == 1 else "poll"
            yield (event_id, pk, seq, at, "transition", before, after, source, clip, event_id, client)


EVENT_COLUMNS = [
    "id", "task_pk", "seq", "at", "type", "from_status", "to_status", "source", "clip_id",
    "feed_id", "client_id",
]  # fmt: skip


def _deliveries(plan: Plan, start: int, stop: int) -> Iterator[tuple[object, ...]]:
    rng = random.Random(start + 1)
    for n in range(start, stop):
        client = plan.client(n)
        if client not in HOOKED_CLIENTS or plan.statuses[n] not in TERMINAL_STATUSES:
            continue
        status, created = _draw(DELIVERY_STATUSES, 1, rng)[0], plan.created(n) + timedelta(seconds=60)
        yield (
            n + 1, n + 1, 3, f"wh-{n:07d}", f"https://hooks.example/{client}/", client, b"{}", status,
            1, plan.now if status in {"pending", "failed"} else None,
            None if status == "pending" else 200 if status == "delivered" else 500,
            created, created if status == "delivered" else None,
        )  # fmt: skip


DELIVERY_COLUMNS = [
    "id", "task_pk", "event_seq", "webhook_id", "url", "client_key", "body", "status",
    "attempts", "next_attempt_at", "last_status_code", "created_at", "delivered_at",
]  # fmt: skip


def _attempts(plan: Plan, start: int, stop: int) -> Iterator[tuple[object, ...]]:
    recent = plan.now - timedelta(days=2)
    for row in _deliveries(plan, start, stop):
        delivery_id, status, code, created = row[0], row[7], row[10], row[11]
        if status != "pending" and isinstance(created, datetime) and created > recent:
            yield (delivery_id, 1, created, 12.5, code)


ATTEMPT_COLUMNS = ["delivery_id", "attempt", "at", "duration_ms", "status_code"]


async def _without_indexes(db: asyncpg.Connection, table: str) -> list[str]:
    """Drop the table's plain indexes (not those behind constraints) and return their definitions:
    building each once after the COPY is several times faster than maintaining it row by row."""
    rows = await db.fetch(
        """
        SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition
        FROM pg_index i
        WHERE i.indrelid = $1::regclass
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        """,
        table,
    )
    for row in rows:
        await db.execute(f"DROP INDEX {row['name']}")
    return [row["definition"] for row in rows]


Rows = Callable[[int, int], Iterator[tuple[object, ...]]]


async def _copy(db: asyncpg.Connection, table: str, columns: list[str], rows: Rows, count: int) -> None:
    """COPY rows(start, stop) for 0..count in steps into `table`, its plain indexes built afterwards."""
    definitions = await _without_indexes(db, table)
    for start in range(0, count, STEP):
        records = list(rows(start, min(count, start + STEP)))
        await db.copy_records_to_table(table, records=records, columns=columns)
    for definition in definitions:
        await db.execute(definition)
    # Identity columns given explicit values: the next generated one follows the seeded rows.
    await db.execute(
        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), coalesce(max(id), 0) + 1, false)"
        f" FROM {table}"
    )


async def seed(dsn: str, count: int, *, history: bool = True) -> float:
    """COPY `count` tasks in (and, with `history`, their events, clients, deliveries and attempts)."""
    started = time.perf_counter()
    plan = Plan(count, datetime.now(UTC))
    db = await asyncpg.connect(dsn)
    try:
        await db.execute("SET maintenance_work_mem = '512MB'")
        await db.executemany(
            "INSERT INTO clients (id, name, token_sha256, webhook_secret, relay)"
            " OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, 'bench-secret', 'default')",
            [
                (number, f"client-{number}", hashlib.sha256(client_token(number).encode()).digest())
                for number in range(1, len(CLIENT_WEIGHTS) + 1)
            ],
        )
        tables = [("tasks", TASK_COLUMNS, _tasks)]
        if history:
            tables += [
                ("task_events", EVENT_COLUMNS, _events),
                ("deliveries", DELIVERY_COLUMNS, _deliveries),
                ("delivery_attempts", ATTEMPT_COLUMNS, _attempts),
            ]
        for table, columns, rows in tables:
            await _copy(db, table, columns, functools.partial(rows, plan), count)
        await db.execute(
            "SELECT setval(pg_get_serial_sequence('clients', 'id'), max(id) + 1, false) FROM clients"
        )
        await db.execute("VACUUM ANALYZE")
    finally:
        await db.close()
    return time.perf_counter() - started


def admins_task(rng: random.Random, count: int) -> int:
    """A random task number among the admin's (those its token reads by task id)."""
    while True:
        n = rng.randrange(count)
        if _clients(n) is None:
            return n


async def seeded(dsn: str, count: int) -> bool:
    """Whether a kept database already holds this seed (else it must be empty: seed() fills it)."""
    db = await asyncpg.connect(dsn)
    try:
        found: int = await db.fetchval("SELECT count(*) FROM tasks")
    finally:
        await db.close()
    if found not in (0, count):
        raise SystemExit(f"the kept database holds {found:,} tasks, not {count:,}: use another --keep")
    return found == count


async def ensure_seeded(url: str, count: int, *, history: bool = True) -> str:
    """Seed the database at `url` (SQLAlchemy's form) unless a kept one holds this seed already; its
    asyncpg DSN."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    if await seeded(dsn, count):
        print(f"reusing the {count:,} tasks seeded before", flush=True)
    else:
        print(f"seeding {count:,} tasks{' and their history' if history else ''} with COPY ...", flush=True)
        print(f"  seeded in {await seed(dsn, count, history=history):.1f} s", flush=True)
    return dsn


LIVE_TASK_COLUMNS = [
    "id", "task_id", "kind", "status", "created_at", "updated_at", "next_poll_at", "poll_interval_s",
    "last_polled_at", "poll_count", "last_seq",
]  # fmt: skip
REGISTER_EVENT_COLUMNS = ["id", "task_pk", "seq", "at", "type", "to_status", "source", "feed_id"]


async def seed_live(dsn: str, count: int, *, due_after_s: float, spread_s: float) -> float:
    """COPY `count` live tasks of the default relay, none due for `due_after_s` (their next polls spread
    over the following `spread_s`), each with its registration event numbered in the feed: a backlog
    that is waiting, for the idle tick benchmark (bench_idle.py)."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    rng = random.Random(7)

    def tasks(start: int, stop: int) -> Iterator[tuple[object, ...]]:
        for n in range(start, stop):
            due = now + timedelta(seconds=due_after_s + rng.uniform(0, spread_s))
            yield (n + 1, f"live-{n:07d}", "music", "in_progress", now, now, due, 60.0, now, 20, 1)

    def events(start: int, stop: int) -> Iterator[tuple[object, ...]]:
        for n in range(start, stop):
            yield (n + 1, n + 1, 1, now, "transition", "submitted", "register", n + 1)

    tables: list[tuple[str, list[str], Rows]] = [
        ("tasks", LIVE_TASK_COLUMNS, tasks),
        ("task_events", REGISTER_EVENT_COLUMNS, events),
    ]
    db = await asyncpg.connect(dsn)
    try:
        await db.execute("SET maintenance_work_mem = '512MB'")
        for table, columns, rows in tables:
            await _copy(db, table, columns, rows, count)
        await db.execute("VACUUM ANALYZE")
    finally:
        await db.close()
    return time.perf_counter() - started
