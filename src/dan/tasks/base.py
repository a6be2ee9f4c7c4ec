"""The queue's seam: TaskStore, the values it takes and returns, and its rules' vocabulary.

:class:`dan.tasks.store.SqlTaskStore` implements it on SQL; the worker loop and the services
depend only on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dan.domain import ClaimedTask, TaskKind, TaskRecord, TaskResult, TaskStatus

Clock = Callable[[], float]
CANCELLED_MESSAGE = "cancelled by the user"


@dataclass(frozen=True)
class NewTask:
    id: str
    account: str
    kind: TaskKind
    params: dict[str, Any]
    cost: float = 1.0  # see dan.tasks.needs
    weight: float = 1.0  # the account's queue weight (dan.accounts)
    checkpoint: str | None = None
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Offer:
    """What a claiming node can run: the sha256 of its installed model files (None: anything)
    and of the checkpoints it has loaded, and how far it may look past the head of the queue
    for a task on a loaded checkpoint."""

    installed: frozenset[str] | None = None
    loaded: frozenset[str] = frozenset()
    lookahead: int = 1


@dataclass(frozen=True)
class Reward:
    """Honor for a completed task, written in the completion's transaction."""

    account: str
    amount: float
    node_id: str | None = None


@dataclass(frozen=True)
class Heartbeat:
    """Answer to a worker's heartbeat: whether it still holds the task, and whether to stop."""

    held: bool
    cancel_requested: bool


@dataclass(frozen=True)
class Statistics:
    total: int
    last_day: int
    last_week: int


class TaskStore(Protocol):
    """The queue's persistence seam. All methods are synchronous and thread-safe."""

    def submit(self, task: NewTask, *, max_pending: int) -> TaskRecord:
        """Insert a pending task; raise TooManyPendingTasks if the account has max_pending."""
        ...

    def get(self, task_id: str) -> TaskRecord | None:
        """The task with its current queue position, or None."""
        ...

    def statuses(self, task_ids: Iterable[str]) -> dict[str, TaskStatus]:
        """Current status of each known id (unknown ids are left out)."""
        ...

    def cancel(self, task_id: str) -> TaskRecord | None:
        """Pending: fail it now. Processing: ask its worker to stop. Finished: no change."""
        ...

    def claim(
        self, worker_id: str, *, lease_s: float, offer: Offer | None = None
    ) -> ClaimedTask | None:
        """Atomically take the next pending task ``offer`` can run (any task without one), or
        None if there is none."""
        ...

    def heartbeat(
        self, task_id: str, worker_id: str, *, lease_s: float, progress: float | None = None
    ) -> Heartbeat:
        """Renew the lease (and record progress) if ``worker_id`` still holds the task."""
        ...

    def complete(
        self, task_id: str, worker_id: str, result: TaskResult, *, reward: Reward | None = None
    ) -> bool:
        """Mark success and grant ``reward`` (once per task) in one transaction; False (and no
        change) if the worker no longer holds the task."""
        ...

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        """Mark failure; False (and no change) if the worker no longer holds the task."""
        ...

    def requeue_expired(self, *, max_attempts: int) -> int:
        """Give tasks whose lease expired back to the queue (or fail them after max_attempts)."""
        ...

    def release_worker(self, worker_id: str) -> int:
        """Put back in the queue every task ``worker_id`` holds (it restarted and lost them)."""
        ...

    def finished_before(self, cutoff: float, *, limit: int) -> list[TaskRecord]:
        """Finished tasks older than ``cutoff`` whose results are still kept."""
        ...

    def mark_expired(self, task_ids: Sequence[str]) -> None:
        """Record that these tasks' results were deleted."""
        ...

    def statistics(self) -> Statistics:
        """Counts of successful tasks: all time, last 24 h, last 7 days."""
        ...

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        ...

    def models_served(self) -> frozenset[str] | None:
        """The sha256 of every model file some online node has installed; None when no node
        is online (nothing is known about what will be served)."""
        ...
