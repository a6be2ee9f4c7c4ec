"""Model families on nodes and tasks: which families a node runs, the family of each task
and of each file a node reports.

Nodes registered before this revision reported no families: they get ``sd15`` (what every
node ran before SDXL). Tasks queued before it keep no family, so any node may take them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("family", sa.String(8)))
    with op.batch_alter_table("node_files") as batch:
        batch.add_column(sa.Column("family", sa.String(8)))
    node_families = op.create_table(
        "node_families",
        sa.Column("node_id", sa.String(36), primary_key=True),
        sa.Column("family", sa.String(8), primary_key=True),
    )
    nodes = sa.table("nodes", sa.column("id"))
    op.execute(
        node_families.insert().from_select(
            ["node_id", "family"], sa.select(nodes.c.id, sa.literal("sd15"))
        )
    )


def downgrade() -> None:
    op.drop_table("node_families")
    with op.batch_alter_table("node_files") as batch:
        batch.drop_column("family")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("family")
