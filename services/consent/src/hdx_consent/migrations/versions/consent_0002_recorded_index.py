"""index consent_version.recorded (replicas re-read recent versions)

Revision ID: consent_0002
Revises: consent_0001
Create Date: 2026-12-07 01:10:00.000000

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "consent_0002"
down_revision: str | Sequence[str] | None = "consent_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("consent_version", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_consent_version_recorded"), ["recorded"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("consent_version", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consent_version_recorded"))
