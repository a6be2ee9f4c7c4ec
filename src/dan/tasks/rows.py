"""How tasks are rows: the conditions the queue's SQL shares, and rows <-> values.

Used by the task store (dan.tasks.store) and the check store (dan.tasks.checks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, exists, func, or_, select, update
from sqlalchemy.engine import RowMapping

from dan.db.tables import node_families, node_files, task_exclusions, task_files, tasks
from dan.domain import TaskKind, TaskRecord, TaskResult, TaskStatus
from dan.tasks.base import NewTask, Offer, QueueRules

PENDING, PROCESSING = TaskStatus.PENDING, TaskStatus.PROCESSING


def runtime_limit(rules: QueueRules) -> Any:
    """The run-time limit of the row being claimed, from its own cost (SQL)."""
    cost = func.coalesce(tasks.c.cost, 1.0)
    return rules.runtime_base_s + rules.runtime_per_cost_s * cost


def share_batch_deadline(
    conn: Connection, rules: QueueRules, worker_id: str, batch_key: str
) -> None:
    """Give the tasks ``worker_id`` runs as the batch ``batch_key`` the time limit of the
    whole batch: run as one, each takes the batch's time, so the limit counts the cost of
    them all, from the first one's start (a task alone keeps :func:`runtime_limit`)."""
    members = and_(
        tasks.c.worker_id == worker_id,
        tasks.c.status == PROCESSING,
        tasks.c.batch_key == batch_key,
    )
    total = func.sum(func.coalesce(tasks.c.cost, 1.0))
    started, cost = conn.execute(select(func.min(tasks.c.started_at), total).where(members)).one()
    if started is None:
        return
    deadline = started + rules.runtime_base_s + rules.runtime_per_cost_s * cost
    conn.execute(update(tasks).where(members).values(deadline=deadline))


def runnable_for(offer: Offer) -> list[ColumnElement[bool]]:
    """Conditions on a pending task for ``offer``: the node has all its files and runs its
    family (a task of no family runs anywhere), and its account is not excluded from it."""
    conditions: list[ColumnElement[bool]] = []
    if offer.node_id is not None:
        has = exists().where(
            node_files.c.node_id == offer.node_id, node_files.c.sha256 == task_files.c.sha256
        )
        missing = exists().where(task_files.c.task_id == tasks.c.id, ~has)
        conditions.append(~missing)
        runs = exists().where(
            node_families.c.node_id == offer.node_id, node_families.c.family == tasks.c.family
        )
        conditions.append(or_(tasks.c.family.is_(None), runs))
    if offer.account is not None:
        excluded = exists().where(
            task_exclusions.c.task_id == tasks.c.id, task_exclusions.c.account == offer.account
        )
        conditions.append(~excluded)
    return conditions


def choose(rows: Sequence[Any], offer: Offer) -> int | None:
    """The seq to claim of ``rows`` (runnable, in order): the first on a loaded checkpoint,
    else the first."""
    for row in rows:
        if row.model_sha256 is not None and row.model_sha256 in offer.loaded:
            return int(row.seq)
    return int(rows[0].seq) if rows else None


def held_by(task_id: str, worker_id: str) -> tuple[ColumnElement[bool], ...]:
    return (
        tasks.c.id == task_id,
        tasks.c.worker_id == worker_id,
        tasks.c.status == PROCESSING,
    )


def ended(status: TaskStatus | ColumnElement[Any], now: float) -> dict[str, Any]:
    """The values of a task that stops running with ``status``."""
    return {
        "status": status,
        "finished_at": now,
        "worker_id": None,
        "lease_expires_at": None,
        "deadline": None,
        "preview": None,
    }


def insert_files(conn: Connection, task_id: str, requires: Iterable[str]) -> None:
    rows = [{"task_id": task_id, "sha256": sha} for sha in sorted(set(requires))]
    if rows:
        conn.execute(task_files.insert(), rows)


def result_json(result: TaskResult) -> dict[str, Any]:
    payload: dict[str, Any] = {"image_keys": list(result.image_keys), "seeds": list(result.seeds)}
    if result.caption is not None:
        payload["caption"] = result.caption
    return payload


def new_row(task: NewTask, now: float) -> dict[str, Any]:
    return {
        "id": task.id,
        "account": task.account,
        "kind": task.kind.value,
        "status": PENDING,
        "params": task.params,
        "cost": task.cost,
        "model_sha256": task.checkpoint,
        "expects": task.expects.to_json() if task.expects else None,
        "images": task.images,
        "family": task.family.value if task.family else None,
        "batch_key": task.batch_key,
        "created_at": now,
        "progress": 0.0,
        "attempts": 0,
        "cancel_requested": False,
        "expired": False,
    }


def result_from_json(data: Any) -> TaskResult:
    """The TaskResult a task row's ``result`` holds (empty for none)."""
    result = data or {}
    return TaskResult(
        image_keys=tuple(result.get("image_keys", ())),
        seeds=tuple(result.get("seeds", ())),
        caption=result.get("caption"),
    )


def record(row: RowMapping, position: int) -> TaskRecord:
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
        result=result_from_json(row["result"]),
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        expired=bool(row["expired"]),
        queue_position=position,
        preview=row["preview"],
        seq=row["seq"],
    )
