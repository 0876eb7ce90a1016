"""layer-key chains of the node layer stores

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "layer_chains",
        sa.Column("id", sa.String(length=36), primary_key=True),
        sa.Column("repository", sa.String(length=256), nullable=False),
        sa.Column("manifest_digest", sa.String(length=140), nullable=False),
        sa.Column("layers", sa.Integer(), nullable=False),
        sa.Column("secret_id", sa.String(length=36), sa.ForeignKey("secrets.id"), nullable=False),
        sa.Column("creator", sa.String(length=160), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_layer_chains_repository", "layer_chains", ["repository"])


def downgrade() -> None:
    op.drop_index("ix_layer_chains_repository", table_name="layer_chains")
    op.drop_table("layer_chains")
