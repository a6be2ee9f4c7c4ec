"""How a run ends with an answer: complete (with its reward) or fail.

A run that ends by being handed back (a lost lease, a time limit) is dan.tasks.leases'.
Either way the run observer hears of it only after the transaction commits.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, case, update
from sqlalchemy.engine import Row

from dan.db.notify import FINISHED, notify
from dan.db.tables import honor_escrow, honor_grants, nodes, tasks
from dan.domain import TaskKind, TaskResult, TaskStatus
from dan.tasks.base import CANCELLED_MESSAGE, Reward, RunEnded
from dan.tasks.queries import TaskQueries
from dan.tasks.rows import PROCESSING, ended, held_by, result_json

# What an ended run's row returns for the RunObserver.
_ENDED_RUN = (tasks.c.kind, tasks.c.status, tasks.c.node_id, tasks.c.started_at, tasks.c.params)


def _ended_run(row: Row[Any], now: float) -> RunEnded:
    """The run of ``row`` (_ENDED_RUN) that ended ``now``; a held result is still PROCESSING
    in the row, and counts as the success it is for its node."""
    status = TaskStatus.SUCCESS if row.status == PROCESSING else TaskStatus(row.status)
    ran_s = max(now - (row.started_at or now), 0.0)
    return RunEnded(TaskKind(row.kind), status, row.node_id, ran_s, row.params or {})


class TaskCompletion(TaskQueries):
    """The task store's ends of runs (see TaskStore)."""

    def complete(
        self,
        task_id: str,
        worker_id: str,
        result: TaskResult,
        *,
        reward: Reward | None = None,
        hold_s: float | None = None,
    ) -> bool:
        """See TaskStore. With ``hold_s`` the result is kept but not shown: the task stays
        running, held by no worker, until its check settles it (dan.tasks.checks) or
        ``hold_s`` passes."""
        with self._engine.begin() as conn:
            if hold_s is None:
                values = {"status": TaskStatus.SUCCESS, "result": result_json(result)}
                done = self._finish_in(conn, task_id, worker_id, {**values, "progress": 1.0})
            else:
                done = self._hold_in(conn, task_id, worker_id, result, hold_s)
            if done is not None and reward is not None:
                self._reward(conn, task_id, reward)
        return self._observe_end(done)

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        # A run that stops once its cancel was asked for ends cancelled, whatever it says.
        asked = tasks.c.cancel_requested.is_(True)
        with self._engine.begin() as conn:
            values = {
                "status": case((asked, TaskStatus.CANCELLED), else_=TaskStatus.FAILURE),
                "error": case((asked, CANCELLED_MESSAGE), else_=error),
            }
            done = self._finish_in(conn, task_id, worker_id, values)
        return self._observe_end(done)

    def _hold_in(
        self, conn: Connection, task_id: str, worker_id: str, result: TaskResult, hold_s: float
    ) -> RunEnded | None:
        """Keep the result unshown (see complete); the run that ended (a success), or None if
        the worker no longer holds the task."""
        now = self._time.now(conn)
        row = conn.execute(
            update(tasks)
            .where(*held_by(task_id, worker_id))
            .values(
                result=result_json(result),
                progress=1.0,
                worker_id=None,
                lease_expires_at=None,
                deadline=now + hold_s,
                verification="held",
            )
            .returning(*_ENDED_RUN)
        ).first()
        return None if row is None else _ended_run(row, now)

    def _finish_in(
        self, conn: Connection, task_id: str, worker_id: str, values: dict[str, Any]
    ) -> RunEnded | None:
        """End the run: the run that ended, or None if the worker no longer holds the task."""
        now = self._time.now(conn)
        finished = {**ended(values.pop("status"), now), "worker_id": worker_id}
        done = conn.execute(
            update(tasks)
            .where(*held_by(task_id, worker_id))
            .values(**values, **finished)
            .returning(*_ENDED_RUN)
        ).first()
        if done is None:
            return None
        if self._postgres:
            notify(conn, FINISHED, task_id)
        return _ended_run(done, now)

    def _observe_end(self, run: RunEnded | None) -> bool:
        """Tell the observer of ``run`` (its transaction committed); whether a run ended."""
        if run is None:
            return False
        self._tell(self._observer.ended, run)
        return True

    def _reward(self, conn: Connection, task_id: str, reward: Reward) -> None:
        now = self._time.now(conn)
        if reward.amount > 0:
            table = honor_escrow if reward.held else honor_grants
            row: dict[str, Any] = {
                "account": reward.account,
                "amount": reward.amount,
                "task_id": task_id,
                "node_id": reward.node_id,
                "created_at": now,
            }
            if not reward.held:
                row["reason"] = "task"
            conn.execute(table.insert().values(**row))
        if reward.node_id is not None:
            values: dict[str, Any] = {"tasks_done": nodes.c.tasks_done + 1}
            if reward.work:
                values["worked_at"] = now
            conn.execute(update(nodes).where(nodes.c.id == reward.node_id).values(**values))
