"""The worker process that shares the server's database (``dan worker``).

It is a node like the remote ones, owned by the local account and named ``local``: its row in
the nodes table says what it has installed (by sha256, with kind and name) and loaded, so the
server knows which models are served, resolves requests against them and counts queue
positions right, and it claims with that Offer (only tasks whose files it has, preferring its
loaded checkpoint). Each process opens a session of its own, so two workers on one data dir
never hand back each other's tasks; ``dan serve`` names the session of the worker it
supervises and hands back what it held when it dies. It earns no honor. Its claims and runs are
counted by its own dan.metrics.Metrics, with its device memory (each time the node row is
refreshed); under ``dan serve`` they reach the server's /metrics through the shared folder of
dan.metrics.processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from types import FrameType

from dan.config import Settings
from dan.db.notify import QUEUED, NotifyListener
from dan.domain import LOCAL_ACCOUNT, LOCAL_NODE_NAME, ClaimedTask, TaskResult
from dan.engine.base import Engine, load_engine
from dan.metrics.families import Metrics
from dan.metrics.processes import forget_process
from dan.models.registry import ModelRegistry
from dan.nodes.store import NodeStore, Session, node_id_for, session_worker_id
from dan.pids import alive
from dan.services import Stores, open_stores
from dan.tasks.base import Heartbeat, Offer, Reward, TaskStore
from dan.workers.capabilities import (
    capabilities,
    installed_files,
    loaded_checkpoints,
    runnable_families,
)
from dan.workers.loop import Worker
from dan.workers.memory import device_memory

log = logging.getLogger(__name__)
REFRESH_S = 5.0  # how often the node row is refreshed (and the models folder rescanned)
PARENT_S = 0.5  # how often the parent id is read when stdin is no pipe from the server


LOCAL_NODE_ID = node_id_for(LOCAL_ACCOUNT, LOCAL_NODE_NAME)


def local_worker_id(session_id: str) -> str:
    """The worker id of the local node's session ``session_id``."""
    return session_worker_id(LOCAL_NODE_ID, session_id)


def local_session_id(owner_pid: int | None = None) -> str:
    """A new session id of the local node that names its host and the process that owns it
    (the server supervising the worker, or the worker itself), so that a later start on this
    host can tell that a session's owner died and hand back its tasks at once (see
    :func:`orphaned`) instead of after their leases."""
    host = socket.gethostname().replace(":", "-")[:32]
    return f"{host}:{owner_pid or os.getpid()}:{uuid.uuid4().hex[:12]}"


def orphaned(sessions: Iterable[Session]) -> list[Session]:
    """The sessions whose owning process ran on this host and is gone."""
    host = socket.gethostname().replace(":", "-")[:32]
    found = []
    for session in sessions:
        owner_host, _, rest = session.id.partition(":")
        pid = rest.partition(":")[0]
        if owner_host == host and pid.isdigit() and not alive(int(pid)):
            found.append(session)
    return found


class ParentWatch:
    """Watches the supervising server from a thread: through the pipe from it on stdin (``fd``)
    or, when ``fd`` is no pipe (``/dev/null``, a file: nothing to wait on, and epoll refuses
    them), through this process's parent id every ``poll_s``, which changes when the parent
    dies.

    Each byte the server writes sets ``wake`` (it queued a task); end of file, or a new
    parent, the server gone however it died, sets ``gone`` and ``wake``. The thread waits in
    select() on the pipe (if any) and on a pipe of its own that :meth:`close` writes to, so it
    ends before the interpreter does: a thread left blocked in a read of stdin at exit killed
    the worker with "Fatal Python error: _enter_buffered_busy"."""

    def __init__(
        self, fd: int, gone: threading.Event, wake: threading.Event, *, poll_s: float = PARENT_S
    ) -> None:
        self._fd, self._gone, self._wake, self._poll_s = fd, gone, wake, poll_s
        self._parent = os.getppid()
        self._closing_r, self._closing_w = os.pipe()
        self._thread = threading.Thread(target=self._watch, name="parent-watch", daemon=True)

    def start(self) -> ParentWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        """End the thread and wait for it."""
        os.write(self._closing_w, b"x")
        self._thread.join()
        os.close(self._closing_r)
        os.close(self._closing_w)

    def _watch(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._closing_r, selectors.EVENT_READ)
            piped = self._register(selector)
            while True:
                ready = {key.fd for key, _ in selector.select(None if piped else self._poll_s)}
                if self._closing_r in ready:
                    return
                if (self._fd in ready and not self._read()) or os.getppid() != self._parent:
                    log.warning("the server process is gone; the worker exits")
                    self._gone.set()
                    self._wake.set()
                    return

    def _register(self, selector: selectors.BaseSelector) -> bool:
        """Watch ``fd`` in ``selector`` if it is a pipe (or socket); whether it is."""
        try:
            mode = os.fstat(self._fd).st_mode
            if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                raise OSError(f"fd {self._fd} is no pipe")
            selector.register(self._fd, selectors.EVENT_READ)
        except OSError as exc:
            log.info("stdin cannot tell when the server goes (%s); watching its pid", exc)
            return False
        return True

    def _read(self) -> bool:
        """Read what the server wrote; False at end of file."""
        try:
            data = os.read(self._fd, 4096)
        except OSError:
            return False
        if data:
            self._wake.set()
        return bool(data)


def queue_notices(
    opened: Stores, database_url: str, wake: threading.Event
) -> NotifyListener | None:
    """On PostgreSQL, a started listener that sets ``wake`` whenever any process queues a task
    (or hands one back); None on SQLite, which has no NOTIFY."""
    if opened.db.dialect.name != "postgresql":
        return None
    return NotifyListener(database_url, lambda _task_id: wake.set(), channel=QUEUED).start()


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
        session_id: str | None = None,
        refresh_s: float = REFRESH_S,
        monotonic: Callable[[], float] = time.monotonic,
        families: Iterable[str] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self._store, self._nodes = store, nodes
        self._metrics = metrics
        self._device = engine.describe().get("device", "cpu")
        self._registry, self._engine = registry, engine
        self._lookahead, self._refresh_s = lookahead, refresh_s
        self._monotonic = monotonic
        # The families its engine has the memory for (narrowed to ``families`` if given).
        self._families = runnable_families(engine, families)
        self._refreshed = -float("inf")
        self.session_id = session_id or local_session_id()
        self.session: Session | None = None

    @property
    def node_id(self) -> str:
        return LOCAL_NODE_ID

    @property
    def worker_id(self) -> str:
        return local_worker_id(self.session_id)

    def register(self) -> Session:
        """Write the node row and its files (a rescan of the models folder first), in this
        process's session; returns the session."""
        self._registry.scan()
        self.session = self._nodes.register(
            LOCAL_ACCOUNT,
            LOCAL_NODE_NAME,
            capabilities(self._engine, families=self._families),
            installed_files(self._registry, limit=sys.maxsize),
            loaded_checkpoints(self._engine),
            session_id=self.session_id,
            families=self._families,
        )
        self._refreshed = self._monotonic()
        self._count_memory()
        return self.session

    def _count_memory(self) -> None:
        if self._metrics is None:
            return
        device = self._device if self._device.startswith("cuda") else "cpu"
        used, total = device_memory(device)
        self._metrics.set_device_memory(device, used, total)

    def claim(
        self, worker_id: str, *, lease_s: float, like: str | None = None
    ) -> ClaimedTask | None:
        """The next task for this node's Offer: one at a time (slots=1), or, ``like`` a batch
        key, one more for the batch the worker is gathering (the worker bounds the batch by
        its engine's limit)."""
        if like is None and self._monotonic() - self._refreshed >= self._refresh_s:
            self.register()  # picks up model files added (or removed) since
        loaded = loaded_checkpoints(self._engine)
        slots = 1 if like is None else None
        offer = Offer(self.node_id, LOCAL_ACCOUNT, loaded, self._lookahead, slots=slots)
        return self._store.claim(self.worker_id, lease_s=lease_s, offer=offer, like=like)

    def heartbeat(
        self,
        task_id: str,
        worker_id: str,
        *,
        lease_s: float,
        progress: float | None = None,
        preview: bytes | None = None,
    ) -> Heartbeat:
        if self._monotonic() - self._refreshed >= self._refresh_s:
            # A long task must not make the node look offline; no rescan in the middle of it.
            self._refreshed = self._monotonic()
            seen = self._nodes.seen(
                self.node_id, session_id=self.session_id, loaded=loaded_checkpoints(self._engine)
            )
            if seen is None:
                self._refreshed = -float("inf")  # the row is gone: register at the next claim
            self._count_memory()
        return self._store.heartbeat(
            task_id, self.worker_id, lease_s=lease_s, progress=progress, preview=preview
        )

    def complete(self, task_id: str, worker_id: str, result: TaskResult) -> bool:
        reward = Reward(LOCAL_ACCOUNT, 0.0, self.node_id, work=False)
        return self._store.complete(task_id, self.worker_id, result, reward=reward)

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        return self._store.fail(task_id, self.worker_id, error)

    def stop(self) -> int:
        """This process stops: hand back what it holds and end its session."""
        released = self._store.release_worker(self.worker_id)
        self._nodes.end_session(self.session_id)
        return released


def run_local_worker(
    settings: Settings,
    *,
    engine: Engine | None = None,
    session_id: str | None = None,
    watch_stdin: bool = False,
) -> None:
    """Serve tasks from the database of ``settings`` until SIGTERM/SIGINT (after the task in
    hand) or, with ``watch_stdin``, until the server is gone (see :class:`ParentWatch`; at
    once: the task in hand stops at its next step, no one being left to want it soon), in the
    session ``session_id`` (a new one if None); then hand back what it holds.

    Idle, it waits to be woken (a NOTIFY on PostgreSQL, a byte on stdin from its server) and
    looks at the queue every ``worker_idle_poll_s`` anyway, for what no one announces (a
    models folder that changed); with no way to be woken it polls every ``poll_interval_s``."""
    stop, wake, gone = threading.Event(), threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: the worker stops after the current task", signum)
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with contextlib.ExitStack() as cleanup:
        if watch_stdin:
            cleanup.callback(ParentWatch(sys.stdin.fileno(), gone, wake).start().close)
        metrics = Metrics(max_nodes=settings.metrics_max_nodes)
        opened = open_stores(settings, observer=metrics)
        listener = queue_notices(opened, settings.db_url, wake)
        if listener is not None:
            cleanup.callback(listener.stop)
        woken = watch_stdin or listener is not None
        idle_s = settings.worker_idle_poll_s if woken else settings.poll_interval_s
        _serve(settings, opened, metrics, engine, session_id, stop, wake, gone, idle_s)


def _serve(
    settings: Settings,
    opened: Stores,
    metrics: Metrics,
    engine: Engine | None,
    session_id: str | None,
    stop: threading.Event,
    wake: threading.Event,
    gone: threading.Event,
    idle_s: float,
) -> None:
    for session in orphaned(opened.nodes.sessions_of(LOCAL_NODE_ID)):
        released = opened.tasks.release_worker(session.worker_id)
        opened.nodes.end_session(session.id)
        log.warning("handed back %d task(s) of a worker that died (%s)", released, session.id)
    engine = engine or load_engine(settings)
    log.info("engine: %s", engine.describe())
    queue = LocalNodeQueue(
        opened.tasks,
        opened.nodes,
        opened.registry,
        engine,
        lookahead=settings.affinity_lookahead,
        session_id=session_id,
        families=settings.node_family_names,
        metrics=metrics,
    )
    queue.register()
    worker = Worker(
        queue,
        engine,
        opened.registry,
        opened.blobs,
        worker_id=queue.worker_id,
        lease_s=settings.lease_s,
        idle_sleep_s=idle_s,
    )
    try:
        worker.run(stop, wake, abandon=gone)
    finally:
        released = queue.stop()
        forget_process(os.getpid())
        log.info("worker %s stopped; handed back %d task(s)", queue.worker_id, released)
