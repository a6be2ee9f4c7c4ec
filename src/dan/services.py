"""build_services(settings): the one place that wires DAN's parts together."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from dan.config import Settings
from dan.models.registry import ModelRegistry
from dan.storage import BlobStore, LocalBlobStore
from dan.tasks.db import create_db_engine, migrate
from dan.tasks.service import TaskService
from dan.tasks.store import SqlTaskStore, TaskStore


@dataclass
class Services:
    settings: Settings
    db: Engine
    store: TaskStore
    blobs: BlobStore
    registry: ModelRegistry
    tasks: TaskService
    public_api_key: str

    def close(self) -> None:
        self.db.dispose()


def build_services(settings: Settings) -> Services:
    """Open (and migrate) the database, scan the models directory, and wire the services."""
    migrate(settings.db_url)
    db = create_db_engine(settings.db_url)
    store = SqlTaskStore(db)
    blobs = LocalBlobStore(settings.results_dir)
    registry = ModelRegistry(
        settings.models_dir, settings.cache_dir, allow_ckpt=settings.allow_ckpt
    )
    registry.scan()
    tasks = TaskService(store, blobs, registry, settings)
    key = public_api_key(settings.data_dir)
    return Services(settings, db, store, blobs, registry, tasks, key)


def public_api_key(data_dir: Path) -> str:
    """The key handed to clients that ask for the public key (made once, then kept)."""
    path = data_dir / "public-api-key"
    if path.is_file():
        return path.read_text().strip()
    alphabet = string.ascii_letters + string.digits
    key = "sk-" + "".join(secrets.choice(alphabet) for _ in range(48))
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")
    return key
