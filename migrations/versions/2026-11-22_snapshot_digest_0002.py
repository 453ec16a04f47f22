"""snapshot digest; listing indexes over finished tasks only; room for polled rows' versions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 03:20:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TERMINAL = "status IN ('complete', 'failed', 'timed_out', 'cancelled')"


def upgrade() -> None:
    """Upgrade schema."""
    # Nullable, no default: adding it rewrites nothing, and NULL only means the next poll reads the clips.
    op.add_column("tasks", sa.Column("snapshot_digest", sa.LargeBinary(), nullable=True))
    op.create_check_constraint(
        op.f("ck_tasks_polled_while_live"), "tasks", f"(next_poll_at IS NULL) = ({_TERMINAL})"
    )
    for name, column in (("ix_tasks_status_id", "status"), ("ix_tasks_kind_id", "kind")):
        op.drop_index(name, table_name="tasks")
        op.create_index(name, "tasks", [column, "id"], postgresql_where=sa.text("next_poll_at IS NULL"))
    # Applies to pages written from now on; a VACUUM FULL would repack the existing ones.
    op.execute("ALTER TABLE tasks SET (fillfactor = 50)")


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("ALTER TABLE tasks RESET (fillfactor)")
    for name, column in (("ix_tasks_status_id", "status"), ("ix_tasks_kind_id", "kind")):
        op.drop_index(name, table_name="tasks")
        op.create_index(name, "tasks", [column, "id"])
    op.drop_constraint(op.f("ck_tasks_polled_while_live"), "tasks", type_="check")
    op.drop_column("tasks", "snapshot_digest")
