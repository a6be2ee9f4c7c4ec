"""Batching across requests: each task's batch key, what it may share one UNet batch with
(dan.tasks.needs.batch_key).

Tasks queued before this revision have none, so they never batch; nothing else changes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-13
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("batch_key", sa.String(16)))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("batch_key")
