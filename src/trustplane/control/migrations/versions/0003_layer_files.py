"""runtime integrity: file digests of registered image layers

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "layer_files",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("image_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("layer_index", sa.Integer(), nullable=False),
        sa.Column("diff_id", sa.String(length=140), nullable=True),
        sa.Column("file_count", sa.Integer(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("image_id", "layer_index"),
    )
    with op.batch_alter_table("layer_files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_layer_files_image_id"), ["image_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("layer_files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_layer_files_image_id"))
    op.drop_table("layer_files")
