"""The queue's seam: TaskStore, the values it takes and returns, and its rules' vocabulary.

:class:`dan.tasks.store.SqlTaskStore` implements it on SQL; the worker loop and the services
depend only on this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dan.db.clock import Clock
from dan.domain import ClaimedTask, ModelFamily, TaskKind, TaskRecord, TaskResult, TaskStatus

CANCELLED_MESSAGE = "cancelled by the user"

__all__ = [
    "CANCELLED_MESSAGE",
    "Clock",
    "Expected",
    "Heartbeat",
    "HeldTask",
    "NewTask",
    "Offer",
    "QueueRules",
    "Reward",
    "RunEnded",
    "RunObserver",
    "Statistics",
    "TaskStore",
    "pending_message",
]


@dataclass(frozen=True)
class Expected:
    """What a task's result must be: ``images`` PNGs of ``width`` x ``height``, or a caption."""

    images: int = 0
    width: int = 0
    height: int = 0
    caption: bool = False

    def to_json(self) -> dict[str, Any]:
        if self.caption:
            return {"caption": True}
        return {"images": self.images, "width": self.width, "height": self.height}

    @classmethod
    def from_json(cls, data: Any) -> Expected | None:
        if not isinstance(data, dict):
            return None
        if data.get("caption"):
            return cls(caption=True)
        return cls(int(data["images"]), int(data["width"]), int(data["height"]))


def pending_message(pending: int, limit: int, images: int = 1) -> str:
    """Why a task is refused at the account's pending limit, which counts images."""
    adding = f" and this task makes {images}" if images > 1 else ""
    return (
        f"this account already has {pending} {_images(pending)} pending{adding} (the limit is "
        f"{limit} pending images per account); wait for some to finish"
    )


def _images(count: int) -> str:
    return "image" if count == 1 else "images"


@dataclass(frozen=True)
class NewTask:
    id: str
    account: str
    kind: TaskKind
    params: dict[str, Any]
    cost: float = 1.0  # see dan.tasks.needs
    weight: float = 1.0  # the account's queue weight (dan.accounts)
    checkpoint: str | None = None
    requires: tuple[str, ...] = ()  # sha256 of every model file a node needs to run it
    expects: Expected | None = None
    callback_url: str | None = None  # where its webhook goes when it ends (dan.webhooks)
    images: int = 1  # images it makes (batch_size x n_iter): what pending limits count
    family: ModelFamily | None = None  # its checkpoint's: only nodes running it are offered it
    batch_key: str | None = None  # what it may share a UNet batch with (dan.tasks.needs)


@dataclass(frozen=True)
class QueueRules:
    """The limits the store enforces: tries before a task fails, the grace a cancelled run
    has to stop, a run's time limit (``runtime_base_s + runtime_per_cost_s x cost``; the
    tasks of a batch count the cost of the whole batch) and how long a node stays online
    unheard."""

    max_attempts: int = 3
    cancel_grace_s: float = 30.0
    runtime_base_s: float = 120.0
    runtime_per_cost_s: float = 120.0
    online_window_s: float = 60.0


@dataclass(frozen=True)
class Offer:
    """Who claims and what it can run: the node whose installed files (rows of node_files) a
    task's files must be among and whose families (rows of node_families) its family must
    be one of (None: any task), its owner (never given a verification run of
    its own result), the checkpoints it has loaded and how far it may look past the first task
    it can run for one of those, and how many tasks it may hold at once (None: no limit)."""

    node_id: str | None = None
    account: str | None = None
    loaded: frozenset[str] = frozenset()
    lookahead: int = 1
    slots: int | None = None


@dataclass(frozen=True)
class Reward:
    """Honor for a completed task, written in the completion's transaction. ``held``: into
    escrow (the node is on probation) instead of the ledger. An amount of 0 writes no grant.
    ``work``: the task was another account's, which counts as the node's recent work."""

    account: str
    amount: float
    node_id: str | None = None
    held: bool = False
    work: bool = True


@dataclass(frozen=True)
class Heartbeat:
    """Answer to a worker's heartbeat: whether it still holds the task, and whether to stop;
    which try of the task it runs, and whether the lease was written (a lazy beat may only
    read it)."""

    held: bool
    cancel_requested: bool
    attempt: int = 0
    renewed: bool = True


@dataclass(frozen=True)
class HeldTask:
    """What the node side needs to know of a task: who holds it, on which attempt, what its
    result must be, (for a verification run) which task it re-runs, and its cost as queued
    (dan.tasks.needs), which measures the work its node is paid for."""

    id: str
    account: str
    kind: TaskKind
    status: TaskStatus
    worker_id: str | None
    node_id: str | None
    attempt: int
    expects: Expected | None
    verify_of: str | None
    cost: float


@dataclass(frozen=True)
class RunEnded:
    """A run its worker reported the end of: ``status`` is SUCCESS (a result, shown or held
    for its check), FAILURE or CANCELLED; ``ran_s`` from its claim to the report; ``params``
    as queued (what it was asked to do)."""

    kind: TaskKind
    status: TaskStatus
    node_id: str | None
    ran_s: float
    params: dict[str, Any]


class RunObserver(Protocol):
    """Told by the store, after the transaction commits, of what it records: a first claim
    (how long the task waited since it was queued) and the end of each run a worker reports.
    Must be quick and must not raise (dan.metrics counts them)."""

    def claimed(self, kind: TaskKind, waited_s: float) -> None: ...

    def ended(self, run: RunEnded) -> None: ...


class NoObserver:
    """A RunObserver that ignores everything."""

    def claimed(self, kind: TaskKind, waited_s: float) -> None:
        pass

    def ended(self, run: RunEnded) -> None:
        pass


@dataclass(frozen=True)
class Statistics:
    total: int
    last_day: int
    last_week: int


class TaskStore(Protocol):
    """The queue's persistence seam. All methods are synchronous and thread-safe."""

    def submit(self, task: NewTask, *, max_pending: int) -> TaskRecord:
        """Insert a pending task (and its webhook, if it has a callback URL); raise
        TooManyPendingTasks if the images of the account's pending tasks and this task's would
        be more than ``max_pending``."""
        ...

    def pending_count(self, account: str) -> int:
        """How many images ``account``'s pending tasks make (a cheap check before decoding
        inputs)."""
        ...

    def history(self, account: str, *, limit: int, before: int | None = None) -> list[TaskRecord]:
        """The account's tasks, newest first, queued before task ``before`` (its seq)."""
        ...

    def active(self, account: str) -> list[TaskRecord]:
        """The account's running tasks (oldest first), then its pending ones in queue order."""
        ...

    def get(self, task_id: str) -> TaskRecord | None:
        """The task with its current queue position, or None."""
        ...

    def held(self, task_id: str) -> HeldTask | None:
        """The task as the node side sees it, or None."""
        ...

    def statuses(self, task_ids: Iterable[str]) -> dict[str, TaskStatus]:
        """Current status of each known id (unknown ids are left out)."""
        ...

    def cancel(self, task_id: str) -> TaskRecord | None:
        """Pending: fail it now. Processing: ask its worker to stop (and end it as cancelled
        if the worker has not stopped within the grace). Finished: no change."""
        ...

    def claim(
        self,
        worker_id: str,
        *,
        lease_s: float,
        offer: Offer | None = None,
        like: str | None = None,
    ) -> ClaimedTask | None:
        """Atomically take the next pending task ``offer`` can run (any task without one), or
        None if there is none or the worker already holds ``offer.slots`` tasks. With
        ``like`` (a batch key), take the task a plain claim would take only if its batch key
        is ``like``, and nothing otherwise: a batch holds only the tasks the worker would
        have claimed next one after another, so it never lets a task jump the queue."""
        ...

    def heartbeat(
        self,
        task_id: str,
        worker_id: str,
        *,
        lease_s: float,
        progress: float | None = None,
        preview: bytes | None = None,
        lazy: bool = False,
    ) -> Heartbeat:
        """Renew the lease (and record progress and the latest step preview, a small PNG)
        if ``worker_id`` still holds the task. ``lazy``: write only when half the lease or
        less is left, otherwise just answer (the lease still runs out if beats stop)."""
        ...

    def complete(
        self,
        task_id: str,
        worker_id: str,
        result: TaskResult,
        *,
        reward: Reward | None = None,
        hold_s: float | None = None,
    ) -> bool:
        """Mark success and grant ``reward`` (once per task) in one transaction; False (and no
        change) if the worker no longer holds the task. With ``hold_s``, keep the result
        unshown until its check settles (at most ``hold_s``; see dan.tasks.checks)."""
        ...

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        """Mark failure; False (and no change) if the worker no longer holds the task."""
        ...

    def release(self, task_id: str, worker_id: str, reason: str) -> bool:
        """Hand the task back to the queue (its try counts; after the last one it fails with
        ``reason``); False if the worker no longer holds it."""
        ...

    def requeue_expired(self) -> int:
        """End overdue runs: cancelled ones past their grace fail as cancelled; those past
        their time limit or whose lease expired go back to the queue (or fail after the last
        try). Returns how many tasks changed."""
        ...

    def release_worker(self, worker_id: str) -> int:
        """Hand back every task ``worker_id`` holds (it stopped or died); each try counts."""
        ...

    def finished_before(self, cutoff: float, *, limit: int) -> list[TaskRecord]:
        """Finished tasks older than ``cutoff`` whose results are still kept."""
        ...

    def mark_expired(self, task_ids: Sequence[str]) -> None:
        """Record that these tasks' results were deleted, and forget their prompts, parameters
        and captions."""
        ...

    def statistics(self) -> Statistics:
        """Counts of successful tasks: all time, last 24 h, last 7 days."""
        ...

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        ...

    def queue_depth(self) -> dict[tuple[TaskStatus, TaskKind], int]:
        """How many tasks are PENDING and PROCESSING, by status and kind, in one grouped count
        (pairs with no task are left out); the same on every replica of one database."""
        ...

    def nodes_online(self) -> int:
        """How many nodes were heard from within the online window."""
        ...

    def runnable_somewhere(
        self,
        requires: Sequence[str],
        *,
        exclude_account: str | None = None,
        family: ModelFamily | None = None,
    ) -> bool | None:
        """Whether one online node (not of ``exclude_account``, not suspect) has every file of
        ``requires`` and runs ``family`` (if given); None when no node is online at all
        (nothing is known yet)."""
        ...
