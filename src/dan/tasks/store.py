"""TaskStore: the durable queue in SQL (SQLite embedded, PostgreSQL when scaled out).

Every state change is one short transaction. Claims are atomic in SQL, never guarded by a
Python lock: on SQLite writes run inside ``BEGIN IMMEDIATE`` (one writer at a time), on
PostgreSQL the candidate rows are locked with ``FOR UPDATE SKIP LOCKED`` and a submit holds a
transaction-scoped advisory lock on its account, so the pending limit (which counts the images
of the account's pending tasks, ``tasks.images``) and the account's tag are never raced. Times
are the database's (see dan.db.clock).

Queue order is weighted fair queuing: at submission a task gets a virtual-time ``tag``: the
larger of the queue's virtual time (the highest tag ever claimed) and its account's last tag,
plus the task's cost divided by the account's weight (its honor; the public account least).
Tasks run by (tag, seq). Within an account that is FIFO; across accounts it interleaves, an
account with twice the weight getting about twice the turns and a task twice as costly
waiting about twice as long. An account arriving at a long queue waits behind about one task
of each busy account, not behind their backlog; since the virtual time only grows and each
account's tags grow with every task, no task waits forever.

The store is built of parts by job: reads (dan.tasks.queries), claims and leases, which say
which tasks a node's :class:`Offer` is given (dan.tasks.leases), and the ends of runs with
their rewards (dan.tasks.completion); submitting and cancelling are here.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, delete, func, select, text, update

from dan.db.notify import FINISHED, QUEUED, notify
from dan.db.tables import task_exclusions, task_files, tasks, webhooks
from dan.domain import TaskRecord, TaskStatus
from dan.errors import TooManyPendingTasks
from dan.tasks.base import (
    CANCELLED_MESSAGE,
    Clock,
    Expected,
    Heartbeat,
    HeldTask,
    NewTask,
    Offer,
    QueueRules,
    Reward,
    Statistics,
    TaskStore,
    pending_message,
)
from dan.tasks.completion import TaskCompletion
from dan.tasks.leases import TaskLeases
from dan.tasks.rows import PENDING, PROCESSING, insert_files, new_row, record
from dan.webhooks.store import new_webhook

# What callers import from here (the seam itself lives in dan.tasks.base).
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
    "SqlTaskStore",
    "Statistics",
    "TaskStore",
    "pending_message",
]


class SqlTaskStore(TaskLeases, TaskCompletion):
    """TaskStore on SQLAlchemy Core; see the module docstring for the queue rules. Its reads
    are dan.tasks.queries', its claims and leases dan.tasks.leases', the ends of its runs
    dan.tasks.completion'."""

    # -- submit and cancel -------------------------------------------------------------------
    def submit(self, task: NewTask, *, max_pending: int) -> TaskRecord:
        with self._engine.begin() as conn:
            if self._postgres:  # serialise this account's submits (limit and tag)
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(hashtextextended(:account, 0))"),
                    {"account": task.account},
                )
            pending = self._pending(conn, task.account)
            if pending + task.images > max_pending:
                raise TooManyPendingTasks(pending_message(pending, max_pending, task.images))
            tag = self._next_tag(conn, task.account, task.cost / task.weight)
            now = self._time.now(conn)
            conn.execute(tasks.insert().values(**new_row(task, now), tag=tag))
            insert_files(conn, task.id, task.requires)
            if task.callback_url is not None:
                hook = new_webhook(task.id, task.account, task.callback_url, now)
                conn.execute(webhooks.insert().values(**hook))
            if self._postgres:
                notify(conn, QUEUED, task.id)
            row = conn.execute(select(tasks).where(tasks.c.id == task.id)).mappings().one()
            return record(row, self._position(conn, row))

    def cancel(self, task_id: str) -> TaskRecord | None:
        with self._engine.begin() as conn:
            now = self._time.now(conn)
            conn.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.status == PENDING)
                .values(status=TaskStatus.CANCELLED, error=CANCELLED_MESSAGE, finished_at=now)
            )
            if self._postgres:
                notify(conn, FINISHED, task_id)
            conn.execute(
                update(tasks)
                .where(
                    tasks.c.id == task_id,
                    tasks.c.status == PROCESSING,
                    tasks.c.cancel_requested.is_(False),
                )
                .values(cancel_requested=True, cancel_by=now + self._rules.cancel_grace_s)
            )
            row = conn.execute(select(tasks).where(tasks.c.id == task_id)).mappings().first()
            return None if row is None else record(row, 0)

    def mark_expired(self, task_ids: Sequence[str]) -> None:
        if not task_ids:
            return
        ids = list(task_ids)
        with self._engine.begin() as conn:
            conn.execute(
                update(tasks)
                .where(tasks.c.id.in_(ids))
                .values(expired=True, params={}, result=None, expects=None)
            )
            conn.execute(delete(task_files).where(task_files.c.task_id.in_(ids)))
            conn.execute(delete(task_exclusions).where(task_exclusions.c.task_id.in_(ids)))

    @staticmethod
    def _next_tag(conn: Connection, account: str, increment: float) -> float:
        claimed = select(func.max(tasks.c.tag)).where(tasks.c.started_at.is_not(None))
        mine = select(func.max(tasks.c.tag)).where(tasks.c.account == account)
        virtual_time = conn.execute(claimed).scalar_one() or 0.0
        last = conn.execute(mine).scalar_one() or 0.0
        return float(max(virtual_time, last) + increment)
