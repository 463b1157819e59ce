"""publisher inbound topic names

Revision ID: exchange_0005
Revises: exchange_0004
Create Date: 2026-11-25 14:05:14.738729

"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "exchange_0005"
down_revision: str | Sequence[str] | None = "exchange_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # Existing publishers keep NULL: their topic name is derived from their source.
    with op.batch_alter_table("publisher", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("topic_name", sqlmodel.sql.sqltypes.AutoString(), nullable=True)
        )
        batch_op.create_unique_constraint("uq_publisher_topic_name", ["topic_name"])


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("publisher", schema=None) as batch_op:
        batch_op.drop_constraint("uq_publisher_topic_name", type_="unique")
        batch_op.drop_column("topic_name")
