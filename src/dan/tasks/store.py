"""TaskStore: the durable queue in SQL (SQLite embedded, PostgreSQL when scaled out).

Every state change is one short transaction. Claims are atomic in SQL, never guarded by a
Python lock: on SQLite writes run inside ``BEGIN IMMEDIATE`` (one writer at a time), on
PostgreSQL the candidate row is locked with ``FOR UPDATE SKIP LOCKED``.

Queue order is start-time fair queuing: at submission a task gets a virtual-time ``tag`` one
above the larger of the queue's virtual time (the highest tag ever claimed) and its account's
last tag; tasks run by (tag, seq). Within an account that is FIFO; across accounts it
interleaves round-robin, and an account arriving at a long queue waits behind one task of each
busy account, not behind their whole backlog.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, Select, and_, func, select, tuple_, update
from sqlalchemy.engine import RowMapping

from dan.domain import ClaimedTask, TaskKind, TaskRecord, TaskResult, TaskStatus
from dan.errors import TooManyPendingTasks
from dan.tasks.tables import tasks

Clock = Callable[[], float]
CANCELLED_MESSAGE = "cancelled by the user"


@dataclass(frozen=True)
class NewTask:
    id: str
    account: str
    kind: TaskKind
    params: dict[str, Any]


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

    def claim(self, worker_id: str, *, lease_s: float) -> ClaimedTask | None:
        """Atomically take the next pending task for ``worker_id``, or None if there is none."""
        ...

    def heartbeat(
        self, task_id: str, worker_id: str, *, lease_s: float, progress: float | None = None
    ) -> Heartbeat:
        """Renew the lease (and record progress) if ``worker_id`` still holds the task."""
        ...

    def complete(self, task_id: str, worker_id: str, result: TaskResult) -> bool:
        """Mark success; False (and no change) if the worker no longer holds the task."""
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


class SqlTaskStore:
    """TaskStore on SQLAlchemy Core; see the module docstring for the queue rules."""

    def __init__(self, engine: Engine, *, clock: Clock = time.time) -> None:
        self._engine = engine
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"

    # -- reads -------------------------------------------------------------------------------
    def get(self, task_id: str) -> TaskRecord | None:
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            row = conn.execute(select(tasks).where(tasks.c.id == task_id)).mappings().first()
            if row is None:
                return None
            position = self._position(conn, row) if row["status"] == TaskStatus.PENDING else 0
            return _record(row, position)

    def statuses(self, task_ids: Iterable[str]) -> dict[str, TaskStatus]:
        ids = list(task_ids)
        if not ids:
            return {}
        query = select(tasks.c.id, tasks.c.status).where(tasks.c.id.in_(ids))
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            return {row.id: TaskStatus(row.status) for row in conn.execute(query)}

    def finished_before(self, cutoff: float, *, limit: int) -> list[TaskRecord]:
        query = (
            select(tasks)
            .where(tasks.c.finished_at < cutoff, tasks.c.expired.is_(False))
            .order_by(tasks.c.finished_at)
            .limit(limit)
        )
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            return [_record(row, 0) for row in conn.execute(query).mappings()]

    def statistics(self) -> Statistics:
        now = self._clock()
        ok = tasks.c.status == TaskStatus.SUCCESS

        def since(seconds: float) -> Any:
            return func.count().filter(tasks.c.finished_at >= now - seconds)

        query = select(func.count(), since(86400), since(7 * 86400)).where(ok)
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            total, day, week = conn.execute(query).one()
        return Statistics(total=total, last_day=day, last_week=week)

    def ping(self) -> None:
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            conn.execute(select(1))

    # -- submit and cancel -------------------------------------------------------------------
    def submit(self, task: NewTask, *, max_pending: int) -> TaskRecord:
        with self._engine.begin() as conn:
            pending = conn.execute(
                select(func.count()).where(
                    tasks.c.account == task.account, tasks.c.status == TaskStatus.PENDING
                )
            ).scalar_one()
            if pending >= max_pending:
                raise TooManyPendingTasks(
                    f"this account already has {pending} pending tasks (the limit is "
                    f"{max_pending}); wait for some to finish"
                )
            tag = self._next_tag(conn, task.account)
            conn.execute(tasks.insert().values(**_new_row(task, self._clock()), tag=tag))
            row = conn.execute(select(tasks).where(tasks.c.id == task.id)).mappings().one()
            return _record(row, self._position(conn, row))

    def cancel(self, task_id: str) -> TaskRecord | None:
        now = self._clock()
        with self._engine.begin() as conn:
            conn.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.status == TaskStatus.PENDING)
                .values(status=TaskStatus.FAILURE, error=CANCELLED_MESSAGE, finished_at=now)
            )
            conn.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.status == TaskStatus.PROCESSING)
                .values(cancel_requested=True)
            )
            row = conn.execute(select(tasks).where(tasks.c.id == task_id)).mappings().first()
            return None if row is None else _record(row, 0)

    # -- worker side -------------------------------------------------------------------------
    def claim(self, worker_id: str, *, lease_s: float) -> ClaimedTask | None:
        # Idle workers poll often: look without taking the write lock first.
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            if conn.execute(_pending_in_order()).first() is None:
                return None
        now = self._clock()
        with self._engine.begin() as conn:
            seq = conn.execute(self._next_candidate()).scalar_one_or_none()
            if seq is None:
                return None
            row = conn.execute(
                update(tasks)
                .where(tasks.c.seq == seq, tasks.c.status == TaskStatus.PENDING)
                .values(
                    status=TaskStatus.PROCESSING,
                    worker_id=worker_id,
                    lease_expires_at=now + lease_s,
                    started_at=now,
                    progress=0.0,
                    attempts=tasks.c.attempts + 1,
                )
                .returning(tasks.c.id, tasks.c.kind, tasks.c.params, tasks.c.attempts)
            ).first()
        if row is None:
            return None
        return ClaimedTask(
            id=row.id, kind=TaskKind(row.kind), params=row.params, attempt=row.attempts
        )

    def heartbeat(
        self, task_id: str, worker_id: str, *, lease_s: float, progress: float | None = None
    ) -> Heartbeat:
        values: dict[str, Any] = {"lease_expires_at": self._clock() + lease_s}
        if progress is not None:
            values["progress"] = progress
        with self._engine.begin() as conn:
            row = conn.execute(
                update(tasks)
                .where(*_held_by(task_id, worker_id))
                .values(**values)
                .returning(tasks.c.cancel_requested)
            ).first()
        if row is None:
            return Heartbeat(held=False, cancel_requested=True)
        return Heartbeat(held=True, cancel_requested=bool(row.cancel_requested))

    def complete(self, task_id: str, worker_id: str, result: TaskResult) -> bool:
        payload: dict[str, object] = {
            "image_keys": list(result.image_keys),
            "seeds": list(result.seeds),
        }
        if result.caption is not None:
            payload["caption"] = result.caption
        return self._finish(
            task_id, worker_id, status=TaskStatus.SUCCESS, result=payload, progress=1.0
        )

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        return self._finish(task_id, worker_id, status=TaskStatus.FAILURE, error=error)

    def requeue_expired(self, *, max_attempts: int) -> int:
        now = self._clock()
        lost = and_(tasks.c.status == TaskStatus.PROCESSING, tasks.c.lease_expires_at < now)
        with self._engine.begin() as conn:
            failed = conn.execute(
                update(tasks)
                .where(lost, tasks.c.attempts >= max_attempts)
                .values(
                    status=TaskStatus.FAILURE,
                    finished_at=now,
                    worker_id=None,
                    error=f"the worker running this task stopped responding {max_attempts} "
                    "times; giving up",
                )
            ).rowcount
            requeued = conn.execute(
                update(tasks)
                .where(lost)
                .values(
                    status=TaskStatus.PENDING, worker_id=None, lease_expires_at=None, progress=0.0
                )
            ).rowcount
        return int(failed) + int(requeued)

    def release_worker(self, worker_id: str) -> int:
        with self._engine.begin() as conn:
            released = conn.execute(
                update(tasks)
                .where(tasks.c.worker_id == worker_id, tasks.c.status == TaskStatus.PROCESSING)
                .values(
                    status=TaskStatus.PENDING, worker_id=None, lease_expires_at=None, progress=0.0
                )
            ).rowcount
        return int(released)

    def mark_expired(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            with self._engine.begin() as conn:
                conn.execute(update(tasks).where(tasks.c.id.in_(task_ids)).values(expired=True))

    # -- helpers -----------------------------------------------------------------------------
    def _finish(self, task_id: str, worker_id: str, **values: Any) -> bool:
        values.update(finished_at=self._clock(), lease_expires_at=None)
        with self._engine.begin() as conn:
            done = conn.execute(update(tasks).where(*_held_by(task_id, worker_id)).values(**values))
            return bool(done.rowcount == 1)

    def _next_candidate(self) -> Select[tuple[int]]:
        # SQLite serialises writers already; PostgreSQL workers skip rows others are claiming.
        query = _pending_in_order()
        return query.with_for_update(skip_locked=True) if self._postgres else query

    @staticmethod
    def _next_tag(conn: Connection, account: str) -> float:
        claimed = select(func.max(tasks.c.tag)).where(tasks.c.started_at.is_not(None))
        mine = select(func.max(tasks.c.tag)).where(tasks.c.account == account)
        virtual_time = conn.execute(claimed).scalar_one() or 0.0
        last = conn.execute(mine).scalar_one() or 0.0
        return float(max(virtual_time, last) + 1.0)

    @staticmethod
    def _position(conn: Connection, row: RowMapping) -> int:
        """1 + the number of pending tasks that run before this pending one."""
        ahead = select(func.count()).where(
            tasks.c.status == TaskStatus.PENDING,
            tuple_(tasks.c.tag, tasks.c.seq) < tuple_(row["tag"], row["seq"]),
        )
        return int(conn.execute(ahead).scalar_one()) + 1


def _pending_in_order() -> Select[tuple[int]]:
    """The seq of the pending task that runs next."""
    return (
        select(tasks.c.seq)
        .where(tasks.c.status == TaskStatus.PENDING)
        .order_by(tasks.c.tag, tasks.c.seq)
        .limit(1)
    )


def _held_by(task_id: str, worker_id: str) -> tuple[Any, ...]:
    return (
        tasks.c.id == task_id,
        tasks.c.worker_id == worker_id,
        tasks.c.status == TaskStatus.PROCESSING,
    )


def _new_row(task: NewTask, now: float) -> dict[str, Any]:
    return {
        "id": task.id,
        "account": task.account,
        "kind": task.kind.value,
        "status": TaskStatus.PENDING,
        "params": task.params,
        "created_at": now,
        "progress": 0.0,
        "attempts": 0,
        "cancel_requested": False,
        "expired": False,
    }


def _record(row: RowMapping, position: int) -> TaskRecord:
    result = row["result"] or {}
    return TaskRecord(
        id=row["id"],
        account=row["account"],
        kind=TaskKind(row["kind"]),
        status=TaskStatus(row["status"]),
        params=row["params"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        progress=row["progress"],
        error=row["error"],
        result=TaskResult(
            image_keys=tuple(result.get("image_keys", ())),
            seeds=tuple(result.get("seeds", ())),
            caption=result.get("caption"),
        ),
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        expired=bool(row["expired"]),
        queue_position=position,
    )
