"""the global event feed (feed_id, numbered after commit), search and stats indexes

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 13:00:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TASK_TRANSITION = "type = 'transition' AND clip_id IS NULL"


def upgrade() -> None:
    """Upgrade schema."""
    # Nullable, no default: adding it rewrites nothing; the sequencer numbers existing events in batches.
    op.add_column("task_events", sa.Column("feed_id", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_task_events_feed_id",
        "task_events",
        ["feed_id"],
        unique=True,
        postgresql_where=sa.text("feed_id IS NOT NULL"),
    )
    op.add_column("task_events", sa.Column("client_id", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_task_events_client_feed",
        "task_events",
        ["client_id", "feed_id"],
        postgresql_where=sa.text("feed_id IS NOT NULL"),
    )
    op.create_index(
        "ix_task_events_unsequenced", "task_events", ["id"], postgresql_where=sa.text("feed_id IS NULL")
    )
    op.create_index(
        "ix_task_events_transitions_at", "task_events", ["at"], postgresql_where=sa.text(_TASK_TRANSITION)
    )
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
    op.create_index(
        "ix_tasks_finished_at", "tasks", ["finished_at"], postgresql_where=sa.text("finished_at IS NOT NULL")
    )
    op.create_index("ix_delivery_attempts_at", "delivery_attempts", ["at"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_delivery_attempts_at", table_name="delivery_attempts")
    op.drop_index("ix_tasks_finished_at", table_name="tasks")
    op.drop_index("ix_tasks_task_id_pattern", table_name="tasks")
    op.drop_index("ix_tasks_metadata", table_name="tasks")
    op.drop_index("ix_task_events_transitions_at", table_name="task_events")
    op.drop_index("ix_task_events_unsequenced", table_name="task_events")
    op.drop_index("ix_task_events_client_feed", table_name="task_events")
    op.drop_column("task_events", "client_id")
    op.drop_index("ix_task_events_feed_id", table_name="task_events")
    op.drop_column("task_events", "feed_id")
