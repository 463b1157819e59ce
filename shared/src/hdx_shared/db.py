"""Database plumbing: one SQLModel engine per service, SQLite embedded or PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, Table, event
from sqlalchemy.engine import Engine
from sqlmodel import create_engine

from hdx_shared.settings import HdxSettings
from hdx_shared.telemetry import instrument_engine


def make_engine(settings: HdxSettings, **kwargs: Any) -> Engine:
    url = settings.sqlalchemy_url()
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL: readers (the HTTP API) never block the pipeline's writer.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, **kwargs)
    instrument_engine(engine)
    return engine


def migrate(engine: Engine, migrations: Path) -> None:
    """Bring the service's database to the newest schema (Alembic `upgrade head`).

    Each service keeps its migrations in its package (`<package>/migrations`), with an
    env.py that calls `run_migrations` below; every start runs this, and it is a no-op
    when the schema is current.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def run_migrations(target_metadata: MetaData) -> None:
    """The body of every service's migrations/env.py (online mode, on migrate()'s connection)."""
    from alembic import context

    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite alters tables by copying them; batch mode writes migrations that work on both.
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def schema_drift(engine: Engine, tables: Sequence[Table]) -> list[Any]:
    """What the database lacks or has beyond these tables' models (empty when the
    migrations are complete). Tables of other services, or Alembic's own, are ignored."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    metadata = MetaData()
    for table in tables:
        table.to_metadata(metadata)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diffs = compare_metadata(context, metadata)
    # Tables the models do not know (Alembic's version table) are not drift.
    return [d for d in diffs if not (isinstance(d, tuple) and d[0] == "remove_table")]


def new_revision(package: str, message: str) -> None:
    """Write a new migration for a service (`hdx db-revision`), from its models' difference
    with the newest migration. Run it in a fresh process: only that service's models may be
    imported, or another service's tables would be written into its migration."""
    import importlib
    import tempfile

    from alembic import command
    from alembic.config import Config
    from sqlmodel import create_engine

    importlib.import_module(f"{package}.models")
    root = Path(importlib.import_module(package).__path__[0]) / "migrations"
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{tmp}/head.db")
        migrate(engine, root)
        config = Config()
        config.set_main_option("script_location", str(root))
        count = len(list((root / "versions").glob("*.py"))) - 1  # less __init__.py
        prefix = package.removeprefix("hdx_")
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.revision(
                config, message=message, autogenerate=True, rev_id=f"{prefix}_{count + 1:04d}"
            )
        engine.dispose()
