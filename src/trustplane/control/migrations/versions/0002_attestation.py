"""attestation: TPM identities of nodes, quote nonces

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "attestations",
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("ek_public", sa.LargeBinary(), nullable=False),
        sa.Column("ek_cert", sa.LargeBinary(), nullable=True),
        sa.Column("ak_public", sa.LargeBinary(), nullable=False),
        sa.Column("ak_name", sa.LargeBinary(), nullable=False),
        sa.Column("challenge_hash", sa.LargeBinary(), nullable=True),
        sa.Column("challenge_expires", sa.DateTime(timezone=True), nullable=True),
        sa.Column("bound", sa.Boolean(), nullable=False),
        sa.Column("bound_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("transport_key", sa.Text(), nullable=True),
        sa.Column("last_result", sa.String(length=8), nullable=True),
        sa.Column("last_reason", sa.Text(), nullable=True),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("measurements", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("node"),
    )
    op.create_table(
        "attestation_nonces",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )
    with op.batch_alter_table("attestation_nonces", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_attestation_nonces_expires"), ["expires"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("attestation_nonces", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_attestation_nonces_expires"))
    op.drop_table("attestation_nonces")
    op.drop_table("attestations")
