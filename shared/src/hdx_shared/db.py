"""Database plumbing: one SQLModel engine per service, SQLite embedded or PostgreSQL."""

from __future__ import annotations

import sqlite3
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, Table, event, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import create_engine

from hdx_shared.settings import HdxSettings
from hdx_shared.telemetry import instrument_engine

# An execution option (see `write_locked`): the transaction takes SQLite's write lock first.
WRITE_LOCK = "hdx_write_lock"
# How long a SQLite writer waits for another connection's (or process's) write lock.
BUSY_TIMEOUT_MS = 5000
# How long a starting replica waits for another one's migration to finish.
MIGRATION_WAIT_MS = 120_000


def make_engine(settings: HdxSettings, **kwargs: Any) -> Engine:
    url = settings.sqlalchemy_url()
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL: readers (the HTTP API) never block the pipeline's writer.
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            _sqlite_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # pysqlite begins a transaction only at the first INSERT/UPDATE/DELETE, so what a
            # transaction read before it could be stale by the time it writes (another
            # process wrote in between). A write-locked transaction begins itself, with
            # BEGIN IMMEDIATE: the lock is taken (waiting up to the busy timeout) before
            # anything is read; the driver then sees a transaction open and adds no BEGIN,
            # and still emits COMMIT/ROLLBACK. Other transactions are left as they were.
            if conn.get_execution_options().get(WRITE_LOCK):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, **kwargs)
    instrument_engine(engine)
    return engine


def _sqlite_wal(cur: Any) -> None:
    """Switch the file to WAL (kept in the file). On a new file another process may be
    switching it at the same moment, and SQLite then answers busy at once, without waiting
    the busy timeout: try again for as long."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def write_locked(engine: Engine) -> Engine:
    """The engine for read-modify-write transactions (a counter, a chain's head): on SQLite
    each begins with BEGIN IMMEDIATE, so two processes sharing the file take turns instead
    of both acting on what they read (one then failing, or worse). PostgreSQL ignores the
    option: lock the rows read there (SELECT … FOR UPDATE)."""
    return engine.execution_options(**{WRITE_LOCK: True})


def migrate(engine: Engine, migrations: Path) -> None:
    """Bring the service's database to the newest schema (Alembic `upgrade head`).

    Each service keeps its migrations in its package (`<package>/migrations`), with an
    env.py that calls `run_migrations` below; every start runs this, and it is a no-op
    when the schema is current. Replicas starting together take turns (a PostgreSQL
    advisory lock, SQLite's write lock), so one migrates and the others then find the
    schema current.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        raw: Any = connection.connection.driver_connection if sqlite else None
        if raw is not None:
            # Wait for another replica's migration longer than for an ordinary writer.
            raw.execute(f"PRAGMA busy_timeout={MIGRATION_WAIT_MS}")
            connection.execution_options(**{WRITE_LOCK: True})
        try:
            with connection.begin():
                if engine.dialect.name == "postgresql":
                    # Held until the migration's transaction ends; one key per migrations
                    # directory, so services sharing a database do not wait on each other.
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"),
                        {"key": _lock_key(migrations)},
                    )
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        finally:
            if raw is not None:
                raw.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def _lock_key(migrations: Path) -> int:
    """A stable advisory-lock key for a service's migrations (its package's name)."""
    return zlib.crc32(f"hdx-migrate:{migrations.parent.name}".encode())


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
