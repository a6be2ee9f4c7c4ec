"""Trusted nodes' escrowed task honor is paid.

Until this revision an admin's node (never checked, so never past its probation) had its task
honor held in escrow, which only a passed check releases: it was held for good. Trusted nodes
(the local worker's and admins') are past probation now (dan.nodes.trust); this pays what their
escrow holds into the ledger, as a passed check would have, dated when it was earned.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TRUSTED_NODES = """
    SELECT n.id FROM nodes n LEFT JOIN accounts a ON a.id = n.account
    WHERE n.account = 'local' OR a.is_admin IS TRUE
"""


def upgrade() -> None:
    op.execute(
        f"""
        INSERT INTO honor_grants (account, amount, reason, task_id, node_id, note, created_at)
        SELECT account, amount, 'task', task_id, node_id,
               'held while trusted nodes were wrongly on probation', created_at
        FROM honor_escrow WHERE node_id IN ({TRUSTED_NODES})
        """
    )
    op.execute(f"DELETE FROM honor_escrow WHERE node_id IN ({TRUSTED_NODES})")


def downgrade() -> None:
    pass  # the honor stays paid
