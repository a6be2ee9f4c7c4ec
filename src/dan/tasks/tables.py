"""The database schema (SQLAlchemy Core). Alembic migrations create it; keep them in step."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# One row per task. ``id`` is the public taskId; ``tag`` then ``seq`` order the queue (see
# dan.tasks.store). Times are UNIX seconds (float), so lease arithmetic is the same on every
# database.
tasks = Table(
    "tasks",
    metadata,
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("id", String(36), nullable=False, unique=True),
    Column("account", String(128), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("status", Integer, nullable=False),
    Column("tag", Float, nullable=False),
    Column("params", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("progress", Float, nullable=False, default=0.0),
    Column("error", Text),
    Column("result", JSON),
    Column("worker_id", String(128)),
    Column("lease_expires_at", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("expired", Boolean, nullable=False, default=False),
    Index("ix_tasks_status_tag_seq", "status", "tag", "seq"),
    Index("ix_tasks_account_tag", "account", "tag"),
    Index("ix_tasks_finished_at", "finished_at"),
)
