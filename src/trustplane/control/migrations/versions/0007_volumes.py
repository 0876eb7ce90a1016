"""volumes: the block-storage service's volume types and volumes

A volume record keeps its key's UUID in the KMS (never the key), its
location, its LUKS header's UUID and digest, its state (crash-safe create
and delete) and its current attachment.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "volume_types",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("backend", sa.String(64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("creator", sa.String(160), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "volumes",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("type_name", sa.String(64), sa.ForeignKey("volume_types.name"), nullable=False),
        sa.Column("backend", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("key_id", sa.String(36), nullable=True),
        sa.Column("location", sa.Text(), nullable=True),
        sa.Column("engine", sa.String(16), nullable=True),
        sa.Column("header_uuid", sa.String(64), nullable=True),
        sa.Column("header_digest", sa.String(80), nullable=True),
        sa.Column("fingerprint", sa.JSON(), nullable=True),
        sa.Column("owner", sa.String(160), nullable=False),
        sa.Column("attached_to", sa.String(160), nullable=True),
        sa.Column("attached_domain", sa.String(128), nullable=True),
        sa.Column("attached_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("volumes")
    op.drop_table("volume_types")
