"""Database engines (SQLite with WAL and BEGIN IMMEDIATE, or PostgreSQL) and migrations."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).with_name("migrations")


def create_db_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` writes."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30})
    _make_sqlite_transactional(engine)
    return engine


def _make_sqlite_transactional(engine: Engine) -> None:
    # pysqlite's own transaction handling begins transactions late and never IMMEDIATE; take it
    # over so every write transaction holds the write lock from its first statement, which
    # makes read-then-write sequences (claims, the pending limit) atomic across processes.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get("dan_read_only", False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


MIGRATION_LOCK = 0x64616E6D  # PostgreSQL advisory lock key ("danm")


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to the newest schema (or to ``revision``); idempotent.
    Processes starting together (API replicas, a worker) take turns: each migrates under a
    lock, the later ones find nothing to do."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with _migration_lock(url):
        command.upgrade(config, revision)


@contextlib.contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    """An advisory lock on PostgreSQL, a lock file beside an SQLite database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
        finally:
            engine.dispose()
    elif parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".migrate-lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield  # the lock goes with the file's closing
    else:
        yield
