"""Every table of the service (one metadata for Alembic). Models carry no behaviour."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TIMESTAMP

from service.db import Base
from service.vocabulary import (
    DEFAULT_RELAY,
    TERMINAL_STATUSES,
    DeliveryStatus,
    EventSource,
    EventType,
    HookSource,
    NotifyFormat,
    RelayHooks,
    TaskKind,
    TaskStatus,
)

# In declaration order, so the generated SQL is the same from run to run.
_TERMINAL = tuple(status for status in TaskStatus if status in TERMINAL_STATUSES)


def _one_of(column: str, values: Iterable[str], *, nullable: bool = False) -> str:
    allowed = ", ".join(f"'{value}'" for value in values)
    check = f"{column} IN ({allowed})"
    return f"{column} IS NULL OR {check}" if nullable else check


# What the poller's claim and its index (ix_tasks_live) select: the tasks still being polled.
LIVE = f"NOT ({_one_of('status', _TERMINAL)})"

Timestamp = TIMESTAMP(timezone=True)

# A task-level status change (not a clip's, not an anomaly): what webhooks announce and charts count.
TASK_TRANSITION = f"type = '{EventType.TRANSITION.value}' AND clip_id IS NULL"


class Client(Base):
    """An order backend with its own bearer token, webhook secret(s), relay and registration rate."""

    __tablename__ = "clients"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    # The bearer token is shown once and never stored: this is its SHA-256.
    token_sha256: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    webhook_secret: Mapped[str] = mapped_column(Text)
    # The secret before the last rotation signs too, until previous_secret_until.
    previous_webhook_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_until: Mapped[datetime | None] = mapped_column(Timestamp)
    # Where its tasks are polled unless a registration names another relay.
    relay: Mapped[str] = mapped_column(Text)
    # Registrations per second (burst twice that); NULL: SUNOTRACK_CLIENT_RATE.
    rate: Mapped[float | None] = mapped_column(Float)
    # NULL: SUNOTRACK_RELAY_HOOKS.
    relay_hooks: Mapped[str | None] = mapped_column(Text)
    # The registration token bucket (clients.service.take_registrations): tokens left at bucket_at.
    bucket_tokens: Mapped[float | None] = mapped_column(Float)
    bucket_at: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)

    __table_args__ = (
        CheckConstraint(_one_of("relay_hooks", RelayHooks, nullable=True), name="relay_hooks"),
        CheckConstraint("rate > 0", name="rate"),
    )


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    task_id: Mapped[str] = mapped_column(Text)
    # NULL: registered with the admin token. A task's identity is (client_id, task_id).
    client_id: Mapped[int | None] = mapped_column(ForeignKey("clients.id"))
    relay: Mapped[str] = mapped_column(Text, server_default=DEFAULT_RELAY)
    # Another client tracks this relay task too: the claim polls them together (tracking.repository).
    shared: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    kind: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    upstream_status: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[int | None] = mapped_column(SmallInteger)
    fail_reason: Mapped[str | None] = mapped_column(Text)
    notify_hook: Mapped[str | None] = mapped_column(Text)
    # Who gave notify_hook: the registration (`client`, never replaced by the relay's) or a relay
    # answer (`relay`, adopted). NULL while there is no hook.
    notify_hook_source: Mapped[str | None] = mapped_column(Text)
    # The last hook a relay answer named, adopted or refused: each new one is decided once.
    relay_notify_hook: Mapped[str | None] = mapped_column(Text)
    # NULL: the registration chose no format, so it follows the hook's source (webhooks.delivery_format).
    notify_format: Mapped[str | None] = mapped_column(Text)
    client_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)
    # A lyrics task's words once written: {"title", "text"} (upstream.schemas.Lyrics).
    lyrics: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # Highest event seq handed out for this task; bumping it in the same UPDATE allocates seqs without max().
    last_seq: Mapped[int] = mapped_column(Integer, server_default="0")

    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)

    # Poll bookkeeping. next_poll_at is NULL once the task is terminal. A poller holds the row locked (its
    # transaction open) while it asks the relay, so a crashed poller's work comes back by itself.
    next_poll_at: Mapped[datetime | None] = mapped_column(Timestamp)
    poll_interval_s: Mapped[float | None] = mapped_column(Float)
    last_polled_at: Mapped[datetime | None] = mapped_column(Timestamp)
    poll_count: Mapped[int] = mapped_column(Integer, server_default="0")
    consecutive_errors: Mapped[int] = mapped_column(Integer, server_default="0")
    missing_count: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    # A digest of the last relay answer merged into this row (tracking.service.snapshot_digest): a poll
    # answering the same again is known to change nothing without reading the clips back.
    snapshot_digest: Mapped[bytes | None] = mapped_column(LargeBinary)

    __table_args__ = (
        CheckConstraint(_one_of("kind", TaskKind), name="kind"),
        CheckConstraint(_one_of("status", TaskStatus), name="status"),
        CheckConstraint(_one_of("notify_format", NotifyFormat, nullable=True), name="notify_format"),
        CheckConstraint(_one_of("notify_hook_source", HookSource, nullable=True), name="notify_hook_source"),
        # Polling keeps to this: a task is polled exactly while it is live.
        CheckConstraint(
            f"(next_poll_at IS NULL) = ({_one_of('status', _TERMINAL)})", name="polled_while_live"
        ),
        # The poller's claim sweeps the live tasks by id. No index names a column a claim writes, so its
        # update is HOT (docs/design.md, "The poller's claim"). Each relay's claims sweep its own tasks
        # (one poller per relay).
        Index("ix_tasks_live", "relay", "id", postgresql_where=text(LIVE)),
        # One record per client (the admin's: NULL) of a task id; also finds every client's by task id, and
        # serves task_id_prefix as `LIKE 'prefix%'` whatever the database's collation (text_pattern_ops
        # has `=` too): one index where there were two (docs/design.md, "Registration figures").
        Index(
            "uq_tasks_task_id_client_id",
            "task_id",
            "client_id",
            unique=True,
            postgresql_nulls_not_distinct=True,
            postgresql_ops={"task_id": "text_pattern_ops"},
        ),
        # The API's newest-first keyset listing (by id) filtered by status or kind; unfiltered uses the pkey.
        Index("ix_tasks_status_id", "status", "id"),
        Index("ix_tasks_kind_id", "kind", "id"),
        Index("ix_tasks_client_id_id", "client_id", "id"),
        # A client's list by status: with (status, id) alone, a small client's rare status reads thousands
        # of other clients' rows per page (23 ms at a million tasks, bench/bench_reads.py).
        Index("ix_tasks_client_status_id", "client_id", "status", "id"),
        # GET /tasks?metadata.<key>=<value> as `metadata @> '{"key": "value"}'` (docs/design.md, "Search"),
        # which implies metadata IS NOT NULL: a task registered without metadata adds no entry.
        Index(
            "ix_tasks_metadata",
            "metadata",
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
            postgresql_where=text("metadata IS NOT NULL"),
        ),
        # /stats: what finished in the last hour or day, read from the index alone. Written once, when the
        # task becomes terminal.
        Index(
            "ix_tasks_finished_at",
            "finished_at",
            postgresql_include=["status", "created_at", "client_id"],
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
        # Room on each page for a polled row's next versions (docs/design.md, "The poller's claim").
        {"postgresql_with": {"fillfactor": 50}},
    )


class TaskAnswer(Base):
    """The relay's last answer for a task, as it sent it. A table of its own: the claim rewrites the
    task's row on every poll, which the answer made wide (docs/design.md, "Polls at 200,000 tasks: the
    row's width"). Text, which the relay front serves as it is: jsonb's output cost Postgres CPU
    (docs/design.md, "The relay front's fetch")."""

    __tablename__ = "task_answers"

    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    answer: Mapped[str] = mapped_column(Text)


class Clip(Base):
    __tablename__ = "clips"

    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    clip_id: Mapped[str] = mapped_column(Text, primary_key=True)
    position: Mapped[int] = mapped_column(SmallInteger)
    status: Mapped[str | None] = mapped_column(Text)
    upstream_status: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    audio_url: Mapped[str | None] = mapped_column(Text)
    image_url: Mapped[str | None] = mapped_column(Text)
    image_large_url: Mapped[str | None] = mapped_column(Text)
    video_url: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(Text)
    duration: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())

    __table_args__ = (CheckConstraint(_one_of("status", TaskStatus, nullable=True), name="status"),)


class TaskEvent(Base):
    """Append-only history: every transition and anomaly of a task and its clips, numbered per task."""

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    type: Mapped[str] = mapped_column(Text, server_default=EventType.TRANSITION.value)
    from_status: Mapped[str | None] = mapped_column(Text)
    to_status: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    clip_id: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # Position in the global feed (GET /events), handed out after commit, in the order events become
    # visible (service.feed.sequencer); NULL until then.
    feed_id: Mapped[int | None] = mapped_column(BigInteger)
    # The task's client, copied when the event is numbered: a client's feed reads its own index range.
    client_id: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        UniqueConstraint("task_pk", "seq"),
        Index("ix_task_events_feed_id", "feed_id", unique=True, postgresql_where=text("feed_id IS NOT NULL")),
        Index(
            "ix_task_events_client_feed", "client_id", "feed_id", postgresql_where=text("feed_id IS NOT NULL")
        ),
        # What the sequencer has yet to number: small, as rows leave it once numbered.
        Index("ix_task_events_unsequenced", "id", postgresql_where=text("feed_id IS NULL")),
        # /stats/series: task-level transitions per minute.
        Index("ix_task_events_transitions_at", "at", postgresql_where=text(TASK_TRANSITION)),
        CheckConstraint(_one_of("type", EventType), name="type"),
        CheckConstraint(_one_of("source", EventSource), name="source"),
    )


class Delivery(Base):
    """Outbox row: one webhook announcing one task-level transition, written in the event's transaction."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    event_seq: Mapped[int] = mapped_column(Integer)
    webhook_id: Mapped[str] = mapped_column(Text, unique=True)
    url: Mapped[str] = mapped_column(Text)
    # The dispatcher's host key, `scheme://host:port` (SQL function hook_origin, migration 0007): the
    # unit of per-host concurrency, fair claims and the circuit breaker. Derived in the database, so
    # every writer of a delivery gets the same key.
    host: Mapped[str] = mapped_column(Text, Computed("hook_origin(url)", persisted=True))
    # The task's client_id, 0 for the admin's tasks (a task's client never changes): with `host`, the
    # delivery's lane, each with its own share of the dispatcher's slots.
    client_key: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # The exact bytes signed and sent, frozen at transition time so every retry carries the same body.
    body: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(Text, server_default=DeliveryStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # Like tasks.next_poll_at: NULL once settled, pushed one lease ahead while a dispatcher holds it.
    next_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp, server_default=func.now())
    last_status_code: Mapped[int | None] = mapped_column(SmallInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp)

    __table_args__ = (
        UniqueConstraint("task_pk", "event_seq"),
        CheckConstraint(_one_of("status", DeliveryStatus), name="status"),
        # The fair claim's: lanes found by a loose scan of it, then each lane's due rows in order
        # (docs/design.md, "Fair delivery claims").
        Index(
            "ix_deliveries_lane_due",
            "client_key",
            "host",
            "next_attempt_at",
            postgresql_where=text("next_attempt_at IS NOT NULL"),
        ),
        Index("ix_deliveries_status_id", "status", "id"),
        # /stats: a client's deliveries not delivered, by status (delivered: the rest of delivery_counts),
        # and its oldest pending one. Few, and a settled delivery leaves it.
        Index(
            "ix_deliveries_unsettled",
            "client_key",
            "status",
            "created_at",
            postgresql_where=text("status <> 'delivered'"),
        ),
    )


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    duration_ms: Mapped[float | None] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    error_class: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    response_body: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp)

    # /stats: the success rate of the last hour's attempts.
    __table_args__ = (Index("ix_delivery_attempts_at", "at"),)


class HookHost(Base):
    """Circuit breaker state per webhook host key (deliveries.host), shared by every process through
    the database. Only hosts on a failure streak have a row."""

    __tablename__ = "hook_hosts"

    host: Mapped[str] = mapped_column(Text, primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default="0")
    paused_until: Mapped[datetime | None] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class TaskCount(Base):
    """Tasks by client, status and kind for /stats, kept by triggers on tasks (migration 0010): the
    figure is the sum of n over shards. Each writing backend adds to rows of its own (shard: its pid);
    stats.fold_counts folds the rows of backends gone into shard 0."""

    __tablename__ = "task_counts"

    client_key: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # tasks.client_id, 0: the admin's
    status: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class DeliveryCount(Base):
    """Deliveries by client for /stats, kept like TaskCount but on insert and delete only (a delivery's
    status changes with every dispatcher statement: /stats counts the few not delivered instead)."""

    __tablename__ = "delivery_counts"

    client_key: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # deliveries.client_key
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
