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
    LargeBinary,
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
    # Added by 0002: what the task costs (steps x megapixels, for the queue's weighting), the
    # checkpoint it runs on (node affinity) and every model file it needs (which nodes can run
    # it: a JSON list of sha256); NULL for older rows.
    Column("cost", Float),
    Column("model_sha256", String(64)),
    Column("requires", JSON),
    Index("ix_tasks_status_tag_seq", "status", "tag", "seq"),
    Index("ix_tasks_account_tag", "account", "tag"),
    Index("ix_tasks_finished_at", "finished_at"),
)

# --- The network (migration 0002) --------------------------------------------------------------

# People and services that call the API. ``id`` is what tasks.account holds ("local" is the
# embedded single-user account, "public" the anonymous one behind the public key).
accounts = Table(
    "accounts",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("nickname", String(64), nullable=False, unique=True),
    Column("email", String(256)),  # never shown to other accounts
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("can_run_nodes", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

# API keys, stored only as the sha256 of the key; ``prefix`` (its first characters) lets people
# tell their keys apart.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account", String(128), nullable=False, index=True),
    Column("key_sha256", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Column("revoked_at", Float),
)

# The honor ledger: an account's honor is the sum of its grants. A completed task earns its
# node's owner one grant (unique per task), an online node one per interval.
honor_grants = Table(
    "honor_grants",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("account", String(128), nullable=False, index=True),
    Column("amount", Float, nullable=False),
    Column("reason", String(16), nullable=False),  # signup, task, online, admin
    Column("task_id", String(36), unique=True),  # set for task rewards: at most one per task
    Column("node_id", String(36)),
    Column("granted_by", String(128)),  # the admin account, for admin grants
    Column("note", Text),
    Column("created_at", Float, nullable=False),
)

# Worker nodes: the embedded worker and donated machines that connect out over HTTP.
nodes = Table(
    "nodes",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account", String(128), nullable=False, index=True),  # the owner
    Column("name", String(64), nullable=False),
    Column("capabilities", JSON, nullable=False),  # device, memory, features, max pixels
    Column("installed", JSON, nullable=False),  # sha256 of every installed model file
    Column("loaded", JSON, nullable=False),  # sha256 of the checkpoints it has in memory
    Column("pull", JSON, nullable=False),  # catalog names an admin asked it to download
    Column("tasks_done", Integer, nullable=False, default=0),
    Column("registered_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
    Column("rewarded_until", Float, nullable=False),  # online time paid up to here
)

# Result and input images when the API runs as several replicas (dan.storage.SqlBlobStore):
# every replica must read what a node uploaded through another. ``grp`` is the task id.
blobs = Table(
    "blobs",
    metadata,
    Column("key", String(130), primary_key=True),
    Column("grp", String(64), nullable=False, index=True),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)
