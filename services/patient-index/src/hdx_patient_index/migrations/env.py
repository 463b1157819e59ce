"""Alembic environment for the patient-index service's database (run by hdx_shared.db.migrate)."""

from sqlmodel import SQLModel

import hdx_patient_index.models  # noqa: F401 - registers the tables on SQLModel.metadata
from hdx_shared.db import run_migrations

run_migrations(SQLModel.metadata)
