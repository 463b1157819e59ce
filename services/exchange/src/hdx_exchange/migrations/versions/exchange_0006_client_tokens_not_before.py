"""client tokens not before

Revision ID: exchange_0006
Revises: exchange_0005
Create Date: 2026-11-25 14:40:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "exchange_0006"
down_revision: str | Sequence[str] | None = "exchange_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("oauth_client", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tokens_not_before", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("oauth_client", schema=None) as batch_op:
        batch_op.drop_column("tokens_not_before")
