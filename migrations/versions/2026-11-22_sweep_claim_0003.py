"""claims sweep live tasks by id: no index covers the poll columns, so a claim's update is HOT

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 06:20:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = "NOT (status IN ('complete', 'failed', 'timed_out', 'cancelled'))"


def upgrade() -> None:
    """Upgrade schema."""
    # Every index that names next_poll_at (as a key or in its predicate) made each claim a non-HOT
    # update: a new entry in every index of the table for every poll.
    op.drop_index("ix_tasks_due", table_name="tasks")
    op.create_index("ix_tasks_live", "tasks", ["id"], postgresql_where=sa.text(_LIVE))
    for name, column in (("ix_tasks_status_id", "status"), ("ix_tasks_kind_id", "kind")):
        op.drop_index(name, table_name="tasks")
        op.create_index(name, "tasks", [column, "id"])


def downgrade() -> None:
    """Downgrade schema."""
    for name, column in (("ix_tasks_status_id", "status"), ("ix_tasks_kind_id", "kind")):
        op.drop_index(name, table_name="tasks")
        op.create_index(name, "tasks", [column, "id"], postgresql_where=sa.text("next_poll_at IS NULL"))
    op.drop_index("ix_tasks_live", table_name="tasks")
    op.create_index(
        "ix_tasks_due", "tasks", ["next_poll_at"], postgresql_where=sa.text("next_poll_at IS NOT NULL")
    )
