"""placements.permanent_refusals: refusals with a permanent code in a row

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows start at 0; a placement already failed for good stays failed.
    with op.batch_alter_table("placements") as batch:
        batch.add_column(
            sa.Column("permanent_refusals", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("placements") as batch:
        batch.drop_column("permanent_refusals")
