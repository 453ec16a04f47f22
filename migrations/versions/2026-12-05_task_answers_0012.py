"""the relay's last answer in a table of its own: the claim's update rewrites a narrow task row

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 10:00:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "task_answers",
        sa.Column("task_pk", sa.BigInteger(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_pk"], ["tasks.id"], name=op.f("fk_task_answers_task_pk_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("task_pk", name=op.f("pk_task_answers")),
    )
    # Answers recorded before 0009 are only in the jsonb column: both move, as text.
    op.execute(
        "INSERT INTO task_answers (task_pk, answer) "
        "SELECT id, coalesce(last_answer, last_payload::text) FROM tasks "
        "WHERE last_answer IS NOT NULL OR last_payload IS NOT NULL"
    )
    # Dropping a column rewrites nothing: a row sheds the old answer at its next update (a poll's).
    op.drop_column("tasks", "last_answer")
    op.drop_column("tasks", "last_payload")


def downgrade() -> None:
    """Downgrade schema."""
    op.add_column("tasks", sa.Column("last_payload", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column("tasks", sa.Column("last_answer", sa.Text(), nullable=True))
    op.execute("UPDATE tasks SET last_answer = a.answer FROM task_answers AS a WHERE a.task_pk = tasks.id")
    op.drop_table("task_answers")
