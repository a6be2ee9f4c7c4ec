"""The Alembic migrations build exactly the schema dan.db.tables describes."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from dan.db.tables import metadata


def test_migrations_match_the_table_definitions(db: Engine) -> None:
    with db.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = [d for d in compare_metadata(context, metadata) if d[0] != "remove_table"]
    assert differences == []
