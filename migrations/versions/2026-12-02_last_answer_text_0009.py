"""the relay's last answer kept as text (the relay front serves it without jsonb's output cost)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 10:00:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # A new nullable column rewrites nothing: a table of a million tasks stays available. Answers
    # recorded before stay in last_payload, which the reads fall back to.
    op.add_column("tasks", sa.Column("last_answer", sa.Text(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    # Keep what was recorded since (stored answers hold no NUL escape: tracking.repository.relay_json).
    op.execute("UPDATE tasks SET last_payload = last_answer::jsonb WHERE last_answer IS NOT NULL")
    op.drop_column("tasks", "last_answer")
