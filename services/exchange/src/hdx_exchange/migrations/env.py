"""Alembic environment for the exchange service's database (run by hdx_shared.db.migrate)."""

from sqlmodel import SQLModel

import hdx_exchange.models  # noqa: F401 - registers the tables on SQLModel.metadata
from hdx_shared.db import run_migrations

run_migrations(SQLModel.metadata)
