"""long volume operations that copy data and must survive a crash

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "volume_operations",
        sa.Column("id", sa.String(length=36), primary_key=True),
        sa.Column(
            "volume_id",
            sa.String(length=36),
            sa.ForeignKey("volumes.id"),
            nullable=False,
            unique=True,
        ),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("phase", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=36), nullable=True),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("source", sa.JSON(), nullable=True),
        sa.Column("progress", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("subject", sa.String(length=160), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("volume_operations")
