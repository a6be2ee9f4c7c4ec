"""build_services(settings): the one place that wires DAN's parts together."""

from __future__ import annotations

import contextlib
import secrets
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from dan.accounts import AccountService, SignInService, SqlAccountStore, SqlIdentityStore
from dan.accounts.options import ClientOptions, SqlClientOptionsStore
from dan.config import Settings
from dan.db import create_db_engine, migrate
from dan.db.notify import PROGRESS, publisher
from dan.domain import LOCAL_ACCOUNT, LOCAL_NODE_NAME, ModelKind
from dan.metrics.families import Metrics
from dan.models.registry import ModelRegistry
from dan.nodes import NetworkModels, NodeService, SqlNodeStore
from dan.nodes.checks import ResultChecks
from dan.nodes.store import NodeRules, node_id_for
from dan.storage import BlobStore, LocalBlobStore, SqlBlobStore
from dan.tasks.base import RunObserver
from dan.tasks.checks import SqlCheckStore
from dan.tasks.live import LiveProgress
from dan.tasks.service import TaskService
from dan.tasks.store import QueueRules, SqlTaskStore, TaskStore
from dan.webhooks import SqlWebhookStore, WebhookService


@dataclass
class Services:
    settings: Settings
    db: Engine
    store: TaskStore
    blobs: BlobStore
    registry: ModelRegistry  # this server's own files (the embedded worker uses its own)
    tasks: TaskService
    public_api_key: str
    accounts: AccountService
    nodes: NodeService
    models: NetworkModels  # what requests may name: this server's files and online nodes'
    checks: ResultChecks  # re-runs of nodes' results, compared
    sign_in: SignInService  # accounts people make by signing in, and their keys
    webhooks: WebhookService  # callback URLs, the accounts' secrets, the tries (dan.webhooks)
    client_options: ClientOptions  # what A1111 clients set per key (POST /sdapi/v1/options)
    session_secret: str | None = None  # signs sign-in sessions (None: no provider configured)
    metrics: Metrics = field(default_factory=Metrics)  # this process's counts (GET /metrics)
    # Running tasks' progress heard by this process (and, on PostgreSQL, by the others).
    live: LiveProgress | None = None

    def close(self) -> None:
        self.nodes.close()
        self.db.dispose()


@dataclass
class Stores:
    """What the API and the embedded worker both open on one database: the queue, the nodes'
    rows, the blob store (files, or the database for several replicas) and the model files."""

    db: Engine
    tasks: SqlTaskStore
    nodes: SqlNodeStore
    blobs: BlobStore
    registry: ModelRegistry


def open_stores(settings: Settings, *, observer: RunObserver | None = None) -> Stores:
    """Migrate and open the database of ``settings``, and scan its models folder; the task
    store tells ``observer`` of the claims and runs it records (dan.metrics)."""
    migrate(settings.db_url)
    db = create_db_engine(settings.db_url)
    blobs: BlobStore = (
        SqlBlobStore(db) if settings.blobs_in_database else LocalBlobStore(settings.results_dir)
    )
    nodes = SqlNodeStore(db, rules=node_rules(settings))
    registry = model_registry(settings)
    registry.scan()
    tasks = SqlTaskStore(db, rules=queue_rules(settings), observer=observer)
    return Stores(db, tasks, nodes, blobs, registry)


def queue_rules(settings: Settings) -> QueueRules:
    """The queue's limits from ``settings``: a cancelled run has one lease to stop."""
    return QueueRules(
        max_attempts=settings.max_attempts,
        cancel_grace_s=settings.lease_s,
        runtime_base_s=settings.runtime_base_s,
        runtime_per_cost_s=settings.runtime_per_cost_s,
        online_window_s=settings.node_offline_after_s,
    )


def node_rules(settings: Settings) -> NodeRules:
    """The nodes' limits and honor rules from ``settings``."""
    return NodeRules(
        offline_after_s=settings.node_offline_after_s,
        online_interval_s=settings.online_interval_s,
        probation_checks=settings.probation_checks,
        honor_window_s=settings.online_honor_window_s,
        rewarded_nodes_per_account=settings.rewarded_nodes_per_account,
        max_nodes_per_account=settings.max_nodes_per_account,
        max_sessions_per_node=settings.max_sessions_per_node,
        max_files_per_account=settings.max_files_per_account,
    )


def model_registry(settings: Settings) -> ModelRegistry:
    """The registry of the models folder of ``settings`` (not scanned yet)."""
    return ModelRegistry(settings.models_dir, settings.cache_dir, allow_ckpt=settings.allow_ckpt)


def build_services(settings: Settings, *, on_queued: Callable[[], None] = lambda: None) -> Services:
    """Open (and migrate) the database, scan the models directory, and wire the services.

    Requests are resolved against :class:`NetworkModels`: this server's files, then those the
    online nodes report, so an API replica without a GPU needs no model files. ``on_queued``
    is called whenever this process queues (or re-queues) a task: ``dan serve`` wakes its
    worker with it."""
    metrics = Metrics(max_nodes=settings.metrics_max_nodes)
    opened = open_stores(settings, observer=metrics)
    db, store, blobs, registry, node_store = (
        opened.db,
        opened.tasks,
        opened.blobs,
        opened.registry,
        opened.nodes,
    )
    models = NetworkModels(registry, node_store)
    key = settings.public_api_key or public_api_key(settings.data_dir)
    accounts = build_accounts(settings, db, public_key=key)
    webhooks = WebhookService(SqlWebhookStore(db), settings)
    live = live_progress(settings, db)
    tasks = TaskService(
        store,
        blobs,
        models,
        settings,
        weight_of=accounts.weight_of,
        local_files=lambda: installed_hashes(registry),
        local_families=lambda: node_store.families(node_id_for(LOCAL_ACCOUNT, LOCAL_NODE_NAME)),
        webhooks=webhooks,
        on_queued=on_queued,
        live=live,
    )
    check_store = SqlCheckStore(db, online_window_s=settings.node_offline_after_s)
    checks = ResultChecks(check_store, node_store, blobs, settings)
    nodes = NodeService(node_store, store, blobs, registry.catalog, settings, checks, live=live)
    sign_in = SignInService(SqlAccountStore(db), SqlIdentityStore(db), settings)
    return Services(
        settings,
        db,
        store,
        blobs,
        registry,
        tasks,
        key,
        accounts,
        nodes,
        models,
        checks,
        sign_in,
        webhooks,
        ClientOptions(SqlClientOptionsStore(db)),
        session_secret(settings),
        metrics,
        live,
    )


def live_progress(settings: Settings, db: Engine) -> LiveProgress:
    """Nodes' progress in memory; on PostgreSQL also published to the other replicas."""
    publish = publisher(db, PROGRESS) if db.dialect.name == "postgresql" else None
    return LiveProgress(keep_s=settings.lease_s, publish=publish)


def build_accounts(settings: Settings, db: Engine, *, public_key: str | None) -> AccountService:
    """The account service over ``db``, with the built-in local and public accounts."""
    accounts = AccountService(SqlAccountStore(db), settings, public_key=public_key)
    accounts.ensure_built_in()
    return accounts


@contextlib.contextmanager
def account_services(settings: Settings) -> Iterator[AccountService]:
    """The account service alone, for admin commands: migrate, open, and close after."""
    migrate(settings.db_url)
    db = create_db_engine(settings.db_url)
    try:
        yield build_accounts(settings, db, public_key=None)
    finally:
        db.dispose()


def installed_hashes(registry: ModelRegistry) -> frozenset[str]:
    """The sha256 of every usable model file in ``registry``."""
    return frozenset(model.sha256 for kind in ModelKind for model in registry.list(kind))


def public_api_key(data_dir: Path) -> str:
    """The key handed to clients that ask for the public key (made once, then kept), unless
    ``public_api_key`` is set (as it must be, identically, on every replica of a network)."""
    path = data_dir / "public-api-key"
    if path.is_file():
        return path.read_text().strip()
    alphabet = string.ascii_letters + string.digits
    key = "sk-" + "".join(secrets.choice(alphabet) for _ in range(48))
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")
    return key


def session_secret(settings: Settings) -> str | None:
    """The key that signs sign-in sessions: ``session_secret`` if set (as it must be,
    identically, on every replica), else one made once and kept in the data dir; None while no
    sign-in provider is configured."""
    if not settings.sign_in_providers:
        return None
    if settings.session_secret:
        return settings.session_secret
    path = settings.data_dir / "session-secret"
    if path.is_file():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(48)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret
