"""People: step previews of running tasks, an account's history, sign-in identities and the
keys they make.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("preview", sa.LargeBinary()))
        batch.create_index("ix_tasks_account_seq", ["account", "seq"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("origin", sa.String(16)))
    op.create_table(
        "identities",
        sa.Column("provider", sa.String(64), primary_key=True),
        sa.Column("subject", sa.String(255), primary_key=True),
        sa.Column("account", sa.String(128), nullable=False, index=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_seen_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("identities")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("origin")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_account_seq")
        batch.drop_column("preview")
