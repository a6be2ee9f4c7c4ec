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

A node claims with an :class:`Offer`: it is given only tasks whose every file (``task_files``)
it has installed (``node_files``), whose checkpoint's family it runs (``node_families``) and
that are not verification runs of its own account's results, found by the query itself
however deep in the queue they are; among the first
``lookahead`` of those it prefers one for a checkpoint it has loaded. It holds at most
``slots`` tasks at once. A run ends when its lease is not renewed, when its time limit (from
its cost; the tasks of a batch, run as one, share the limit of the batch's whole cost)
passes, or, once cancelled, when the grace to stop has passed; every hand-back counts as a
try, and after ``max_attempts`` the task fails with a message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    and_,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import Row, RowMapping

from dan.db.clock import DatabaseClock
from dan.db.notify import FINISHED, QUEUED, notify
from dan.db.tables import (
    honor_escrow,
    honor_grants,
    node_families,
    node_files,
    nodes,
    task_exclusions,
    task_files,
    tasks,
    webhooks,
)
from dan.domain import ClaimedTask, ModelFamily, TaskKind, TaskRecord, TaskResult, TaskStatus
from dan.errors import TooManyPendingTasks
from dan.tasks.base import (
    CANCELLED_MESSAGE,
    Clock,
    Expected,
    Heartbeat,
    HeldTask,
    NewTask,
    NoObserver,
    Offer,
    QueueRules,
    Reward,
    RunEnded,
    RunObserver,
    Statistics,
    TaskStore,
    pending_message,
)
from dan.tasks.rows import (
    PENDING,
    PROCESSING,
    choose,
    ended,
    held_by,
    insert_files,
    new_row,
    record,
    result_json,
    runnable_for,
    runtime_limit,
    share_batch_deadline,
)
from dan.webhooks.store import new_webhook

log = logging.getLogger(__name__)

# What an ended run's row returns for the RunObserver.
_ENDED_RUN = (tasks.c.kind, tasks.c.status, tasks.c.node_id, tasks.c.started_at, tasks.c.params)


def _batch_key(candidates: Sequence[Row[Any]], seq: int) -> str | None:
    """The batch key of the candidate ``seq`` (one of ``candidates``)."""
    key: str | None = next(row.batch_key for row in candidates if row.seq == seq)
    return key


def _ended_run(row: Row[Any], now: float) -> RunEnded:
    """The run of ``row`` (_ENDED_RUN) that ended ``now``; a held result is still PROCESSING
    in the row, and counts as the success it is for its node."""
    status = TaskStatus.SUCCESS if row.status == PROCESSING else TaskStatus(row.status)
    ran_s = max(now - (row.started_at or now), 0.0)
    return RunEnded(TaskKind(row.kind), status, row.node_id, ran_s, row.params or {})


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


class SqlTaskStore:
    """TaskStore on SQLAlchemy Core; see the module docstring for the queue rules."""

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

    # -- reads -------------------------------------------------------------------------------
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

    # -- worker side -------------------------------------------------------------------------
    def claim(
        self,
        worker_id: str,
        *,
        lease_s: float,
        offer: Offer | None = None,
        like: str | None = None,
    ) -> ClaimedTask | None:
        """See TaskStore. A claim ``like`` a batch key chooses exactly as a plain one (same
        candidates, same order, same preference for a loaded checkpoint) and then takes the
        chosen task only if it has that key: so a batch stops at the first task the worker
        would have claimed next that cannot join it, and fairness is that of one claim after
        another. Each task a batch gains stretches the time limit of all its tasks to that of
        the batch's whole cost (rows.share_batch_deadline)."""
        offer = offer or Offer()
        # Idle workers and waiting nodes ask often: look without taking the write lock first.
        with self._read() as conn:
            if not self._may_claim(conn, worker_id, offer):
                return None
        with self._engine.begin() as conn:
            if not self._may_claim(conn, worker_id, offer):
                return None
            candidates = conn.execute(self._candidates(offer, for_update=True)).all()
            seq = choose(candidates, offer)
            if seq is None or (like is not None and _batch_key(candidates, seq) != like):
                return None
            taken = self._take(conn, seq, worker_id, lease_s, offer.node_id)
            if taken is not None and like is not None:
                share_batch_deadline(conn, self._rules, worker_id, like)
        if taken is None:
            return None
        task, waited_s = taken
        if task.attempt == 1:  # a retry's wait is not the time the task waited to be run
            self._tell(self._observer.claimed, task.kind, waited_s)
        return task

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
        """See TaskStore. ``lazy``: while more than half the lease is left, only read (whether
        it is held, whether to stop); else renew it, writing ``progress`` and ``preview`` too.
        A caller that beats lazily shows progress to watchers another way (dan.tasks.live)."""
        if lazy:
            beat = self._read_beat(task_id, worker_id, lease_s)
            if beat is not None:
                return beat
        with self._engine.begin() as conn:
            values: dict[str, Any] = {"lease_expires_at": self._time.now(conn) + lease_s}
            if progress is not None:
                values["progress"] = progress
            if preview is not None:
                values["preview"] = preview
            row = conn.execute(
                update(tasks)
                .where(*held_by(task_id, worker_id))
                .values(**values)
                .returning(tasks.c.cancel_requested, tasks.c.attempts)
            ).first()
        if row is None:
            return Heartbeat(held=False, cancel_requested=True)
        return Heartbeat(True, bool(row.cancel_requested), attempt=row.attempts)

    def _read_beat(self, task_id: str, worker_id: str, lease_s: float) -> Heartbeat | None:
        """The answer to a heartbeat whose lease needs no renewal yet, or None if it does."""
        query = select(tasks.c.cancel_requested, tasks.c.attempts, tasks.c.lease_expires_at).where(
            *held_by(task_id, worker_id)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
            if row is None:
                return Heartbeat(held=False, cancel_requested=True)
            left = (row.lease_expires_at or 0.0) - self._time.now(conn)
        if left <= lease_s / 2:
            return None
        return Heartbeat(True, bool(row.cancel_requested), attempt=row.attempts, renewed=False)

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

    def release(self, task_id: str, worker_id: str, reason: str) -> bool:
        with self._engine.begin() as conn:
            return self._hand_back(conn, and_(*held_by(task_id, worker_id)), reason) == 1

    def requeue_expired(self) -> int:
        with self._engine.begin() as conn:
            now = self._time.now(conn)
            processing = tasks.c.status == PROCESSING
            running = and_(processing, tasks.c.worker_id.is_not(None))  # not a held result
            cancelled = conn.execute(
                update(tasks)
                .where(processing, tasks.c.cancel_requested.is_(True), tasks.c.cancel_by < now)
                .values(**ended(TaskStatus.CANCELLED, now), error=CANCELLED_MESSAGE)
                .returning(tasks.c.id)
            ).all()
            if self._postgres:
                for row in cancelled:
                    notify(conn, FINISHED, row.id)
            overdue = self._hand_back(
                conn,
                and_(running, tasks.c.deadline < now),
                "it ran longer than its time limit on {attempts} worker(s); giving up",
            )
            lost = self._hand_back(
                conn,
                and_(running, tasks.c.lease_expires_at < now),
                "the worker running this task stopped responding {attempts} times; giving up",
            )
        return len(cancelled) + overdue + lost

    def release_worker(self, worker_id: str) -> int:
        with self._engine.begin() as conn:
            held = and_(tasks.c.worker_id == worker_id, tasks.c.status == PROCESSING)
            return self._hand_back(
                conn, held, "its worker stopped while running it {attempts} times; giving up"
            )

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

    # -- helpers -----------------------------------------------------------------------------
    def _read(self) -> Connection:
        return self._engine.connect().execution_options(dan_read_only=True)

    @staticmethod
    def _pending(conn: Connection, account: str) -> int:
        """The images of the account's pending tasks (its pending limit counts images)."""
        images = func.coalesce(func.sum(tasks.c.images), 0)
        query = select(images).where(tasks.c.account == account, tasks.c.status == PENDING)
        return int(conn.execute(query).scalar_one())

    def _may_claim(self, conn: Connection, worker_id: str, offer: Offer) -> bool:
        """Whether the worker has a free slot and some task is there for it."""
        if offer.slots is not None:
            holding = select(func.count()).where(
                tasks.c.worker_id == worker_id, tasks.c.status == PROCESSING
            )
            if conn.execute(holding).scalar_one() >= offer.slots:
                return False
        return conn.execute(self._candidates(offer).limit(1)).first() is not None

    def _candidates(self, offer: Offer, *, for_update: bool = False) -> Select[Any]:
        """The pending tasks ``offer`` can run, in queue order: seq, checkpoint, batch key."""
        query = (
            select(tasks.c.seq, tasks.c.model_sha256, tasks.c.batch_key)
            .where(tasks.c.status == PENDING, *runnable_for(offer))
            .order_by(tasks.c.tag, tasks.c.seq)
            .limit(max(offer.lookahead, 1))
        )
        # SQLite serialises writers already; PostgreSQL claimers skip rows others are taking.
        if for_update and self._postgres:
            return query.with_for_update(skip_locked=True, of=tasks)
        return query

    def _take(
        self, conn: Connection, seq: int, worker_id: str, lease_s: float, node_id: str | None
    ) -> tuple[ClaimedTask, float] | None:
        """Claim the task ``seq``: the task, and how long it waited since it was queued."""
        now = self._time.now(conn)
        row = conn.execute(
            update(tasks)
            .where(tasks.c.seq == seq, tasks.c.status == PENDING)
            .values(
                status=PROCESSING,
                worker_id=worker_id,
                node_id=node_id,
                lease_expires_at=now + lease_s,
                deadline=now + runtime_limit(self._rules),
                started_at=now,
                progress=0.0,
                attempts=tasks.c.attempts + 1,
            )
            .returning(
                tasks.c.id,
                tasks.c.kind,
                tasks.c.params,
                tasks.c.attempts,
                tasks.c.created_at,
                tasks.c.batch_key,
            )
        ).first()
        if row is None:
            return None
        task = ClaimedTask(
            id=row.id,
            kind=TaskKind(row.kind),
            params=row.params,
            attempt=row.attempts,
            batch_key=row.batch_key,
        )
        return task, now - row.created_at

    def _hand_back(self, conn: Connection, which: ColumnElement[bool], reason: str) -> int:
        """Put the running tasks ``which`` selects back in the queue, or fail those on their
        last try with ``reason`` (``{attempts}`` is filled in)."""
        now = self._time.now(conn)
        last = tasks.c.attempts >= self._rules.max_attempts
        message = reason.format(attempts=self._rules.max_attempts)
        failed = conn.execute(
            update(tasks)
            .where(which, last)
            .values(**ended(TaskStatus.FAILURE, now), error=message)
            .returning(tasks.c.id)
        ).all()
        requeued = conn.execute(
            update(tasks)
            .where(which)
            .values(
                status=PENDING,
                worker_id=None,
                node_id=None,
                lease_expires_at=None,
                deadline=None,
                progress=0.0,
            )
        ).rowcount
        if self._postgres:
            for row in failed:
                notify(conn, FINISHED, row.id)
            if requeued:
                notify(conn, QUEUED)
        return len(failed) + int(requeued)

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

    @staticmethod
    def _tell(event: Callable[..., None], *args: Any) -> None:
        """An observer's event, after the commit: its failure (a metrics file that cannot be
        written) is logged, never the caller's, whose write already stands."""
        try:
            event(*args)
        except Exception:
            log.exception("the run observer failed")

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

    @staticmethod
    def _next_tag(conn: Connection, account: str, increment: float) -> float:
        claimed = select(func.max(tasks.c.tag)).where(tasks.c.started_at.is_not(None))
        mine = select(func.max(tasks.c.tag)).where(tasks.c.account == account)
        virtual_time = conn.execute(claimed).scalar_one() or 0.0
        last = conn.execute(mine).scalar_one() or 0.0
        return float(max(virtual_time, last) + increment)

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
