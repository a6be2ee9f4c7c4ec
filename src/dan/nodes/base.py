"""The nodes' seam: NodeStore, the values it takes and returns, and the rules it keeps.

:class:`dan.nodes.store.SqlNodeStore` implements it on SQL; the services depend on this module.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dan.domain import ModelFamily, ModelKind

NODE_NAMESPACE = uuid.UUID("5b0f6f43-3c4e-4d0c-9a57-3f1e8f0c2d11")


@dataclass(frozen=True)
class NodeRules:
    """The store's limits and honor rules (see the module docstring)."""

    offline_after_s: float = 60.0
    online_interval_s: float = 600.0
    probation_checks: int = 3
    honor_window_s: float = 3600.0
    rewarded_nodes_per_account: int = 4
    max_nodes_per_account: int = 32
    max_sessions_per_node: int = 4
    max_files_per_account: int = 100_000


@dataclass(frozen=True)
class NodeFile:
    """A file a node has installed: its sha256 and, when the node describes it, its kind,
    model name and file name (which requests may name), and the family it read from it."""

    sha256: str
    kind: ModelKind | None = None
    name: str | None = None
    file: str | None = None
    size: int | None = None
    family: ModelFamily | None = None


@dataclass(frozen=True)
class Session:
    """One running process of a node, and the worker id it holds tasks under."""

    id: str
    node_id: str
    account: str
    slots: int

    @property
    def worker_id(self) -> str:
        return session_worker_id(self.node_id, self.id)


@dataclass(frozen=True)
class NodeRecord:
    """A node as stored. Times are UNIX seconds; ``online`` is computed when read."""

    id: str
    account: str
    name: str
    capabilities: dict[str, Any]
    loaded: frozenset[str]
    pull: tuple[str, ...]
    tasks_done: int
    registered_at: float
    last_seen_at: float
    rewarded_until: float
    online: bool
    checks_passed: int = 0
    checks_failed: int = 0
    worked_at: float | None = None
    suspect_since: float | None = None
    suspect_reason: str | None = None

    @property
    def suspect(self) -> bool:
        return self.suspect_since is not None


@dataclass(frozen=True)
class PublicNode:
    """What anyone may know of a node: never its owner's email or what it has installed."""

    id: str
    owner: str  # the owner's nickname
    name: str
    tasks_done: int
    online: bool


@dataclass(frozen=True)
class NetworkFile:
    """A described file as online nodes report it, and how many of them hold it."""

    kind: ModelKind
    sha256: str
    name: str
    file: str
    size: int
    holders: int
    family: ModelFamily | None = None  # as the nodes read it (None: none said)


def node_id_for(account: str, name: str) -> str:
    """The id of the node ``name`` of ``account`` (stable across registrations)."""
    return str(uuid.uuid5(NODE_NAMESPACE, f"{account}\x00{name}"))


def session_worker_id(node_id: str, session_id: str) -> str:
    """The worker id under which a node's session holds its tasks."""
    return f"node:{node_id}:{session_id}"


class NodeStore(Protocol):
    """The nodes' persistence seam (see SqlNodeStore for the contract of each method)."""

    def register(
        self,
        account: str,
        name: str,
        capabilities: dict[str, Any],
        files: Sequence[NodeFile],
        loaded: Iterable[str],
        *,
        slots: int = 1,
        honor_per_interval: float = 0.0,
        session_id: str | None = None,
        families: Iterable[ModelFamily] | None = None,
    ) -> Session: ...

    def session(self, session_id: str) -> Session | None: ...

    def seen(
        self,
        node_id: str,
        *,
        session_id: str | None = None,
        loaded: Iterable[str] | None = None,
        honor_per_interval: float = 0.0,
    ) -> NodeRecord | None: ...

    def end_session(self, session_id: str) -> Session | None: ...

    def sessions_of(self, node_id: str) -> list[Session]: ...

    def expire_sessions(self) -> list[Session]: ...

    def mark_offline(self, node_id: str) -> None: ...

    def get(self, node_id: str) -> NodeRecord | None: ...

    def files(self, node_id: str) -> frozenset[str]: ...

    def families(self, node_id: str) -> frozenset[ModelFamily]: ...

    def list_for(self, account: str) -> list[NodeRecord]: ...

    def list_public(self) -> list[PublicNode]: ...

    def find_files(
        self,
        kind: ModelKind,
        *,
        sha256: str | None = None,
        key: str | None = None,
        prefix: str | None = None,
        limit: int = 1000,
    ) -> list[NetworkFile]: ...

    def request_pull(self, node_id: str, catalog_name: str) -> tuple[str, ...] | None: ...

    def take_pulls(self, node_id: str) -> tuple[str, ...]: ...

    def record_check(
        self, node_id: str, *, passed: bool, reason: str = ""
    ) -> NodeRecord | None: ...

    def clear_suspect(self, node_id: str) -> NodeRecord | None: ...

    def suspects(self) -> list[NodeRecord]: ...

    def on_probation(self, node_id: str) -> bool: ...
