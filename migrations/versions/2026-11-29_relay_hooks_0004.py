"""hooks adopted from the relay: where a task's hook came from, the relay's last one, format by default

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 12:00:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = "NOT (status IN ('complete', 'failed', 'timed_out', 'cancelled'))"


def upgrade() -> None:
    """Upgrade schema."""
    # Nullable, no default: adding them rewrites nothing.
    op.add_column("tasks", sa.Column("notify_hook_source", sa.Text(), nullable=True))
    op.add_column("tasks", sa.Column("relay_notify_hook", sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f("ck_tasks_notify_hook_source"),
        "tasks",
        "notify_hook_source IS NULL OR notify_hook_source IN ('client', 'relay')",
    )
    # Every hook so far came with its registration.
    op.execute("UPDATE tasks SET notify_hook_source = 'client' WHERE notify_hook IS NOT NULL")
    # NULL now means "not chosen". Which stored 'sunotrack' was chosen is unknown; it only matters to a
    # live task that may still adopt a hook, and those (no hook yet) get the default of adopted hooks.
    op.alter_column("tasks", "notify_format", nullable=True, server_default=None)
    op.drop_constraint(op.f("ck_tasks_notify_format"), "tasks", type_="check")
    op.create_check_constraint(
        op.f("ck_tasks_notify_format"),
        "tasks",
        "notify_format IS NULL OR notify_format IN ('sunotrack', 'relay')",
    )
    op.execute(
        f"UPDATE tasks SET notify_format = NULL "  # noqa: S608
        f"WHERE {_LIVE} AND notify_hook IS NULL AND notify_format = 'sunotrack'"
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.execute(
        "UPDATE tasks SET notify_format = CASE WHEN notify_hook_source = 'relay' THEN 'relay' "
        "ELSE 'sunotrack' END WHERE notify_format IS NULL"
    )
    op.drop_constraint(op.f("ck_tasks_notify_format"), "tasks", type_="check")
    op.create_check_constraint(
        op.f("ck_tasks_notify_format"), "tasks", "notify_format IN ('sunotrack', 'relay')"
    )
    op.alter_column("tasks", "notify_format", nullable=False, server_default="sunotrack")
    op.drop_constraint(op.f("ck_tasks_notify_hook_source"), "tasks", type_="check")
    op.drop_column("tasks", "relay_notify_hook")
    op.drop_column("tasks", "notify_hook_source")
