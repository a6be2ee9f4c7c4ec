"""TaskStore: the durable queue in SQL (SQLite embedded, PostgreSQL when scaled out).

Every state change is one short transaction. Claims are atomic in SQL, never guarded by a
Python lock: on SQLite writes run inside ``BEGIN IMMEDIATE`` (one writer at a time), on
PostgreSQL the candidate row is locked with ``FOR UPDATE SKIP LOCKED``.

Queue order is weighted fair queuing: at submission a task gets a virtual-time ``tag``: the
larger of the queue's virtual time (the highest tag ever claimed) and its account's last tag,
plus the task's cost divided by the account's weight (its honor; the public account least).
Tasks run by (tag, seq). Within an account that is FIFO; across accounts it interleaves, an
account with twice the weight getting about twice the turns and a task twice as costly
waiting about twice as long. An account arriving at a long queue waits behind about one task
of each busy account, not behind their backlog; since the virtual time only grows and each
account's tags grow with every task, no task waits forever.

A node claiming work says which model files it has installed and which checkpoints it has
loaded: it is only given tasks whose files it has, and among the next ``lookahead`` of those
it prefers one for a loaded checkpoint (so a task for another checkpoint is passed over at most
that many times by that node).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Select, and_, func, or_, select, tuple_, update
from sqlalchemy.engine import RowMapping

from dan.db.notify import FINISHED, QUEUED, notify
from dan.db.tables import honor_grants, nodes, tasks
from dan.domain import ClaimedTask, TaskKind, TaskRecord, TaskResult, TaskStatus
from dan.errors import TooManyPendingTasks
from dan.tasks.base import (
    CANCELLED_MESSAGE,
    Clock,
    Heartbeat,
    NewTask,
    Offer,
    Reward,
    Statistics,
    TaskStore,
)

# What callers import from here (the seam itself lives in dan.tasks.base).
__all__ = [
    "CANCELLED_MESSAGE",
    "Clock",
    "Heartbeat",
    "NewTask",
    "Offer",
    "Reward",
    "SqlTaskStore",
    "Statistics",
    "TaskStore",
]


class SqlTaskStore:
    """TaskStore on SQLAlchemy Core; see the module docstring for the queue rules."""

    def __init__(
        self, engine: Engine, *, clock: Clock = time.time, online_window_s: float = 60.0
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._online_window_s = online_window_s
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

    def models_served(self) -> frozenset[str] | None:
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            return self._served(conn)

    def _served(self, conn: Connection) -> frozenset[str] | None:
        since = self._clock() - self._online_window_s
        rows = conn.execute(select(nodes.c.installed).where(nodes.c.last_seen_at >= since)).all()
        if not rows:
            return None
        return frozenset(sha for row in rows for sha in row.installed)

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
            tag = self._next_tag(conn, task.account, task.cost / task.weight)
            conn.execute(tasks.insert().values(**_new_row(task, self._clock()), tag=tag))
            if self._postgres:
                notify(conn, QUEUED, task.id)
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
            if self._postgres:
                notify(conn, FINISHED, task_id)
            conn.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.status == TaskStatus.PROCESSING)
                .values(cancel_requested=True)
            )
            row = conn.execute(select(tasks).where(tasks.c.id == task_id)).mappings().first()
            return None if row is None else _record(row, 0)

    # -- worker side -------------------------------------------------------------------------
    def claim(
        self, worker_id: str, *, lease_s: float, offer: Offer | None = None
    ) -> ClaimedTask | None:
        # Idle workers poll often: look without taking the write lock first.
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            if conn.execute(_pending_in_order(1)).first() is None:
                return None
        now = self._clock()
        with self._engine.begin() as conn:
            limit = 1 if offer is None else CANDIDATES
            seq = _choose(conn.execute(self._candidates(limit)).all(), offer)
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

    def complete(
        self, task_id: str, worker_id: str, result: TaskResult, *, reward: Reward | None = None
    ) -> bool:
        payload: dict[str, object] = {
            "image_keys": list(result.image_keys),
            "seeds": list(result.seeds),
        }
        if result.caption is not None:
            payload["caption"] = result.caption
        values = {"status": TaskStatus.SUCCESS, "result": payload, "progress": 1.0}
        with self._engine.begin() as conn:
            if not self._finish_in(conn, task_id, worker_id, values):
                return False
            if reward is not None:
                self._grant(conn, task_id, reward)
            return True

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
            if requeued and self._postgres:
                notify(conn, QUEUED)
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
            if released and self._postgres:
                notify(conn, QUEUED)
        return int(released)

    def mark_expired(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            with self._engine.begin() as conn:
                conn.execute(update(tasks).where(tasks.c.id.in_(task_ids)).values(expired=True))

    # -- helpers -----------------------------------------------------------------------------
    def _finish(self, task_id: str, worker_id: str, **values: Any) -> bool:
        with self._engine.begin() as conn:
            return self._finish_in(conn, task_id, worker_id, values)

    def _finish_in(
        self, conn: Connection, task_id: str, worker_id: str, values: dict[str, Any]
    ) -> bool:
        values = {**values, "finished_at": self._clock(), "lease_expires_at": None}
        done = conn.execute(update(tasks).where(*_held_by(task_id, worker_id)).values(**values))
        if done.rowcount == 1 and self._postgres:
            notify(conn, FINISHED, task_id)
        return bool(done.rowcount == 1)

    def _grant(self, conn: Connection, task_id: str, reward: Reward) -> None:
        conn.execute(
            honor_grants.insert().values(
                account=reward.account,
                amount=reward.amount,
                reason="task",
                task_id=task_id,
                node_id=reward.node_id,
                created_at=self._clock(),
            )
        )
        if reward.node_id is not None:
            conn.execute(
                update(nodes)
                .where(nodes.c.id == reward.node_id)
                .values(tasks_done=nodes.c.tasks_done + 1)
            )

    def _candidates(self, limit: int) -> Select[tuple[int, str | None, Any]]:
        # SQLite serialises writers already; PostgreSQL workers skip rows others are claiming.
        query = _pending_in_order(limit)
        return query.with_for_update(skip_locked=True) if self._postgres else query

    @staticmethod
    def _next_tag(conn: Connection, account: str, increment: float) -> float:
        claimed = select(func.max(tasks.c.tag)).where(tasks.c.started_at.is_not(None))
        mine = select(func.max(tasks.c.tag)).where(tasks.c.account == account)
        virtual_time = conn.execute(claimed).scalar_one() or 0.0
        last = conn.execute(mine).scalar_one() or 0.0
        return float(max(virtual_time, last) + increment)

    def _position(self, conn: Connection, row: RowMapping) -> int:
        """1 + the number of pending tasks that run before this pending one; tasks for a
        checkpoint no online node has are not counted (they cannot run before it)."""
        conditions = [
            tasks.c.status == TaskStatus.PENDING,
            tuple_(tasks.c.tag, tasks.c.seq) < tuple_(row["tag"], row["seq"]),
        ]
        served = self._served(conn)
        if served is not None:
            model = tasks.c.model_sha256
            conditions.append(or_(model.is_(None), model.in_(sorted(served))))
        ahead = select(func.count()).where(*conditions)
        return int(conn.execute(ahead).scalar_one()) + 1


CANDIDATES = 64  # how deep a node with an offer looks for a task it can run


def _pending_in_order(limit: int) -> Select[tuple[int, str | None, Any]]:
    """The pending tasks that run next, in order: seq, checkpoint and required files."""
    return (
        select(tasks.c.seq, tasks.c.model_sha256, tasks.c.requires)
        .where(tasks.c.status == TaskStatus.PENDING)
        .order_by(tasks.c.tag, tasks.c.seq)
        .limit(limit)
    )


def _choose(rows: Sequence[Any], offer: Offer | None) -> int | None:
    """The seq to claim of ``rows`` (pending, in order) for ``offer``: of the first
    ``lookahead`` tasks it can run, the first on a loaded checkpoint, else the first."""
    if offer is None:
        return int(rows[0].seq) if rows else None
    installed = offer.installed
    runnable = [r for r in rows if installed is None or set(r.requires or ()) <= installed]
    for row in runnable[: offer.lookahead]:
        if row.model_sha256 is not None and row.model_sha256 in offer.loaded:
            return int(row.seq)
    return int(runnable[0].seq) if runnable else None


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
        "cost": task.cost,
        "model_sha256": task.checkpoint,
        "requires": list(task.requires),
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
