"""``dan node``: a machine with a GPU serving a DAN server over HTTP(S), as a remote node.

The node registers what it is and has (device, memory, the sha256 of every installed model
file, the same files by kind and name so that the server resolves requests against them, the
checkpoints it holds loaded), then runs the same worker loop as the embedded worker
on a RemoteQueue: it long-polls for a task, renews its lease and streams progress while it
runs, fetches the task's input images and uploads its results. Catalog models an admin asks
it to pull are downloaded in the background (verified by sha256) and the node registers again
with them. SIGTERM or Ctrl-C stops it after the current task (a second Ctrl-C at once); it
then tells the server, which puts back anything it still held.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType

import httpx

from dan.config import Settings
from dan.domain import ModelFamily, TaskKind
from dan.engine.base import Engine, load_engine
from dan.errors import DanError
from dan.models.download import pull
from dan.models.registry import ModelRegistry
from dan.models.sources import DownloadSources
from dan.nodes.sessions import NodeDescription
from dan.services import model_registry
from dan.tasks.order_models import ModelLookup
from dan.workers.capabilities import (
    capabilities,
    installed_files,
    loaded_checkpoints,
    runnable_families,
)
from dan.workers.loop import Worker
from dan.workers.remote import NodeClient, RemoteFiles, RemoteQueue

log = logging.getLogger(__name__)


class Puller:
    """Downloads requested catalog models one at a time in a background thread, then rescans
    the models folder and calls ``on_installed`` (so the node registers again)."""

    def __init__(
        self,
        registry: ModelRegistry,
        on_installed: Callable[[], None],
        sources: DownloadSources | None = None,
    ) -> None:
        self._registry = registry
        self._on_installed = on_installed
        self._sources = sources  # the mirror and tokens of the node's settings
        self._wanted: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pull_forever, name="puller", daemon=True)

    def request(self, names: tuple[str, ...]) -> None:
        for name in names:
            self._wanted.put(name)
        if not self._thread.is_alive():
            self._thread.start()

    def _pull_forever(self) -> None:
        while True:
            name = self._wanted.get()
            try:
                self.pull_one(name)
            except DanError as exc:
                log.error("could not pull %s: %s", name, exc.message)
            except Exception:
                log.exception("could not pull %s", name)

    def pull_one(self, name: str) -> None:
        entry = self._registry.catalog.find(name)
        log.info("pulling %s as the server asked", entry.name)
        path = pull(
            entry,
            self._registry.models_dir,
            progress=False,
            hashes=self._registry.hashes,
            sources=self._sources,
        )
        self._registry.scan()
        self._on_installed()
        log.info("installed %s (%s)", path, entry.sha256[:10])


class Node:
    """One node: its models, engine, connection and worker loop (see the module docstring).

    Its models are the settings' models folder, which admins may ask it to pull into, unless
    ``models`` says what it has some other way (an AUTOMATIC1111 instance's models), when it
    pulls nothing; ``features`` are the task kinds its engine runs, ``families`` the model
    families (by default those its device has the memory for, narrowed by the settings)."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        engine: Engine,
        client: NodeClient,
        *,
        stop: threading.Event,
        idle_sleep_s: float = 0.05,
        models: ModelLookup | None = None,
        features: Callable[[], Iterable[TaskKind]] = lambda: tuple(TaskKind),
        families: Callable[[], Iterable[ModelFamily]] | None = None,
    ) -> None:
        self._name, self._engine, self._client, self._stop = name, engine, client, stop
        self._features = features
        self._families = families or (lambda: runnable_families(engine, settings.node_family_names))
        on_pull: Callable[[tuple[str, ...]], None] = _cannot_pull
        if models is None:
            registry = model_registry(settings)
            registry.scan()
            sources = DownloadSources.from_settings(settings)
            puller = Puller(registry, lambda: self.queue.refresh(), sources)
            models, on_pull = registry, puller.request
        self._models = models
        self.queue = RemoteQueue(
            client,
            self.describe,
            stop=stop,
            loaded=lambda: loaded_checkpoints(engine),
            on_pull=on_pull,
        )
        self._idle_sleep_s = idle_sleep_s

    def describe(self) -> NodeDescription:
        """What the node registers: read afresh each time (models may have been pulled)."""
        families = frozenset(self._families())
        return NodeDescription(
            self._name,
            capabilities(self._engine, self._features(), families),
            installed_files(self._models),
            loaded_checkpoints(self._engine),
            families=families,
        )

    def run(self) -> None:
        """Register, then serve until ``stop``; raises the DanError that made the node stop
        if the server refused it (e.g. PermissionDenied for a key that may not run nodes)."""
        session = self.queue.register()
        worker = Worker(
            self.queue,
            self._engine,
            self._models,
            RemoteFiles(self._client, lambda: self.queue.session),
            worker_id=session.worker_id,
            lease_s=session.lease_s,
            idle_sleep_s=self._idle_sleep_s,
        )
        try:
            worker.run(self._stop)
        finally:
            self.queue.close()
            self._say_offline()
        if self.queue.fatal is not None:
            raise self.queue.fatal

    def _say_offline(self) -> None:
        if self.queue.session is None:
            return
        try:
            released = self._client.offline(self.queue.session)
        except DanError as exc:
            log.warning("could not tell the server this node stops: %s", exc.message)
            return
        log.info("node stopped%s", f"; {released} task(s) handed back" if released else "")


def _cannot_pull(names: tuple[str, ...]) -> None:
    log.warning(
        "the server asks this node to download %s; a node serving an AUTOMATIC1111 instance "
        "downloads nothing: put the file in the instance's models folder",
        ", ".join(names),
    )


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT sets (the node stops after its current task); the
    second signal stops the process at once."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: the node stops after the current task (again to stop now)", signum)
        signal.signal(signum, signal.SIG_DFL)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat
    return stop


def run_node(settings: Settings, server: str, api_key: str, name: str) -> None:
    """Serve ``server`` as the node ``name`` of the key's account until SIGTERM/SIGINT."""
    stop = stop_on_signals()
    engine = load_engine(settings)
    log.info("engine: %s", engine.describe())
    client = NodeClient(server, api_key, stop=stop)
    try:
        Node(settings, name, engine, client, stop=stop).run()
    except httpx.InvalidURL as exc:
        raise DanError(f"invalid server URL {server!r}: {exc}") from exc
    finally:
        client.close()
