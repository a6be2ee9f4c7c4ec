"""Claims and leases: how a worker takes a task, keeps it, and hands it back.

A node claims with an :class:`Offer`: it is given only tasks whose every file (``task_files``)
it has installed (``node_files``), whose checkpoint's family it runs (``node_families``) and
that are not verification runs of its own account's results, found by the query itself
however deep in the queue they are; among the first
``lookahead`` of those it prefers one for a checkpoint it has loaded. It holds at most
``slots`` tasks at once. A run ends when its lease is not renewed, when its time limit (from
its cost; the tasks of a batch, run as one, share the limit of the batch's whole cost)
passes, or, once cancelled, when the grace to stop has passed; every hand-back counts as a
try, and after ``max_attempts`` the task fails with a message.

The order candidates are taken in is the queue's (see dan.tasks.store for why it is fair).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, func, select, update
from sqlalchemy.engine import Row

from dan.db.notify import FINISHED, QUEUED, notify
from dan.db.tables import tasks
from dan.domain import ClaimedTask, TaskKind, TaskStatus
from dan.tasks.base import CANCELLED_MESSAGE, Heartbeat, Offer
from dan.tasks.queries import TaskQueries
from dan.tasks.rows import (
    PENDING,
    PROCESSING,
    choose,
    ended,
    held_by,
    runnable_for,
    runtime_limit,
    share_batch_deadline,
)


def _batch_key(candidates: Sequence[Row[Any]], seq: int) -> str | None:
    """The batch key of the candidate ``seq`` (one of ``candidates``)."""
    key: str | None = next(row.batch_key for row in candidates if row.seq == seq)
    return key


class TaskLeases(TaskQueries):
    """The task store's claims, heartbeats and hand-backs (see TaskStore)."""

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

    # -- helpers -----------------------------------------------------------------------------
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
