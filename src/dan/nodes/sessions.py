"""A node's registration and sessions, and who may speak for it: the base of NodeService.

A node belongs to the account that registered it and only that account's keys may speak for
it. Each registration opens a session (one running process, holding at most the ``slots``
tasks it declared); when the process stops, or is not heard from for the offline limit, its
session ends and the tasks it held go back to the queue, each counting a try. Each sighting
pays the node's owner online honor by the store's rules (dan.nodes.honor); the embedded
worker's owner, the local account, earns none. Heartbeats come often, so a process writes a
session's sighting only every few seconds.

:class:`NodeSessions` holds the stores, the settings and the bookkeeping every part of the
service shares; dan.nodes.service builds NodeService from it and the parts that claim tasks
(dan.nodes.claims) and run them (dan.nodes.runs).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dan.config import Settings
from dan.domain import LOCAL_ACCOUNT, Account, ModelFamily
from dan.errors import NodeNotFound, NodeSuspect, PermissionDenied, SessionEnded
from dan.models.catalog import Catalog
from dan.nodes.checks import ResultChecks
from dan.nodes.store import NodeFile, NodeRecord, NodeStore, Session, session_worker_id
from dan.nodes.wakeups import ClaimWakeups
from dan.storage import BlobStore
from dan.tasks.base import TaskStore
from dan.tasks.live import LiveProgress


@dataclass(frozen=True)
class NodeDescription:
    """What a node says of itself when it registers."""

    name: str
    capabilities: dict[str, Any]
    files: tuple[NodeFile, ...] = ()
    loaded: frozenset[str] = frozenset()
    slots: int = 1
    # The model families it runs and has the memory for; None: it does not say (a node from
    # before families), which the server takes as SD 1.x only.
    families: frozenset[ModelFamily] | None = None


class NodeSessions:
    """A node's registration and sessions, and the state the parts of NodeService share."""

    def __init__(
        self,
        nodes: NodeStore,
        tasks: TaskStore,
        blobs: BlobStore,
        catalog: Catalog,
        settings: Settings,
        checks: ResultChecks,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        live: LiveProgress | None = None,
    ) -> None:
        self._nodes, self._tasks, self._blobs = nodes, tasks, blobs
        # Heartbeats' progress and previews, for watchers: not a database write per beat.
        self._live = live or LiveProgress(keep_s=settings.lease_s)
        self._checks = checks
        self._catalog = catalog
        self._settings = settings
        self._sleep, self._monotonic = sleep, monotonic
        # When each session's sighting was last written by this process (heartbeats come often).
        self._touched: dict[str, float] = {}
        # Claims waiting in this process, by session and by account (each bounded).
        self._waiting: Counter[str] = Counter()
        self._waiting_lock = threading.Lock()
        # While a listener is connected (``notified``), a queued task wakes one waiting claim.
        self._wakeups = ClaimWakeups(monotonic=monotonic)
        self.notified: threading.Event = threading.Event()
        # Claims (and their connections) get threads of their own, so that however many wait,
        # heartbeats, completes, status and submits never queue behind them.
        self._claim_pool = ThreadPoolExecutor(settings.claim_threads, thread_name_prefix="claim")
        self._touch_every_s = min(5.0, settings.node_offline_after_s / 4)

    # -- registration ------------------------------------------------------------------------
    def register(self, account: Account, description: NodeDescription) -> Session:
        """Create or refresh ``account``'s node of that name (the same name keeps its id) and
        open a session for the process that registers."""
        session = self._nodes.register(
            account.id,
            description.name,
            description.capabilities,
            description.files,
            description.loaded,
            slots=description.slots,
            honor_per_interval=self._online_rate(account.id),
            families=description.families,
        )
        self._touched[session.id] = self._monotonic()
        return session

    def offline(self, account: Account, node_id: str, session_id: str) -> int:
        """The process stops: its tasks go back to the queue (each counts a try) and the node
        is listed offline unless another process serves it. Returns how many it held."""
        session = self.session(account, node_id, session_id)
        return self.end_session(session.node_id, session.id)

    def end_session(self, node_id: str, session_id: str) -> int:
        """The process of ``session_id`` stopped or died (its supervisor says so): hand back
        what it held (each counts a try) and end the session. Returns how many it held."""
        released = self._tasks.release_worker(session_worker_id(node_id, session_id))
        self._nodes.end_session(session_id)
        self._touched.pop(session_id, None)
        return released

    def sessions_of(self, node_id: str) -> list[Session]:
        return self._nodes.sessions_of(node_id)

    def expire_sessions(self) -> int:
        """End the sessions of processes not heard from for the offline limit, handing back
        what they held; returns how many tasks went back."""
        released = 0
        for session in self._nodes.expire_sessions():
            released += self._tasks.release_worker(session.worker_id)
            self._touched.pop(session.id, None)
        return released

    # -- who may speak for a node ------------------------------------------------------------
    def owned(self, account: Account, node_id: str) -> NodeRecord:
        """The node, which must belong to ``account``."""
        node = self._get(node_id)
        if node.account != account.id:
            raise PermissionDenied(f"node {node_id} belongs to another account")
        return node

    def session(self, account: Account, node_id: str, session_id: str) -> Session:
        """The live session ``session_id`` of ``account``'s node ``node_id``."""
        session = self._nodes.session(session_id)
        if session is None or session.node_id != node_id:
            self.owned(account, node_id)  # a foreign or unknown node says so first
            raise SessionEnded(
                f"session {session_id!r} of node {node_id} is over (the process stopped or was "
                "silent too long); register again (POST /api/node/register)",
                nodeId=node_id,
            )
        if session.account != account.id:
            raise PermissionDenied(f"node {node_id} belongs to another account")
        return session

    # -- helpers -----------------------------------------------------------------------------
    def _get(self, node_id: str) -> NodeRecord:
        node = self._nodes.get(node_id)
        if node is None:
            raise NodeNotFound(
                f"no node with id {node_id!r}; register it again (POST /api/node/register)",
                nodeId=node_id,
            )
        return node

    def _seen_now(self, session: Session, loaded: Iterable[str] | None) -> NodeRecord:
        """Record that the session's node is alive; NodeSuspect if it may not work."""
        node = self._nodes.seen(
            session.node_id,
            session_id=session.id,
            loaded=loaded,
            honor_per_interval=self._online_rate(session.account),
        )
        if node is None:
            raise NodeNotFound(f"no node with id {session.node_id!r}", nodeId=session.node_id)
        self._touched[session.id] = self._monotonic()
        if node.suspect:
            raise NodeSuspect(
                f"node {node.name!r} is suspect ({node.suspect_reason}); an admin must clear it",
                nodeId=node.id,
            )
        return node

    def _touch(self, session: Session) -> None:
        last = self._touched.get(session.id)
        if last is None or self._monotonic() - last >= self._touch_every_s:
            self._touched[session.id] = self._monotonic()
            self._nodes.seen(
                session.node_id,
                session_id=session.id,
                honor_per_interval=self._online_rate(session.account),
            )

    def _online_rate(self, owner: str) -> float:
        return 0.0 if owner == LOCAL_ACCOUNT else self._settings.honor_per_interval
