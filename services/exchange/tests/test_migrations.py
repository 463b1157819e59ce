"""The Alembic migrations build exactly the schema the models describe, on SQLite and
PostgreSQL, and running them twice is harmless."""

from __future__ import annotations

from pathlib import Path

from hdx_exchange.models import TABLES
from hdx_exchange.store import ExchangeStore
from hdx_shared.db import make_engine, schema_drift
from hdx_shared.settings import HdxSettings


def test_migrations_match_the_models(database_url: str, tmp_path: Path) -> None:
    engine = make_engine(HdxSettings(data_dir=tmp_path, database_url=database_url))
    try:
        store = ExchangeStore(engine)
        store.create_schema()
        store.create_schema()  # every start runs it; the second time is a no-op
        assert schema_drift(engine, [t.__table__ for t in TABLES]) == []
    finally:
        engine.dispose()
