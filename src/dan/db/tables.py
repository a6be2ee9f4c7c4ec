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
    text,
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
    # Added by 0002: what the task costs (steps x megapixels, for the queue's weighting) and
    # the checkpoint it runs on (node affinity); NULL for older rows. The files it needs are
    # rows of ``task_files``.
    Column("cost", Float),
    Column("model_sha256", String(64)),
    # Added by 0003 (trust): the node holding (or that ran) the task; what its result must be
    # (``{"images": n, "width": w, "height": h}`` or ``{"caption": true}``); when a run must
    # end (from the task's cost) and when a cancelled run must have stopped; the task a
    # verification run re-runs, and on an original, where its check stands.
    Column("node_id", String(36)),
    Column("expects", JSON),
    Column("deadline", Float),
    Column("cancel_by", Float),
    Column("verify_of", String(36), index=True),
    Column("verification", String(16)),
    # Added by 0004: the latest step preview of a running task (a small PNG the worker sends
    # with its heartbeats; cleared when the task ends).
    Column("preview", LargeBinary),
    # Added by 0005: how many images the task makes (batch_size x n_iter); pending limits
    # count images, not requests.
    Column("images", Integer, nullable=False, default=1, server_default="1"),
    # Added by 0006: the model family of its checkpoint (dan.domain.ModelFamily): only nodes
    # that list the family in ``node_families`` are offered it. NULL: any node (a task on no
    # checkpoint, or queued before 0006).
    Column("family", String(8)),
    # Added by 0007: what the task may share one UNet batch with (dan.tasks.needs.batch_key);
    # NULL: a task that never batches.
    Column("batch_key", String(16)),
    Index("ix_tasks_status_tag_seq", "status", "tag", "seq"),
    Index("ix_tasks_account_tag", "account", "tag"),
    Index("ix_tasks_account_status", "account", "status"),
    Index("ix_tasks_account_seq", "account", "seq"),  # an account's history, newest first
    Index("ix_tasks_finished_at", "finished_at"),
    # The queue's virtual time (the highest tag ever claimed) and the results still to expire
    # are read on every submit and sweep: partial indexes keep those reads off the history.
    Index(
        "ix_tasks_started_tag",
        "tag",
        postgresql_where=text("started_at IS NOT NULL"),
        sqlite_where=text("started_at IS NOT NULL"),
    ),
    Index(
        "ix_tasks_unexpired",
        "finished_at",
        postgresql_where=text("NOT expired"),
        sqlite_where=text("NOT expired"),
    ),
)

# The model files (sha256) a task needs: a node may claim it only if it has every one.
task_files = Table(
    "task_files",
    metadata,
    Column("task_id", String(36), primary_key=True),
    Column("sha256", String(64), primary_key=True),
)

# Accounts whose nodes may not run a task: a verification run is never given to the account
# whose node produced the result it checks.
task_exclusions = Table(
    "task_exclusions",
    metadata,
    Column("task_id", String(36), primary_key=True),
    Column("account", String(128), primary_key=True),
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
    # Added by 0005: the HMAC-SHA256 key of the account's webhook signatures (made on first use).
    Column("webhook_secret", String(64)),
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
    # Added by 0004: where the key was made ("web": by a signed-in person at /auth/key, and
    # rotated there; NULL: by an admin or by the account's own keys).
    Column("origin", String(16)),
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
    Column("loaded", JSON, nullable=False),  # sha256 of the checkpoints it has in memory
    Column("pull", JSON, nullable=False),  # catalog names an admin asked it to download
    Column("tasks_done", Integer, nullable=False, default=0),
    Column("registered_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
    Column("rewarded_until", Float, nullable=False),  # online time paid up to here
    # Added by 0003 (trust): results checked by another node and found right (or wrong), the
    # last accepted result for another account, and why and since when it is suspect.
    Column("checks_passed", Integer, nullable=False, default=0, server_default="0"),
    Column("checks_failed", Integer, nullable=False, default=0, server_default="0"),
    Column("worked_at", Float),
    Column("suspect_since", Float),
    Column("suspect_reason", Text),
)

# What each node has installed (0003): one row per file, so that "which online node has these
# files" is a join, whatever a node reports. ``kind``, ``name`` and ``file`` are set for the
# files the node describes (the API resolves requests against them); ``*_key`` are casefolded.
node_files = Table(
    "node_files",
    metadata,
    Column("node_id", String(36), primary_key=True),
    Column("sha256", String(64), primary_key=True, index=True),
    Column("kind", String(16)),
    Column("name", String(256)),
    Column("file", String(256)),
    Column("size", BigInteger),
    Column("name_key", String(256)),
    Column("file_key", String(256)),
    # Added by 0006: the family the node read from the file (checkpoints, LoRAs, ControlNets),
    # so that the API knows it for a model only nodes have.
    Column("family", String(8)),
    Index("ix_node_files_kind_name", "kind", "name_key"),
    Index("ix_node_files_kind_file", "kind", "file_key"),
)

# The model families each node runs and has the memory for (0006), replaced at each
# registration; a node that reports none (older than 0006) gets ``sd15``.
node_families = Table(
    "node_families",
    metadata,
    Column("node_id", String(36), primary_key=True),
    Column("family", String(8), primary_key=True),
)

# One running process of a node (0003): each registration opens a session; tasks are held by
# ``node:<node id>:<session id>``, so two processes of one node never release each other's.
node_sessions = Table(
    "node_sessions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("node_id", String(36), nullable=False, index=True),
    Column("account", String(128), nullable=False, index=True),
    Column("slots", Integer, nullable=False),  # tasks it runs at once
    Column("started_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
)

# Honor a node on probation has earned (0003): paid into the ledger once its results have
# passed their checks, dropped if one fails.
honor_escrow = Table(
    "honor_escrow",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("node_id", String(36), nullable=False, index=True),
    Column("account", String(128), nullable=False),
    Column("amount", Float, nullable=False),
    Column("task_id", String(36), unique=True),
    Column("created_at", Float, nullable=False),
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

# Sign-in identities (0004): an account made by signing in with an OAuth 2 / OpenID Connect
# provider is found again by (provider, subject). Nothing of the provider's tokens is kept.
identities = Table(
    "identities",
    metadata,
    Column("provider", String(64), primary_key=True),
    Column("subject", String(255), primary_key=True),
    Column("account", String(128), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
)

# --- Clients (migration 0005) ---------------------------------------------------------------

# A finished task's webhook: POSTed to ``url`` until it is delivered or given up. ``due_at`` is
# when the next try may start (NULL once delivered or given up); a sender claims a row by moving
# it forward, so replicas never send one delivery at once.
webhooks = Table(
    "webhooks",
    metadata,
    Column("task_id", String(36), primary_key=True),
    Column("account", String(128), nullable=False),
    Column("url", Text, nullable=False),
    Column("state", String(16), nullable=False),  # waiting, pending, delivered, failed
    Column("attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("due_at", Float),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("delivered_at", Float),
)
Index(
    "ix_webhooks_due",
    webhooks.c.due_at,
    postgresql_where=text("due_at IS NOT NULL"),
    sqlite_where=text("due_at IS NOT NULL"),
)

# What an AUTOMATIC1111 client set with POST /sdapi/v1/options, per API key ("key:<id>") or,
# for keyless callers, per account ("account:<id>"): never globally.
client_options = Table(
    "client_options",
    metadata,
    Column("owner", String(200), primary_key=True),
    Column("checkpoint", String(64)),  # sha256 of sd_model_checkpoint
    Column("updated_at", Float, nullable=False),
    # Added by 0008: CLIP_stop_at_last_layers, and sd_vae (a VAE file's sha256, or A1111's
    # "Automatic" or "None"). NULL: never chosen.
    Column("clip_skip", Integer),
    Column("vae", String(64)),
)
