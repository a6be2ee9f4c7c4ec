"""NodeService: the rules a node's requests follow.

A node belongs to the account that registered it and only that account's keys may speak for
it. It claims tasks as the worker ``node:<id>`` with an Offer of the model files it has
installed and the checkpoints it has loaded, and while it holds a task (and only then) it may
read that task's input images and upload its results, under keys ``<task id>/...``. A result
or failure from a node that no longer holds the task (its lease ran out and the task went to
another node) changes nothing and is answered with TaskNotHeld. Owners earn honor per completed
task and per interval online; the embedded worker's owner, the local account, earns none.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dan.config import Settings
from dan.domain import LOCAL_ACCOUNT, Account, ClaimedTask, TaskResult
from dan.errors import InvalidArgument, NodeNotFound, PermissionDenied, TaskNotHeld
from dan.models.catalog import Catalog
from dan.nodes.store import NodeRecord, NodeStore, PublicNode
from dan.storage import BlobStore
from dan.tasks.store import Heartbeat, Offer, Reward, TaskStore

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
SHA256 = re.compile(r"[0-9a-f]{64}")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_WAIT_S = 25.0  # longest claim long-poll; below common proxies' idle timeouts
MIN_POLL_S = 0.05  # a waiting claim looks at the queue at most this often
# With queue notifications (PostgreSQL's NOTIFY, see listen_for_queued_tasks), a waiting claim
# asks the database when a task was queued, and otherwise only this often, as a fallback.
NOTIFIED_POLL_S = 2.0
MAX_ERROR_CHARS = 2000
Gone = Callable[[], Awaitable[bool]]  # whether the claiming node hung up


@dataclass(frozen=True)
class NodeDescription:
    """What a node says of itself when it registers."""

    name: str
    capabilities: dict[str, Any]
    installed: frozenset[str]
    loaded: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Assignment:
    """The answer to a claim: a task to run (or None), and catalog models to download first."""

    task: ClaimedTask | None
    pull: tuple[str, ...] = ()


def node_worker_id(node_id: str) -> str:
    """The worker id under which a node holds its tasks."""
    return f"node:{node_id}"


def check_description(description: NodeDescription) -> NodeDescription:
    """The description, or InvalidArgument naming what is wrong with it."""
    if not NODE_NAME.fullmatch(description.name):
        raise InvalidArgument(
            "name must be 1 to 64 letters, digits, spaces, '.', '_' or '-', starting with a "
            f"letter or digit; got {description.name!r}"
        )
    for field, hashes in (("installed", description.installed), ("loaded", description.loaded)):
        bad = next((sha for sha in hashes if not SHA256.fullmatch(sha)), None)
        if bad is not None:
            raise InvalidArgument(
                f"{field} must list sha256 hashes (64 lower-case hex digits), got {bad!r}"
            )
    return description


class NodeService:
    """Registration, claims, leases, inputs and results of nodes; listings and pulls."""

    def __init__(
        self,
        nodes: NodeStore,
        tasks: TaskStore,
        blobs: BlobStore,
        catalog: Catalog,
        settings: Settings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nodes, self._tasks, self._blobs = nodes, tasks, blobs
        self._catalog = catalog
        self._settings = settings
        self._sleep, self._monotonic = sleep, monotonic
        # When each node's sighting was last written by this process (heartbeats come often).
        self._touched: dict[str, float] = {}
        # Bumped (from a listener thread) whenever any process queues a task; while a
        # listener is connected, waiting claims only query the database when it changes.
        self._queued = 0
        self.notified: threading.Event = threading.Event()
        self._touch_every_s = min(5.0, settings.node_offline_after_s / 4)

    # -- registration ------------------------------------------------------------------------
    def register(self, account: Account, description: NodeDescription) -> NodeRecord:
        """Create or refresh ``account``'s node of that name; the same name keeps its id."""
        check_description(description)
        node_id = self._nodes.register(
            account.id,
            description.name,
            description.capabilities,
            description.installed,
            description.loaded,
            honor_per_interval=self._online_rate(account.id),
        )
        self._touched[node_id] = self._monotonic()
        return self._get(node_id)

    def offline(self, account: Account, node_id: str) -> int:
        """The node stops: its tasks go back to the queue and it is listed offline at once.
        Returns how many tasks it held."""
        self.owned(account, node_id)
        released = self._tasks.release_worker(node_worker_id(node_id))
        self._nodes.mark_offline(node_id)
        self._touched.pop(node_id, None)
        return released

    # -- work --------------------------------------------------------------------------------
    async def claim(
        self,
        account: Account,
        node_id: str,
        *,
        loaded: Iterable[str] | None,
        wait_s: float,
        gone: Gone | None = None,
    ) -> Assignment:
        """The next task this node can run, waiting up to ``wait_s`` (at most MAX_WAIT_S) for
        one; catalog models an admin asked it to pull come first, without a task. Stops
        waiting early when ``gone`` says the node hung up."""
        node = await asyncio.to_thread(self._seen_now, account, node_id, loaded)
        if node.pull:
            return Assignment(None, await asyncio.to_thread(self._nodes.take_pulls, node_id))
        offer = Offer(node.installed, node.loaded, self._settings.affinity_lookahead)
        deadline = self._monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        interval = max(self._settings.poll_interval_s, MIN_POLL_S)
        seen, next_query = -1, 0.0
        while True:
            now = self._monotonic()
            if self._queued != seen or now >= next_query:
                seen = self._queued
                next_query = now + (NOTIFIED_POLL_S if self.notified.is_set() else 0.0)
                task = await asyncio.to_thread(self._claim_once, node_id, offer)
                if task is not None:
                    return Assignment(task)
            if now >= deadline:
                return Assignment(None)
            await self._sleep(interval)
            if gone is not None and await gone():
                return Assignment(None)

    def task_queued(self, _task_id: str = "") -> None:
        """Some process queued a task (called from the NOTIFY listener's thread)."""
        self._queued += 1  # a lost increment only delays a claim to the fallback poll

    def heartbeat(
        self, account: Account, node_id: str, task_id: str, progress: float | None
    ) -> Heartbeat:
        """Renew the node's lease on the task and record its progress: whether it still holds
        the task, and whether it should stop (cancelled, or no longer held)."""
        self._touch(self.owned(account, node_id))
        return self._tasks.heartbeat(
            task_id, node_worker_id(node_id), lease_s=self._settings.lease_s, progress=progress
        )

    def read_input(self, account: Account, node_id: str, task_id: str, key: str) -> bytes:
        """An input image of a task the node holds."""
        self._check_holds(account, node_id, task_id)
        if not key.startswith(f"{task_id}/"):
            raise InvalidArgument(f"key must name a file of task {task_id} ('{task_id}/...')")
        try:
            return self._blobs.get(key)
        except (KeyError, ValueError) as exc:
            raise InvalidArgument(f"task {task_id} has no input {key!r}") from exc

    def store_result(
        self, account: Account, node_id: str, task_id: str, key: str, data: bytes
    ) -> None:
        """Store a result image of a task the node holds, under ``<task id>/<n>.png``."""
        _check_result_key(task_id, key)
        if not data.startswith(PNG_SIGNATURE):
            raise InvalidArgument("a result must be a PNG file")
        self._check_holds(account, node_id, task_id)
        self._blobs.put(key, data)

    def complete(self, account: Account, node_id: str, task_id: str, result: TaskResult) -> None:
        """Record the task's success (its images uploaded first) and reward the node's owner;
        TaskNotHeld if the node no longer holds the task."""
        node = self.owned(account, node_id)
        for key in result.image_keys:
            _check_result_key(task_id, key)
        if len(result.seeds) not in (0, len(result.image_keys)):
            raise InvalidArgument("seeds must be empty or give one seed per image")
        self._check_uploaded(result.image_keys)
        reward = Reward(node.account, self._task_rate(node.account), node_id)
        if not self._tasks.complete(task_id, node_worker_id(node_id), result, reward=reward):
            raise _not_held(task_id, node.name)

    def fail(self, account: Account, node_id: str, task_id: str, error: str) -> None:
        """Record that the task failed on the node, with the node's message."""
        node = self.owned(account, node_id)
        message = error.strip()[:MAX_ERROR_CHARS] or "the task failed on the node"
        if not self._tasks.fail(task_id, node_worker_id(node_id), message):
            raise _not_held(task_id, node.name)

    # -- listings and pulls ------------------------------------------------------------------
    def list_public(self) -> list[PublicNode]:
        return self._nodes.list_public()

    def list_for(self, account: Account) -> list[NodeRecord]:
        return self._nodes.list_for(account.id)

    def request_pull(self, node_id: str, model: str) -> tuple[str, ...]:
        """Ask the node to download the catalog model ``model`` (verified by its sha256);
        returns the node's pending pulls."""
        entry = self._catalog.find(model)
        node = self._get(node_id)
        if any(sha in node.installed for sha in entry.hashes):
            raise InvalidArgument(f"node {node.name!r} already has {entry.name} installed")
        pending = self._nodes.request_pull(node_id, entry.name)
        if pending is None:
            raise NodeNotFound(f"no node with id {node_id!r}", nodeId=node_id)
        return pending

    def owned(self, account: Account, node_id: str) -> NodeRecord:
        """The node, which must belong to ``account``."""
        node = self._get(node_id)
        if node.account != account.id:
            raise PermissionDenied(f"node {node_id} belongs to another account")
        return node

    # -- helpers -----------------------------------------------------------------------------
    def _get(self, node_id: str) -> NodeRecord:
        node = self._nodes.get(node_id)
        if node is None:
            raise NodeNotFound(
                f"no node with id {node_id!r}; register it again (POST /api/node/register)",
                nodeId=node_id,
            )
        return node

    def _seen_now(self, account: Account, node_id: str, loaded: Iterable[str] | None) -> NodeRecord:
        node = self.owned(account, node_id)
        seen = self._nodes.seen(
            node_id, loaded=loaded, honor_per_interval=self._online_rate(node.account)
        )
        self._touched[node_id] = self._monotonic()
        return seen or node

    def _touch(self, node: NodeRecord) -> None:
        last = self._touched.get(node.id)
        if last is None or self._monotonic() - last >= self._touch_every_s:
            self._touched[node.id] = self._monotonic()
            self._nodes.seen(node.id, honor_per_interval=self._online_rate(node.account))

    def _claim_once(self, node_id: str, offer: Offer) -> ClaimedTask | None:
        return self._tasks.claim(
            node_worker_id(node_id), lease_s=self._settings.lease_s, offer=offer
        )

    def _check_holds(self, account: Account, node_id: str, task_id: str) -> None:
        # Asking the queue is renewing the lease: a node fetching or uploading is alive.
        node = self.owned(account, node_id)
        beat = self._tasks.heartbeat(
            task_id, node_worker_id(node_id), lease_s=self._settings.lease_s
        )
        if not beat.held:
            raise _not_held(task_id, node.name)

    def _check_uploaded(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                self._blobs.get(key)
            except KeyError as exc:
                raise InvalidArgument(
                    f"the result image {key} was not uploaded (PUT /api/node/result first)"
                ) from exc

    def _online_rate(self, owner: str) -> float:
        return 0.0 if owner == LOCAL_ACCOUNT else self._settings.honor_per_interval

    def _task_rate(self, owner: str) -> float:
        return 0.0 if owner == LOCAL_ACCOUNT else self._settings.honor_per_task


def _check_result_key(task_id: str, key: str) -> None:
    if not re.fullmatch(rf"{re.escape(task_id)}/\d{{1,4}}\.png", key):
        raise InvalidArgument(f"a result key must be '{task_id}/<n>.png', got {key!r}")


def _not_held(task_id: str, node_name: str) -> TaskNotHeld:
    return TaskNotHeld(
        f"node {node_name!r} no longer holds task {task_id} (its lease ran out and the task "
        "went back to the queue, or it finished elsewhere); this result was not recorded",
        taskId=task_id,
    )
