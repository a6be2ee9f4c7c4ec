"""Checks of nodes' results in SQL: verification runs, and where each check stands.

A check of task T queues a *verification run* V: a task row of its own (account
``VERIFY_ACCOUNT``, ``verify_of`` = T) with T's kind, parameters, files and expected result,
at T's place in the queue, that no node of the excluded accounts may claim (the account whose
node produced T's result, and for a tie-break the first verifier's too). T's ``verification``
says where the check stands:

- ``held``: T's result is kept but not shown (a node on probation made it); T stays running
  until the check settles or its ``deadline`` passes;
- ``checking``: T's result was shown; a run checks it afterwards (a sampled check);
- ``disputed``: the first verifier disagreed; a tie-break run decides;
- ``passed``, ``failed``, ``inconclusive``, ``unchecked``: settled.

A run's own ``verification`` is ``run`` until a settlement has used it (``done``). Every
settlement is one transaction guarded by T's state, so replicas settling at once apply it
once. The rules that decide live in dan.nodes.checks; this module only keeps the state.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, func, insert, or_, select, update

from dan.db.clock import Clock, DatabaseClock
from dan.db.notify import FINISHED, QUEUED, notify
from dan.db.tables import (
    accounts,
    node_families,
    node_files,
    nodes,
    task_exclusions,
    task_files,
    tasks,
)
from dan.domain import TaskKind, TaskResult, TaskStatus
from dan.tasks.rows import result_from_json, result_json

VERIFY_ACCOUNT = "verifier"  # the account verification runs are queued under
OPEN_STATES = ("held", "checking", "disputed")
RUN, USED = "run", "done"


@dataclass(frozen=True)
class Outcome:
    """A task's (or a run's) state as a check sees it: its result and who made it."""

    id: str
    kind: TaskKind
    status: TaskStatus
    verification: str | None
    node_id: str | None
    node_account: str | None
    result: TaskResult
    admin_node: bool  # its node's owner is an admin (a trusted verifier)


@dataclass(frozen=True)
class CheckState:
    """An open check: the task, and its verification runs, oldest first."""

    task: Outcome
    runs: tuple[Outcome, ...]


class SqlCheckStore:
    """Verification runs and check states on the tasks table; thread-safe."""

    def __init__(
        self, engine: Engine, *, clock: Clock | None = None, online_window_s: float = 60.0
    ) -> None:
        self._engine = engine
        self._time = DatabaseClock(clock)
        self._online_window_s = online_window_s
        self._postgres = engine.dialect.name == "postgresql"

    def can_verify(self, task_id: str, exclude: Sequence[str]) -> bool:
        """Whether an online, unsuspected node of none of the ``exclude`` accounts has every
        file of ``task_id`` and runs its family (so a verification run of it can be served)."""
        lacks_one = exists().where(
            task_files.c.task_id == task_id,
            ~exists().where(
                node_files.c.node_id == nodes.c.id, node_files.c.sha256 == task_files.c.sha256
            ),
        )
        family = select(tasks.c.family).where(tasks.c.id == task_id).scalar_subquery()
        runs = or_(
            family.is_(None),
            exists().where(node_families.c.node_id == nodes.c.id, node_families.c.family == family),
        )
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            since = self._time.now(conn) - self._online_window_s
            query = select(
                exists().where(
                    nodes.c.last_seen_at >= since,
                    nodes.c.suspect_since.is_(None),
                    nodes.c.account.not_in(list(exclude)),
                    ~lacks_one,
                    runs,
                )
            )
            return bool(conn.execute(query).scalar_one())

    def start(self, task_id: str, exclude: Sequence[str], *, state: str) -> str | None:
        """Queue a verification run of ``task_id`` that no node of ``exclude`` may claim, and
        set the task's check to ``state``; the run's id, or None if the task is gone."""
        run_id = str(uuid.uuid4())
        with self._engine.begin() as conn:
            row = conn.execute(select(tasks).where(tasks.c.id == task_id)).mappings().first()
            if row is None:
                return None
            conn.execute(insert(tasks).values(**_run_row(row, run_id, self._time.now(conn))))
            files = conn.execute(
                select(task_files.c.sha256).where(task_files.c.task_id == task_id)
            ).scalars()
            rows = [{"task_id": run_id, "sha256": sha} for sha in files]
            if rows:
                conn.execute(insert(task_files), rows)
            excluded = [{"task_id": run_id, "account": a} for a in sorted(set(exclude))]
            if excluded:
                conn.execute(insert(task_exclusions), excluded)
            conn.execute(update(tasks).where(tasks.c.id == task_id).values(verification=state))
            if self._postgres:
                notify(conn, QUEUED, run_id)
        return run_id

    def to_settle(self, *, limit: int = 100) -> list[str]:
        """Tasks whose check has a finished run not yet used, or whose held result is past
        its deadline."""
        run = tasks.alias("run")
        finished_run = exists().where(
            run.c.verify_of == tasks.c.id,
            run.c.verification == RUN,
            run.c.status.in_([TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCELLED]),
        )
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            now = self._time.now(conn)
            overdue = tasks.c.deadline < now
            query = (
                select(tasks.c.id)
                .where(tasks.c.verification.in_(OPEN_STATES), or_(finished_run, overdue))
                .limit(limit)
            )
            return list(conn.execute(query).scalars())

    def state(self, task_id: str) -> CheckState | None:
        """The task and its verification runs, or None if the task is gone."""
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            found = [_outcome(r) for r in conn.execute(_outcomes(tasks.c.id == task_id))]
            if not found:
                return None
            query = _outcomes(tasks.c.verify_of == task_id).order_by(tasks.c.seq)
            runs = tuple(_outcome(r) for r in conn.execute(query))
        return CheckState(found[0], runs)

    def is_overdue(self, task_id: str) -> bool:
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            now = self._time.now(conn)
            deadline = conn.execute(
                select(tasks.c.deadline).where(
                    tasks.c.id == task_id, tasks.c.verification.in_(OPEN_STATES)
                )
            ).scalar_one_or_none()
        return deadline is not None and deadline < now

    def settle(
        self,
        task_id: str,
        *,
        was: str,
        now_state: str,
        used: Sequence[str],
        result: TaskResult | None = None,
        publish: bool = False,
        close_runs: bool = False,
    ) -> bool:
        """Move the task's check from ``was`` to ``now_state`` (False, changing nothing, if
        another process moved it first); mark the runs ``used``; replace its result with
        ``result`` if given; show a held result (``publish``); with ``close_runs`` fail the
        runs not finished yet (the check needs them no more)."""
        with self._engine.begin() as conn:
            values: dict[str, Any] = {"verification": now_state}
            if result is not None:
                values["result"] = result_json(result)
            moved = conn.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.verification == was)
                .values(**values)
            ).rowcount
            if moved != 1:
                return False
            if used:
                conn.execute(
                    update(tasks).where(tasks.c.id.in_(list(used))).values(verification=USED)
                )
            if publish:
                self._publish(conn, task_id)
            if close_runs:
                self._close_runs(conn, task_id)
            return True

    # -- helpers -----------------------------------------------------------------------------
    def _publish(self, conn: Connection, task_id: str) -> None:
        shown = conn.execute(
            update(tasks)
            .where(
                tasks.c.id == task_id,
                tasks.c.status == TaskStatus.PROCESSING,
                tasks.c.worker_id.is_(None),
            )
            .values(status=TaskStatus.SUCCESS, finished_at=self._time.now(conn), deadline=None)
        ).rowcount
        if shown and self._postgres:
            notify(conn, FINISHED, task_id)

    def _close_runs(self, conn: Connection, task_id: str) -> None:
        open_run = and_(
            tasks.c.verify_of == task_id,
            tasks.c.status.in_([TaskStatus.PENDING, TaskStatus.PROCESSING]),
        )
        conn.execute(
            update(tasks)
            .where(open_run)
            .values(
                status=TaskStatus.FAILURE,
                error="the check it was for is settled",
                finished_at=self._time.now(conn),
                worker_id=None,
                lease_expires_at=None,
                deadline=None,
                verification=USED,
            )
        )


def _outcomes(where: Any) -> Any:
    return (
        select(
            tasks.c.id,
            tasks.c.kind,
            tasks.c.status,
            tasks.c.verification,
            tasks.c.node_id,
            tasks.c.result,
            nodes.c.account.label("node_account"),
            func.coalesce(accounts.c.is_admin, False).label("admin_node"),
        )
        .join_from(tasks, nodes, nodes.c.id == tasks.c.node_id, isouter=True)
        .join(accounts, accounts.c.id == nodes.c.account, isouter=True)
        .where(where)
    )


def _outcome(row: Any) -> Outcome:
    return Outcome(
        id=row.id,
        kind=TaskKind(row.kind),
        status=TaskStatus(row.status),
        verification=row.verification,
        node_id=row.node_id,
        node_account=row.node_account,
        result=result_from_json(row.result),
        admin_node=bool(row.admin_node),
    )


def _run_row(original: Any, run_id: str, now: float) -> dict[str, Any]:
    return {
        "id": run_id,
        "account": VERIFY_ACCOUNT,
        "kind": original["kind"],
        "status": TaskStatus.PENDING,
        "tag": original["tag"],  # its place in the queue: right where the task was
        "params": original["params"],
        "cost": original["cost"],
        "model_sha256": original["model_sha256"],
        "expects": original["expects"],
        "images": original["images"],
        "family": original["family"],
        "created_at": now,
        "progress": 0.0,
        "attempts": 0,
        "cancel_requested": False,
        "expired": False,
        "verify_of": original["id"],
        "verification": RUN,
    }
