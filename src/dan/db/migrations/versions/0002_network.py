"""The network: accounts, hashed API keys, the honor ledger, worker nodes, shared blobs; task
cost and model.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("cost", sa.Float()))
        batch.add_column(sa.Column("model_sha256", sa.String(64)))
        batch.add_column(sa.Column("requires", sa.JSON()))
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("nickname", sa.String(64), nullable=False, unique=True),
        sa.Column("email", sa.String(256)),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("can_run_nodes", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account", sa.String(128), nullable=False, index=True),
        sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_used_at", sa.Float()),
        sa.Column("revoked_at", sa.Float()),
    )
    op.create_table(
        "honor_grants",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("account", sa.String(128), nullable=False, index=True),
        sa.Column("amount", sa.Float(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("task_id", sa.String(36), unique=True),
        sa.Column("node_id", sa.String(36)),
        sa.Column("granted_by", sa.String(128)),
        sa.Column("note", sa.Text()),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account", sa.String(128), nullable=False, index=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("installed", sa.JSON(), nullable=False),
        sa.Column("loaded", sa.JSON(), nullable=False),
        sa.Column("pull", sa.JSON(), nullable=False),
        sa.Column("tasks_done", sa.Integer(), nullable=False),
        sa.Column("registered_at", sa.Float(), nullable=False),
        sa.Column("last_seen_at", sa.Float(), nullable=False),
        sa.Column("rewarded_until", sa.Float(), nullable=False),
    )
    op.create_table(
        "blobs",
        sa.Column("key", sa.String(130), primary_key=True),
        sa.Column("grp", sa.String(64), nullable=False, index=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    for table in ("blobs", "nodes", "honor_grants", "api_keys", "accounts"):
        op.drop_table(table)
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("requires")
        batch.drop_column("model_sha256")
        batch.drop_column("cost")
