"""The database: engines, the schema, migrations and notifications, shared by every feature.

``tables`` is the schema (SQLAlchemy Core), ``migrations`` the Alembic history that builds it,
``notify`` PostgreSQL's LISTEN/NOTIFY between processes. The feature packages (tasks, accounts,
nodes, storage) import what they need from here, never from each other, to reach the schema.
"""

from dan.db.engine import create_db_engine, migrate

__all__ = ["create_db_engine", "migrate"]
