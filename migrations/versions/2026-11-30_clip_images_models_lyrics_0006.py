"""every clip's large image and model name; a lyrics task's words

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 00:30:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # Nullable, no default: adding them rewrites nothing. Clips already stored get them on their next change.
    op.add_column("clips", sa.Column("image_large_url", sa.Text(), nullable=True))
    op.add_column("clips", sa.Column("model_name", sa.Text(), nullable=True))
    op.add_column("tasks", sa.Column("lyrics", postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("tasks", "lyrics")
    op.drop_column("clips", "model_name")
    op.drop_column("clips", "image_large_url")
