"""Trust: what nodes have as rows, node sessions, task limits, result checks, honor escrow.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
PENDING_OR_RUNNING = (0, 1)


def upgrade() -> None:
    _create_tables()
    _move_lists_into_rows()
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("requires")
        batch.add_column(sa.Column("node_id", sa.String(36)))
        batch.add_column(sa.Column("expects", sa.JSON()))
        batch.add_column(sa.Column("deadline", sa.Float()))
        batch.add_column(sa.Column("cancel_by", sa.Float()))
        batch.add_column(sa.Column("verify_of", sa.String(36)))
        batch.add_column(sa.Column("verification", sa.String(16)))
        batch.create_index("ix_tasks_verify_of", ["verify_of"])
        batch.create_index("ix_tasks_account_status", ["account", "status"])
    started = sa.text("started_at IS NOT NULL")
    op.create_index(
        "ix_tasks_started_tag", "tasks", ["tag"], postgresql_where=started, sqlite_where=started
    )
    unexpired = sa.text("NOT expired")
    op.create_index(
        "ix_tasks_unexpired",
        "tasks",
        ["finished_at"],
        postgresql_where=unexpired,
        sqlite_where=unexpired,
    )
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("installed")
        batch.add_column(
            sa.Column("checks_passed", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("checks_failed", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("worked_at", sa.Float()))
        batch.add_column(sa.Column("suspect_since", sa.Float()))
        batch.add_column(sa.Column("suspect_reason", sa.Text()))


def _create_tables() -> None:
    op.create_table(
        "task_files",
        sa.Column("task_id", sa.String(36), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
    )
    op.create_table(
        "task_exclusions",
        sa.Column("task_id", sa.String(36), primary_key=True),
        sa.Column("account", sa.String(128), primary_key=True),
    )
    op.create_table(
        "node_files",
        sa.Column("node_id", sa.String(36), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16)),
        sa.Column("name", sa.String(256)),
        sa.Column("file", sa.String(256)),
        sa.Column("size", sa.BigInteger()),
        sa.Column("name_key", sa.String(256)),
        sa.Column("file_key", sa.String(256)),
    )
    op.create_index("ix_node_files_sha256", "node_files", ["sha256"])
    op.create_index("ix_node_files_kind_name", "node_files", ["kind", "name_key"])
    op.create_index("ix_node_files_kind_file", "node_files", ["kind", "file_key"])
    op.create_table(
        "node_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("node_id", sa.String(36), nullable=False, index=True),
        sa.Column("account", sa.String(128), nullable=False, index=True),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("last_seen_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "honor_escrow",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("node_id", sa.String(36), nullable=False, index=True),
        sa.Column("account", sa.String(128), nullable=False),
        sa.Column("amount", sa.Float(), nullable=False),
        sa.Column("task_id", sa.String(36), unique=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )


def _move_lists_into_rows() -> None:
    """The JSON lists become rows: nodes' installed files (described again at their next
    registration) and the files of tasks that may still be claimed."""
    conn = op.get_bind()
    meta = sa.MetaData()
    nodes = sa.Table("nodes", meta, autoload_with=conn)
    tasks = sa.Table("tasks", meta, autoload_with=conn)
    node_files = sa.Table("node_files", meta, autoload_with=conn)
    task_files = sa.Table("task_files", meta, autoload_with=conn)
    for row in conn.execute(sa.select(nodes.c.id, nodes.c.installed)):
        shas = sorted({sha for sha in row.installed or () if isinstance(sha, str)})
        if shas:
            conn.execute(node_files.insert(), [{"node_id": row.id, "sha256": s} for s in shas])
    open_tasks = sa.select(tasks.c.id, tasks.c.requires).where(
        tasks.c.status.in_(PENDING_OR_RUNNING)
    )
    for row in conn.execute(open_tasks):
        shas = sorted({sha for sha in row.requires or () if isinstance(sha, str)})
        if shas:
            conn.execute(task_files.insert(), [{"task_id": row.id, "sha256": s} for s in shas])


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        for column in ("suspect_reason", "suspect_since", "worked_at"):
            batch.drop_column(column)
        batch.drop_column("checks_failed")
        batch.drop_column("checks_passed")
        batch.add_column(sa.Column("installed", sa.JSON(), nullable=False, server_default="[]"))
    op.drop_index("ix_tasks_unexpired", "tasks")
    op.drop_index("ix_tasks_started_tag", "tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_account_status")
        batch.drop_index("ix_tasks_verify_of")
        for column in ("verification", "verify_of", "cancel_by", "deadline", "expects", "node_id"):
            batch.drop_column(column)
        batch.add_column(sa.Column("requires", sa.JSON()))
    for table in ("honor_escrow", "node_sessions", "node_files", "task_exclusions", "task_files"):
        op.drop_table(table)
