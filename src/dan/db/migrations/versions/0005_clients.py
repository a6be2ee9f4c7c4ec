"""Clients: webhooks on finished tasks, A1111 clients' options per key, images per task, and
cancellation as a status of its own.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

CANCELLED, FAILURE = 4, 3
CANCELLED_MESSAGE = "cancelled by the user"


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("images", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("webhook_secret", sa.String(64)))
    op.create_table(
        "webhooks",
        sa.Column("task_id", sa.String(36), primary_key=True),
        sa.Column("account", sa.String(128), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("due_at", sa.Float()),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float()),
    )
    op.create_index(
        "ix_webhooks_due",
        "webhooks",
        ["due_at"],
        postgresql_where=sa.text("due_at IS NOT NULL"),
        sqlite_where=sa.text("due_at IS NOT NULL"),
    )
    op.create_table(
        "client_options",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("checkpoint", sa.String(64)),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    tasks = sa.table("tasks", sa.column("status"), sa.column("error"))
    op.execute(
        tasks.update()
        .where(tasks.c.status == FAILURE, tasks.c.error == CANCELLED_MESSAGE)
        .values(status=CANCELLED)
    )


def downgrade() -> None:
    tasks = sa.table("tasks", sa.column("status"))
    op.execute(tasks.update().where(tasks.c.status == CANCELLED).values(status=FAILURE))
    op.drop_table("client_options")
    op.drop_index("ix_webhooks_due", "webhooks")
    op.drop_table("webhooks")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("webhook_secret")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("images")
