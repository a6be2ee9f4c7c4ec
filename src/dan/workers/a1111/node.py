"""``dan node --backend a1111``: a node that runs its tasks on an AUTOMATIC1111 instance.

It is the ordinary node (dan.workers.node) with the A1111Engine and the instance's models.
While the instance is down, the node is not registered: it waits, trying again every few
seconds, and registers once the instance answers. When the instance dies under a task, the
engine raises A1111Unreachable, the worker loop stops, and the node goes offline, which hands
the task back to the server (one try of the task, as for any node that stops: another node may
take it, or this one once the instance is back); then it waits again. The instance's models are
read again every ``rescan_s``, and the node registers again when they change.
"""

from __future__ import annotations

import logging
import threading

from dan.config import Settings
from dan.domain import ModelFamily, ModelKind, TaskKind
from dan.errors import DanError
from dan.models.hashing import HashCache
from dan.workers.a1111.client import A1111Client, A1111Unreachable
from dan.workers.a1111.engine import A1111Engine
from dan.workers.a1111.inventory import A1111Inventory
from dan.workers.capabilities import checkpoint_families
from dan.workers.node import Node, stop_on_signals
from dan.workers.remote import NodeClient

log = logging.getLogger(__name__)

RETRY_S = 5.0  # how often a down instance is tried again
RESCAN_S = 60.0  # how often the instance's models are read again


class A1111Node:
    """The node process of the module docstring, until ``stop``."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        a1111: A1111Client,
        client: NodeClient,
        *,
        stop: threading.Event,
        retry_s: float = RETRY_S,
        rescan_s: float = RESCAN_S,
        idle_sleep_s: float = 0.05,
    ) -> None:
        self._settings, self._name, self._client, self._stop = settings, name, client, stop
        self._retry_s, self._rescan_s, self._idle_sleep_s = retry_s, rescan_s, idle_sleep_s
        self.inventory = A1111Inventory(a1111, HashCache(settings.cache_dir))
        self.engine = A1111Engine(a1111, self.inventory)
        self._url = a1111.url
        self._node: Node | None = None

    def run(self) -> None:
        """Serve until ``stop``; raises the DanError that made the node stop if the server
        refused it (e.g. PermissionDenied for a key that may not run nodes)."""
        threading.Thread(target=self._rescan_forever, name="a1111-rescan", daemon=True).start()
        try:
            while self._wait_for_instance():
                try:
                    self._serve()
                    return
                except A1111Unreachable as exc:
                    log.error("%s; its task went back to the server", exc.message)
        finally:
            self.engine.close()

    def _serve(self) -> None:
        self._node = Node(
            self._settings,
            self._name,
            self.engine,
            self._client,
            stop=self._stop,
            idle_sleep_s=self._idle_sleep_s,
            models=self.inventory,
            features=self._features,
            families=self._families,
        )
        try:
            self._node.run()
        finally:
            self._node = None

    def _features(self) -> tuple[TaskKind, ...]:
        """The task kinds the instance runs: detect needs its ControlNet extension."""
        return tuple(k for k in TaskKind if k != TaskKind.DETECT or self.inventory.has_controlnet)

    def _families(self) -> frozenset[ModelFamily]:
        """The families of the instance's checkpoints (it runs what it has; its memory is its
        own business), narrowed by DAN_NODE_FAMILIES."""
        only = {ModelFamily(name) for name in self._settings.node_family_names}
        held = checkpoint_families(self.inventory)
        return held & only if only else held

    def _wait_for_instance(self) -> bool:
        """Read the instance's models once it answers; False if the node stops first."""
        said = False
        while not self._stop.is_set():
            try:
                self.inventory.refresh()
                self.engine.read_loaded()
            except A1111Unreachable as exc:
                if not said:
                    log.warning("%s; waiting for it", exc.message)
                    said = True
                self._stop.wait(self._retry_s)
                continue
            self._say_what_it_has()
            return True
        return False

    def _say_what_it_has(self) -> None:
        counts = {kind.value: len(self.inventory.list(kind)) for kind in ModelKind}
        log.info("the instance at %s answers; it has %s", self._url, counts)

    def _rescan_forever(self) -> None:
        while not self._stop.wait(self._rescan_s):
            node = self._node
            try:
                changed = self.inventory.refresh()
            except DanError as exc:  # down or confused: the next task will tell
                log.debug("could not read the instance's models: %s", exc.message)
                continue
            if changed and node is not None:
                log.info("the instance's models changed; registering them")
                node.queue.refresh()


def run_a1111_node(settings: Settings, server: str, api_key: str, name: str) -> None:
    """Serve ``server`` as the node ``name`` of the key's account through the instance at
    ``settings.a1111_url`` until SIGTERM/SIGINT."""
    stop = stop_on_signals()
    a1111 = A1111Client(
        settings.a1111_url,
        user=settings.a1111_user,
        password=settings.a1111_password,
        api_key=settings.a1111_api_key,
    )
    client = NodeClient(server, api_key, stop=stop)
    try:
        A1111Node(settings, name, a1111, client, stop=stop).run()
    finally:
        client.close()
        a1111.close()
