"""The worker process that shares the server's database (``dan worker``)."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType

from dan.config import Settings
from dan.engine.base import Engine, load_engine
from dan.models.registry import ModelRegistry
from dan.storage import LocalBlobStore
from dan.tasks.db import create_db_engine, migrate
from dan.tasks.store import SqlTaskStore
from dan.workers.loop import Worker

log = logging.getLogger(__name__)


def local_worker_id(settings: Settings) -> str:
    """Stable across restarts of the same server, so a restart can reclaim what it held."""
    where = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}:{where}:local"


def exit_when_parent_dies() -> None:
    """Exit as soon as stdin closes (the supervising server is gone, however it died)."""

    def watch() -> None:
        sys.stdin.buffer.read()
        log.warning("the server process is gone; the worker exits")
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_local_worker(settings: Settings, *, engine: Engine | None = None) -> None:
    """Serve tasks from the database of ``settings`` until SIGTERM/SIGINT."""
    migrate(settings.db_url)
    store = SqlTaskStore(create_db_engine(settings.db_url))
    registry = ModelRegistry(
        settings.models_dir, settings.cache_dir, allow_ckpt=settings.allow_ckpt
    )
    registry.scan()
    worker_id = local_worker_id(settings)
    released = store.release_worker(worker_id)
    if released:
        log.warning("re-queued %d task(s) this worker held before it restarted", released)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: the worker stops after the current task", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine = engine or load_engine(settings)
    log.info("engine: %s", engine.describe())
    worker = Worker(
        store,
        engine,
        registry,
        LocalBlobStore(settings.results_dir),
        worker_id=worker_id,
        lease_s=settings.lease_s,
        idle_sleep_s=settings.poll_interval_s,
    )
    worker.run(stop)
