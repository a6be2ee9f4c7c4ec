"""Client options: an A1111 client's clip skip (CLIP_stop_at_last_layers) and VAE (sd_vae),
besides its checkpoint.

Rows written before this revision chose neither: both stay NULL, the defaults (clip skip 1,
the checkpoint's own VAE).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("client_options") as batch:
        batch.add_column(sa.Column("clip_skip", sa.Integer()))
        batch.add_column(sa.Column("vae", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("client_options") as batch:
        batch.drop_column("vae")
        batch.drop_column("clip_skip")
