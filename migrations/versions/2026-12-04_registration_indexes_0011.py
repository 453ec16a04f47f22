"""registration: the task id's unique index serves prefix search too; metadata's index only where there is
metadata

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 10:00:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # The index first: the unique rule holds throughout (this runs in one transaction).
    op.create_index(
        "uq_tasks_task_id_client_id_new",
        "tasks",
        ["task_id", "client_id"],
        unique=True,
        postgresql_nulls_not_distinct=True,
        postgresql_ops={"task_id": "text_pattern_ops"},
    )
    op.drop_constraint("uq_tasks_task_id_client_id", "tasks", type_="unique")
    op.execute("ALTER INDEX uq_tasks_task_id_client_id_new RENAME TO uq_tasks_task_id_client_id")
    op.drop_index("ix_tasks_task_id_pattern", table_name="tasks")
    op.drop_index("ix_tasks_metadata", table_name="tasks")
    op.create_index(
        "ix_tasks_metadata",
        "tasks",
        ["metadata"],
        postgresql_using="gin",
        postgresql_ops={"metadata": "jsonb_path_ops"},
        postgresql_where=sa.text("metadata IS NOT NULL"),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_tasks_metadata", table_name="tasks")
    op.create_index(
        "ix_tasks_metadata",
        "tasks",
        ["metadata"],
        postgresql_using="gin",
        postgresql_ops={"metadata": "jsonb_path_ops"},
    )
    op.create_index(
        "ix_tasks_task_id_pattern", "tasks", ["task_id"], postgresql_ops={"task_id": "text_pattern_ops"}
    )
    op.drop_index("uq_tasks_task_id_client_id", table_name="tasks")
    op.create_unique_constraint(
        "uq_tasks_task_id_client_id", "tasks", ["task_id", "client_id"], postgresql_nulls_not_distinct=True
    )
