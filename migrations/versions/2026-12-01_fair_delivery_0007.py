"""fair delivery: each delivery's lane (client key, host key scheme://host:port), claims taken by lane

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 12:00:00.000000+00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The dispatcher's host key: lower-cased scheme and host, explicit port; a URL it cannot read is its own
# key. Hooks were checked as absolute http(s) URLs when registered or adopted.
_HOOK_ORIGIN = r"""
CREATE FUNCTION hook_origin(url text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT coalesce(
        (SELECT lower(m[1]) || '://' || lower(m[2]) || ':'
                || coalesce(nullif(ltrim(m[3], '0'), ''),
                            CASE lower(m[1]) WHEN 'https' THEN '443' ELSE '80' END)
         FROM regexp_match(url, '^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^/?#@]*@)?(\[[^]/?#]*\]|[^:/?#]*)(?::([0-9]*))?') AS m),
        url)
$$
"""


def upgrade() -> None:
    """Upgrade schema."""
    op.execute(_HOOK_ORIGIN)
    op.add_column(
        "deliveries",
        sa.Column("host", sa.Text(), sa.Computed("hook_origin(url)", persisted=True), nullable=False),
    )
    op.add_column("deliveries", sa.Column("client_key", sa.BigInteger(), server_default="0", nullable=False))
    op.execute(
        "UPDATE deliveries AS d SET client_key = t.client_id FROM tasks AS t"
        " WHERE t.id = d.task_pk AND t.client_id IS NOT NULL"
    )
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.create_index(
        "ix_deliveries_lane_due",
        "deliveries",
        ["client_key", "host", "next_attempt_at"],
        postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
    )
    # The breaker's streaks were counted by host name alone; they are counted by host key from now on.
    op.execute("DELETE FROM hook_hosts")


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("DELETE FROM hook_hosts")
    op.drop_index("ix_deliveries_lane_due", table_name="deliveries")
    op.create_index(
        "ix_deliveries_due",
        "deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
    )
    op.drop_column("deliveries", "client_key")
    op.drop_column("deliveries", "host")
    op.execute("DROP FUNCTION hook_origin(text)")
