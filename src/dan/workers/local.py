"""The worker process that shares the server's database (``dan worker``).

It is a node like the remote ones, owned by the local account and named ``local``: its row in
the nodes table says what it has installed (by sha256, and by kind and name in its
capabilities) and loaded, so the server knows which models are served, resolves requests
against them and counts queue positions right, and it claims with that Offer (only tasks whose files
it has, preferring its loaded checkpoint). It earns no honor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from dan.config import Settings
from dan.domain import LOCAL_ACCOUNT, ClaimedTask, TaskResult
from dan.engine.base import Engine, load_engine
from dan.models.registry import ModelRegistry
from dan.nodes.store import NodeStore
from dan.services import open_stores
from dan.tasks.store import Heartbeat, Offer, Reward, TaskStore
from dan.workers.capabilities import capabilities, installed_hashes, loaded_checkpoints
from dan.workers.loop import Worker

log = logging.getLogger(__name__)
LOCAL_NODE_NAME = "local"
REFRESH_S = 5.0  # how often the node row is refreshed (and the models folder rescanned)


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


class LocalNodeQueue:
    """The embedded worker's WorkQueue: the TaskStore, claimed with this worker's Offer, and
    its node row kept fresh. Completions count on the node (a reward of 0 honor)."""

    def __init__(
        self,
        store: TaskStore,
        nodes: NodeStore,
        registry: ModelRegistry,
        engine: Engine,
        *,
        lookahead: int,
        refresh_s: float = REFRESH_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store, self._nodes = store, nodes
        self._registry, self._engine = registry, engine
        self._lookahead, self._refresh_s = lookahead, refresh_s
        self._monotonic = monotonic
        self._installed: frozenset[str] = frozenset()
        self._refreshed = -float("inf")
        self.node_id = ""

    def register(self) -> str:
        """Write the node row (a rescan of the models folder first); returns the node id."""
        self._registry.scan()
        self._installed = installed_hashes(self._registry)
        self.node_id = self._nodes.register(
            LOCAL_ACCOUNT,
            LOCAL_NODE_NAME,
            capabilities(self._engine, self._registry),  # no HTTP limit on this path
            self._installed,
            loaded_checkpoints(self._engine),
        )
        self._refreshed = self._monotonic()
        return self.node_id

    def claim(self, worker_id: str, *, lease_s: float) -> ClaimedTask | None:
        if self._monotonic() - self._refreshed >= self._refresh_s:
            self.register()  # picks up model files added (or removed) since
        loaded = loaded_checkpoints(self._engine)
        offer = Offer(self._installed, loaded, self._lookahead)
        return self._store.claim(worker_id, lease_s=lease_s, offer=offer)

    def heartbeat(
        self, task_id: str, worker_id: str, *, lease_s: float, progress: float | None = None
    ) -> Heartbeat:
        if self._monotonic() - self._refreshed >= self._refresh_s:
            # A long task must not make the node look offline; no rescan in the middle of it.
            self._refreshed = self._monotonic()
            if self._nodes.seen(self.node_id, loaded=loaded_checkpoints(self._engine)) is None:
                self._refreshed = -float("inf")  # the row is gone: register at the next claim
        return self._store.heartbeat(task_id, worker_id, lease_s=lease_s, progress=progress)

    def complete(self, task_id: str, worker_id: str, result: TaskResult) -> bool:
        reward = Reward(LOCAL_ACCOUNT, 0.0, self.node_id or None)
        return self._store.complete(task_id, worker_id, result, reward=reward)

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        return self._store.fail(task_id, worker_id, error)


def run_local_worker(settings: Settings, *, engine: Engine | None = None) -> None:
    """Serve tasks from the database of ``settings`` until SIGTERM/SIGINT."""
    opened = open_stores(settings)
    store, nodes, registry = opened.tasks, opened.nodes, opened.registry
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
    queue = LocalNodeQueue(store, nodes, registry, engine, lookahead=settings.affinity_lookahead)
    node_id = queue.register()
    worker = Worker(
        queue,
        engine,
        registry,
        opened.blobs,
        worker_id=worker_id,
        lease_s=settings.lease_s,
        idle_sleep_s=settings.poll_interval_s,
    )
    try:
        worker.run(stop)
    finally:
        nodes.mark_offline(node_id)
