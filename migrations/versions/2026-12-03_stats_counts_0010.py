"""reads at a million tasks: /stats counts kept by triggers, covering indexes for its windows, a
client's list by status

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 10:00:00.000000+00:00

"""

# ruff: noqa: S608  (SQL built from the table and column names below, no input)

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each writing backend adds to rows of its own (shard = its pid): concurrent transactions never wait on
# one another's counter row, nor deadlock over two. stats.fold_counts folds the rows of backends gone.
_COUNTED = {
    # table: (counts table, its key columns, their values as SQL over a row of the table ({r}: the row))
    "tasks": ("task_counts", "client_key, status, kind", "coalesce({r}client_id, 0), {r}status, {r}kind"),
    # Deliveries by client only, on insert and delete: a delivery's status changes on every claim and
    # settle of the dispatcher, too hot a path for a trigger; /stats counts the few not delivered from
    # ix_deliveries_unsettled and the delivered as the rest (docs/design.md, "Search and stats").
    "deliveries": ("delivery_counts", "client_key", "{r}client_key"),
}


def _triggers(table: str) -> list[str]:
    counts, names, values = _COUNTED[table]
    key, old_key, new_key = (values.format(r=row) for row in ("", "o.", "w."))
    upsert = f"ON CONFLICT ({names}, shard) DO UPDATE SET n = c.n + excluded.n"
    moved = f"FROM old_rows AS o JOIN new_rows AS w USING (id) WHERE ({old_key}) IS DISTINCT FROM ({new_key})"
    statements = [
        f"""
        CREATE FUNCTION {counts}_added() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {counts} AS c ({names}, shard, n)
            SELECT {key}, pg_backend_pid(), count(*) FROM added GROUP BY {key}
            {upsert};
            RETURN NULL;
        END $$""",
        f"""
        CREATE FUNCTION {counts}_removed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {counts} AS c ({names}, shard, n)
            SELECT {key}, pg_backend_pid(), -count(*) FROM removed GROUP BY {key}
            {upsert};
            RETURN NULL;
        END $$""",
        f"""
        CREATE FUNCTION {counts}_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM {counts};
            RETURN NULL;
        END $$""",
        f"""CREATE TRIGGER {counts}_added AFTER INSERT ON {table} REFERENCING NEW TABLE AS added
            FOR EACH STATEMENT EXECUTE FUNCTION {counts}_added()""",
        f"""CREATE TRIGGER {counts}_removed AFTER DELETE ON {table} REFERENCING OLD TABLE AS removed
            FOR EACH STATEMENT EXECUTE FUNCTION {counts}_removed()""",
        f"""CREATE TRIGGER {counts}_truncated AFTER TRUNCATE ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION {counts}_truncated()""",
    ]
    if table != "tasks":
        return statements
    # Per statement, not per row: a row trigger updates the same counter row once per changed task in
    # one transaction. This one also runs for the claim's updates (transition tables cannot name
    # columns); what each costs: docs/design.md, "Search and stats".
    return [
        *statements,
        f"""
        CREATE FUNCTION {counts}_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {counts} AS c ({names}, shard, n)
            SELECT {names}, pg_backend_pid(), sum(n) FROM (
                SELECT {old_key}, -1 {moved} UNION ALL SELECT {new_key}, 1 {moved}
            ) AS moves ({names}, n)
            GROUP BY {names} HAVING sum(n) <> 0
            {upsert};
            RETURN NULL;
        END $$""",
        f"""CREATE TRIGGER {counts}_changed AFTER UPDATE ON {table}
            REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION {counts}_changed()""",
    ]


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "task_counts",
        sa.Column("client_key", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("client_key", "status", "kind", "shard", name=op.f("pk_task_counts")),
    )
    op.create_table(
        "delivery_counts",
        sa.Column("client_key", sa.BigInteger(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("client_key", "shard", name=op.f("pk_delivery_counts")),
    )
    # Triggers first, then the rows so far: CREATE TRIGGER holds off writers until this commits, so no
    # write falls between the two.
    for table, (counts, names, values) in _COUNTED.items():
        for statement in _triggers(table):
            op.execute(statement)
        key = values.format(r="")
        op.execute(
            f"INSERT INTO {counts} ({names}, shard, n) SELECT {key}, 0, count(*) FROM {table} GROUP BY {key}"
        )
    # Completion times and the last hour's finishes read from the index alone. Its columns are written
    # once, when the task becomes terminal (or never): the claim's update stays HOT.
    op.drop_index("ix_tasks_finished_at", table_name="tasks")
    op.create_index(
        "ix_tasks_finished_at",
        "tasks",
        ["finished_at"],
        postgresql_include=["status", "created_at", "client_id"],
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )
    op.create_index("ix_tasks_client_status_id", "tasks", ["client_id", "status", "id"])
    op.create_index(
        "ix_deliveries_unsettled",
        "deliveries",
        ["client_key", "status", "created_at"],
        postgresql_where=sa.text("status <> 'delivered'"),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_deliveries_unsettled", table_name="deliveries")
    op.drop_index("ix_tasks_client_status_id", table_name="tasks")
    op.drop_index("ix_tasks_finished_at", table_name="tasks")
    op.create_index(
        "ix_tasks_finished_at", "tasks", ["finished_at"], postgresql_where=sa.text("finished_at IS NOT NULL")
    )
    for table, (counts, *_) in _COUNTED.items():
        for event in ("added", "removed", "changed", "truncated"):
            op.execute(f"DROP TRIGGER IF EXISTS {counts}_{event} ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {counts}_{event}()")
    op.drop_table("delivery_counts")
    op.drop_table("task_counts")
