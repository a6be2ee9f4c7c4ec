"""The read side of the task store, and what every part of it shares.

:class:`TaskQueries` holds the engine, the database clock, the queue rules and the run
observer; :class:`dan.tasks.store.SqlTaskStore` is built from it and the parts that write
(dan.tasks.leases, dan.tasks.completion). Reads never take the write lock: they run on a
read-only connection (see dan.db).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Select, and_, case, exists, func, or_, select, tuple_
from sqlalchemy.engine import RowMapping

from dan.db.clock import DatabaseClock
from dan.db.tables import node_families, node_files, nodes, tasks
from dan.domain import ModelFamily, TaskKind, TaskRecord, TaskStatus
from dan.tasks.base import (
    Clock,
    Expected,
    HeldTask,
    NoObserver,
    QueueRules,
    RunObserver,
    Statistics,
)
from dan.tasks.rows import PENDING, PROCESSING, record

log = logging.getLogger(__name__)


class TaskQueries:
    """The task store's reads (see TaskStore), and the state its writing parts share."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock | None = None,
        rules: QueueRules | None = None,
        observer: RunObserver | None = None,
    ) -> None:
        self._engine = engine
        self._time = DatabaseClock(clock)
        self._rules = rules or QueueRules()
        self._postgres = engine.dialect.name == "postgresql"
        self._observer = observer or NoObserver()

    def get(self, task_id: str) -> TaskRecord | None:
        with self._read() as conn:
            row = conn.execute(select(tasks).where(tasks.c.id == task_id)).mappings().first()
            if row is None:
                return None
            position = self._position(conn, row) if row["status"] == PENDING else 0
            return record(row, position)

    def held(self, task_id: str) -> HeldTask | None:
        query = select(
            tasks.c.id,
            tasks.c.account,
            tasks.c.kind,
            tasks.c.status,
            tasks.c.worker_id,
            tasks.c.node_id,
            tasks.c.attempts,
            tasks.c.expects,
            tasks.c.verify_of,
            tasks.c.cost,
        ).where(tasks.c.id == task_id)
        with self._read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return HeldTask(
            id=row.id,
            account=row.account,
            kind=TaskKind(row.kind),
            status=TaskStatus(row.status),
            worker_id=row.worker_id,
            node_id=row.node_id,
            attempt=row.attempts,
            expects=Expected.from_json(row.expects),
            verify_of=row.verify_of,
            cost=1.0 if row.cost is None else row.cost,  # rows from before 0002 cost 1
        )

    def history(self, account: str, *, limit: int, before: int | None = None) -> list[TaskRecord]:
        """The account's tasks, newest first: at most ``limit``, queued before the task of
        seq ``before`` when given (the page after the one that ended there)."""
        query = select(tasks).where(tasks.c.account == account)
        if before is not None:
            query = query.where(tasks.c.seq < before)
        query = query.order_by(tasks.c.seq.desc()).limit(limit)
        with self._read() as conn:
            return [record(row, 0) for row in conn.execute(query).mappings()]

    def active(self, account: str) -> list[TaskRecord]:
        """The account's running tasks (oldest first), then its pending ones in queue order
        (each with its queue position)."""
        running = tasks.c.status == PROCESSING
        query = (
            select(tasks)
            .where(tasks.c.account == account, tasks.c.status.in_((PENDING, PROCESSING)))
            .order_by(case((running, 0), else_=1), tasks.c.tag, tasks.c.seq)
        )
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
            return [
                record(row, self._position(conn, row) if row["status"] == PENDING else 0)
                for row in rows
            ]

    def pending_count(self, account: str) -> int:
        with self._read() as conn:
            return self._pending(conn, account)

    def statuses(self, task_ids: Iterable[str]) -> dict[str, TaskStatus]:
        ids = list(task_ids)
        if not ids:
            return {}
        query = select(tasks.c.id, tasks.c.status).where(tasks.c.id.in_(ids))
        with self._read() as conn:
            return {row.id: TaskStatus(row.status) for row in conn.execute(query)}

    def finished_before(self, cutoff: float, *, limit: int) -> list[TaskRecord]:
        query = (
            select(tasks)
            .where(tasks.c.finished_at < cutoff, tasks.c.expired.is_(False))
            .order_by(tasks.c.finished_at)
            .limit(limit)
        )
        with self._read() as conn:
            return [record(row, 0) for row in conn.execute(query).mappings()]

    def statistics(self) -> Statistics:
        ok = and_(tasks.c.status == TaskStatus.SUCCESS, tasks.c.verify_of.is_(None))
        with self._read() as conn:
            now = self._time.now(conn)

            def since(seconds: float) -> Any:
                return func.count().filter(tasks.c.finished_at >= now - seconds)

            query = select(func.count(), since(86400), since(7 * 86400)).where(ok)
            total, day, week = conn.execute(query).one()
        return Statistics(total=total, last_day=day, last_week=week)

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute(select(1))

    def queue_depth(self) -> dict[tuple[TaskStatus, TaskKind], int]:
        # Only the open states: ix_tasks_status_tag_seq keeps this off the finished history.
        query = (
            select(tasks.c.status, tasks.c.kind, func.count())
            .where(tasks.c.status.in_((PENDING, PROCESSING)))
            .group_by(tasks.c.status, tasks.c.kind)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return {(TaskStatus(status), TaskKind(kind)): count for status, kind, count in rows}

    def nodes_online(self) -> int:
        with self._read() as conn:
            online = self._online_nodes(conn).subquery()
            return int(conn.execute(select(func.count()).select_from(online)).scalar_one())

    def runnable_somewhere(
        self,
        requires: Sequence[str],
        *,
        exclude_account: str | None = None,
        family: ModelFamily | None = None,
    ) -> bool | None:
        with self._read() as conn:
            online = self._online_nodes(conn)
            if conn.execute(select(online.exists())).scalar_one() is False:
                return None
            wanted = sorted(set(requires))
            candidates = online.where(nodes.c.suspect_since.is_(None))
            if exclude_account is not None:
                candidates = candidates.where(nodes.c.account != exclude_account)
            if wanted:
                held = (
                    select(func.count())
                    .where(node_files.c.node_id == nodes.c.id, node_files.c.sha256.in_(wanted))
                    .scalar_subquery()
                )
                candidates = candidates.where(held == len(wanted))
            if family is not None:
                runs = exists().where(
                    node_families.c.node_id == nodes.c.id, node_families.c.family == family.value
                )
                candidates = candidates.where(runs)
            return bool(conn.execute(select(candidates.exists())).scalar_one())

    # -- shared helpers ----------------------------------------------------------------------
    def _read(self) -> Connection:
        return self._engine.connect().execution_options(dan_read_only=True)

    @staticmethod
    def _pending(conn: Connection, account: str) -> int:
        """The images of the account's pending tasks (its pending limit counts images)."""
        images = func.coalesce(func.sum(tasks.c.images), 0)
        query = select(images).where(tasks.c.account == account, tasks.c.status == PENDING)
        return int(conn.execute(query).scalar_one())

    @staticmethod
    def _tell(event: Callable[..., None], *args: Any) -> None:
        """An observer's event, after the commit: its failure (a metrics file that cannot be
        written) is logged, never the caller's, whose write already stands."""
        try:
            event(*args)
        except Exception:
            log.exception("the run observer failed")

    def _online_nodes(self, conn: Connection) -> Select[Any]:
        since = self._time.now(conn) - self._rules.online_window_s
        return select(nodes.c.id).where(nodes.c.last_seen_at >= since)

    def _position(self, conn: Connection, row: RowMapping) -> int:
        """1 + the number of pending tasks that run before this pending one; tasks for a
        checkpoint no online node has are not counted (they cannot run before it).

        The tasks ahead are grouped by checkpoint first, so whether an online node has it is
        asked once per checkpoint, not once per task (with thousands of nodes' files that is
        the difference between a millisecond and tens)."""
        ahead = [
            tasks.c.status == PENDING,
            tuple_(tasks.c.tag, tasks.c.seq) < tuple_(row["tag"], row["seq"]),
        ]
        online = self._online_nodes(conn)
        if not conn.execute(select(online.exists())).scalar_one():
            return int(conn.execute(select(func.count()).where(*ahead)).scalar_one()) + 1
        since = self._time.now(conn) - self._rules.online_window_s
        groups = (
            select(tasks.c.model_sha256.label("sha256"), func.count().label("n"))
            .where(*ahead)
            .group_by(tasks.c.model_sha256)
            .subquery()
        )
        served = exists().where(
            node_files.c.sha256 == groups.c.sha256,
            nodes.c.id == node_files.c.node_id,
            nodes.c.last_seen_at >= since,
        )
        total = select(func.coalesce(func.sum(groups.c.n), 0)).where(
            or_(groups.c.sha256.is_(None), served)
        )
        return int(conn.execute(total).scalar_one()) + 1
