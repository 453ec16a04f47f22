"""API clients and named relays: a task's identity is (client, task_id); each task names its relay

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:00:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = "NOT (status IN ('complete', 'failed', 'timed_out', 'cancelled'))"


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "clients",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("token_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("webhook_secret", sa.Text(), nullable=False),
        sa.Column("previous_webhook_secret", sa.Text(), nullable=True),
        sa.Column("previous_secret_until", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("relay", sa.Text(), nullable=False),
        sa.Column("rate", sa.Float(), nullable=True),
        sa.Column("relay_hooks", sa.Text(), nullable=True),
        sa.Column("bucket_tokens", sa.Float(), nullable=True),
        sa.Column("bucket_at", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("created_at", sa.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("revoked_at", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.CheckConstraint(
            "relay_hooks IS NULL OR relay_hooks IN ('adopt', 'ignore')", name=op.f("ck_clients_relay_hooks")
        ),
        sa.CheckConstraint("rate > 0", name=op.f("ck_clients_rate")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clients")),
        sa.UniqueConstraint("name", name=op.f("uq_clients_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_clients_token_sha256")),
    )
    # Existing tasks are the admin's (no client) on the default relay. Nullable or with a constant
    # default: adding these rewrites no row.
    op.add_column("tasks", sa.Column("client_id", sa.BigInteger(), nullable=True))
    op.add_column("tasks", sa.Column("relay", sa.Text(), server_default="default", nullable=False))
    op.add_column("tasks", sa.Column("shared", sa.Boolean(), server_default=sa.text("false"), nullable=False))
    op.create_foreign_key(op.f("fk_tasks_client_id_clients"), "tasks", "clients", ["client_id"], ["id"])
    op.drop_constraint(op.f("uq_tasks_task_id"), "tasks", type_="unique")
    op.create_unique_constraint(
        op.f("uq_tasks_task_id_client_id"),
        "tasks",
        ["task_id", "client_id"],
        postgresql_nulls_not_distinct=True,
    )
    op.create_index(op.f("ix_tasks_client_id_id"), "tasks", ["client_id", "id"])
    op.drop_index("ix_tasks_live", table_name="tasks")
    op.create_index("ix_tasks_live", "tasks", ["relay", "id"], postgresql_where=sa.text(_LIVE))


def downgrade() -> None:
    """Downgrade schema. Refused while two clients share a task id: the old schema has room for one."""
    op.drop_index("ix_tasks_live", table_name="tasks")
    op.create_index("ix_tasks_live", "tasks", ["id"], postgresql_where=sa.text(_LIVE))
    op.drop_index(op.f("ix_tasks_client_id_id"), table_name="tasks")
    op.drop_constraint(op.f("uq_tasks_task_id_client_id"), "tasks", type_="unique")
    op.create_unique_constraint(op.f("uq_tasks_task_id"), "tasks", ["task_id"])
    op.drop_constraint(op.f("fk_tasks_client_id_clients"), "tasks", type_="foreignkey")
    op.drop_column("tasks", "shared")
    op.drop_column("tasks", "relay")
    op.drop_column("tasks", "client_id")
    op.drop_table("clients")
