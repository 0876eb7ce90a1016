"""attestation: each node's boot record and its sticky quarantine

Per node, the verifier keeps what it accepted in the node's current boot
(the AK's last resetCount/restartCount/clock, and the accepted event log as
a count and a hash chain) and a quarantine (reason, time) that only an
administrator's logged clear lifts.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("boot_reset_count", sa.BigInteger(), None),
    ("boot_restart_count", sa.BigInteger(), None),
    ("boot_clock", sa.BigInteger(), None),
    ("boot_events", sa.BigInteger(), "0"),
    ("boot_digest", sa.LargeBinary(), None),
    ("boot_pcrs", sa.JSON(), None),
    ("boot_reviewed", sa.BigInteger(), "0"),
    ("quarantine_reason", sa.Text(), None),
    ("quarantined_at", sa.DateTime(timezone=True), None),
)


def upgrade() -> None:
    with op.batch_alter_table("attestations") as batch:
        for name, kind, default in _COLUMNS:
            batch.add_column(
                sa.Column(name, kind, nullable=default is None, server_default=default)
            )


def downgrade() -> None:
    with op.batch_alter_table("attestations") as batch:
        for name, _, _ in reversed(_COLUMNS):
            batch.drop_column(name)
