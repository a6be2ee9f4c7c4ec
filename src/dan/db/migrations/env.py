"""Alembic environment: runs the migrations against the URL DAN passes in."""

from __future__ import annotations

from alembic import context

from dan.db import create_db_engine
from dan.db.tables import metadata

url = context.config.get_main_option("sqlalchemy.url")
assert url is not None
engine = create_db_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
