"""adapter_versions.chunked_sha256: the weights' chunked sha256, checked on threads

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Versions registered before have none: engines hash their files in one pass.
    with op.batch_alter_table("adapter_versions") as batch:
        batch.add_column(
            sa.Column("chunked_sha256", sa.String(64), server_default="", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_column("chunked_sha256")
