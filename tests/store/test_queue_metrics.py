"""What the store reports for metrics: queue depth and nodes online (read at scrape), and the
claims and ended runs it tells its RunObserver of; on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Engine

from dan.domain import TaskKind, TaskResult, TaskStatus
from dan.nodes.store import NodeRules, SqlNodeStore
from dan.tasks.base import RunEnded
from dan.tasks.store import NewTask, Offer, QueueRules, SqlTaskStore
from tests.store.conftest import Clock

LEASE = 30.0
RESULT = TaskResult(("k",), (1,))


class Recorder:
    def __init__(self) -> None:
        self.claims: list[tuple[TaskKind, float]] = []
        self.runs: list[RunEnded] = []

    def claimed(self, kind: TaskKind, waited_s: float) -> None:
        self.claims.append((kind, waited_s))

    def ended(self, run: RunEnded) -> None:
        self.runs.append(run)


def submit(store: SqlTaskStore, kind: TaskKind = TaskKind.TXT2IMG, **params: Any) -> str:
    task = NewTask(str(uuid.uuid4()), "alice", kind, {"prompt": "p", **params})
    return store.submit(task, max_pending=100).id


def test_queue_depth_counts_open_tasks_by_status_and_kind(store: SqlTaskStore) -> None:
    assert store.queue_depth() == {}
    for kind in (TaskKind.TXT2IMG, TaskKind.UPSCALE, TaskKind.TXT2IMG, TaskKind.TXT2IMG):
        submit(store, kind)
    done = store.claim("w", lease_s=LEASE)
    assert done is not None and store.complete(done.id, "w", RESULT)
    store.claim("w", lease_s=LEASE)  # the upscale, next in the account's lane (FIFO)
    store.cancel(submit(store))
    assert store.queue_depth() == {
        (TaskStatus.PENDING, TaskKind.TXT2IMG): 2,
        (TaskStatus.PROCESSING, TaskKind.UPSCALE): 1,
    }


def test_nodes_online_counts_those_heard_from_in_the_window(db: Engine, clock: Clock) -> None:
    store = SqlTaskStore(db, clock=clock, rules=QueueRules(online_window_s=60.0))
    nodes = SqlNodeStore(db, rules=NodeRules(offline_after_s=60.0), clock=clock)
    assert store.nodes_online() == 0
    nodes.register("alice", "old", {}, [], [])
    clock.advance(120)
    nodes.register("alice", "gpu1", {}, [], [])
    nodes.register("bob", "gpu1", {}, [], [])
    assert store.nodes_online() == 2


def test_the_observer_hears_first_claims_and_each_ended_run(db: Engine, clock: Clock) -> None:
    heard = Recorder()
    store = SqlTaskStore(db, clock=clock, rules=QueueRules(max_attempts=3), observer=heard)
    ok, failing, retried = submit(store, steps=20), submit(store), submit(store)
    clock.advance(5)
    first = store.claim("w", lease_s=LEASE, offer=Offer(node_id="node-1"))
    assert first is not None and first.id == ok
    clock.advance(2)
    assert store.complete(ok, "w", RESULT)
    assert not store.complete(ok, "w", RESULT)  # a second report changes nothing: not heard
    assert store.claim("w", lease_s=LEASE) is not None
    clock.advance(1)
    assert store.fail(failing, "w", "broken")
    assert store.claim("w", lease_s=LEASE) is not None
    assert store.release(retried, "w", "handed back") is True
    assert store.claim("w", lease_s=LEASE) is not None  # its second claim: no wait heard
    store.cancel(retried)
    assert store.fail(retried, "w", "stopped")

    assert heard.claims == [(TaskKind.TXT2IMG, s) for s in (5.0, 7.0, 8.0)]
    assert [(r.status, r.node_id, r.ran_s) for r in heard.runs] == [
        (TaskStatus.SUCCESS, "node-1", 2.0),
        (TaskStatus.FAILURE, None, 1.0),
        (TaskStatus.CANCELLED, None, 0.0),
    ]
    assert heard.runs[0].params["steps"] == 20 and heard.runs[0].kind == TaskKind.TXT2IMG


def test_a_held_result_is_heard_as_a_success(db: Engine, clock: Clock) -> None:
    heard = Recorder()
    store = SqlTaskStore(db, clock=clock, observer=heard)
    task_id = submit(store)
    assert store.claim("w", lease_s=LEASE, offer=Offer(node_id="node-2")) is not None
    clock.advance(3)
    assert store.complete(task_id, "w", RESULT, hold_s=60)
    assert [(r.status, r.node_id, r.ran_s) for r in heard.runs] == [
        (TaskStatus.SUCCESS, "node-2", 3.0)
    ]


class Broken:
    """An observer whose metrics cannot be written (a full disk in multiprocess mode)."""

    def claimed(self, kind: TaskKind, waited_s: float) -> None:
        raise OSError("no space left on device")

    def ended(self, run: RunEnded) -> None:
        raise OSError("no space left on device")


def test_a_failing_observer_never_undoes_or_hides_a_committed_write(
    db: Engine, clock: Clock
) -> None:
    store = SqlTaskStore(db, clock=clock, observer=Broken())
    task_id = submit(store)
    assert store.claim("w", lease_s=LEASE) is not None  # the claim stands and is returned
    assert store.complete(task_id, "w", RESULT)
    record = store.get(task_id)
    assert record is not None and record.status == TaskStatus.SUCCESS
