"""pending enrolments beside the bound one; manifest digests long enough for sha512

A re-enrolment waits in `pending_*` until its credential is activated, so
the node's current binding and attested state survive a re-enrolment that
never completes (one made with a stolen node key and no TPM, say).
`images.manifest_digest` grows from 80 to 140 characters ("sha512:" and
128 hex digits do not fit in 80; PostgreSQL enforces the length).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_PENDING = ("pending_ek_public", "pending_ek_cert", "pending_ak_public", "pending_ak_name")


def upgrade() -> None:
    with op.batch_alter_table("attestations") as batch:
        for column in _PENDING:
            batch.add_column(sa.Column(column, sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("images") as batch:
        batch.alter_column(
            "manifest_digest", type_=sa.String(length=140), existing_type=sa.String(length=80)
        )


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.alter_column(
            "manifest_digest", type_=sa.String(length=80), existing_type=sa.String(length=140)
        )
    with op.batch_alter_table("attestations") as batch:
        for column in reversed(_PENDING):
            batch.drop_column(column)
