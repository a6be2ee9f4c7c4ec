"""A node's waiting claim asks the database only when a task was queued, while queue
notifications are on (PostgreSQL's NOTIFY); without them it polls as before."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from dan.config import Settings
from dan.domain import Account, ClaimedTask, TaskKind
from dan.models.catalog import load_catalog
from dan.nodes import NodeService, SqlNodeStore
from dan.nodes.checks import ResultChecks
from dan.nodes.store import Session
from dan.storage import InMemoryBlobStore
from dan.tasks.checks import SqlCheckStore
from dan.tasks.store import NewTask, SqlTaskStore

DONOR = Account("donor", "donor", can_run_nodes=True)


class CountingStore(SqlTaskStore):
    """The real store, counting the claims that reach the database."""

    claims = 0

    def claim(self, *args: Any, **kwargs: Any) -> ClaimedTask | None:
        self.claims += 1
        return super().claim(*args, **kwargs)


class FakeTime:
    """A monotonic clock that only the service's sleeps move; ``on_sleep`` runs at each."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0
        self.on_sleep: Any = None

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1
        if self.on_sleep is not None:
            self.on_sleep(self.sleeps)


def make_service(
    db: Engine, tmp_path: Path
) -> tuple[NodeService, CountingStore, FakeTime, Session]:
    settings = Settings(data_dir=tmp_path, poll_interval_s=0.05)  # type: ignore[call-arg]
    tasks = CountingStore(db)
    nodes = SqlNodeStore(db)
    time = FakeTime()
    blobs = InMemoryBlobStore()
    checks = ResultChecks(SqlCheckStore(db), nodes, blobs, settings)
    service = NodeService(
        nodes,
        tasks,
        blobs,
        load_catalog(),
        settings,
        checks,
        sleep=time.sleep,
        monotonic=time.monotonic,
    )
    session = nodes.register("donor", "gpu", {}, [], [])
    return service, tasks, time, session


def submit(tasks: SqlTaskStore) -> str:
    task = NewTask(str(uuid.uuid4()), "alice", TaskKind.TXT2IMG, {"prompt": "x"})
    return tasks.submit(task, max_pending=10).id


def test_without_notifications_a_waiting_claim_polls(db: Engine, tmp_path: Path) -> None:
    service, tasks, time, session = make_service(db, tmp_path)
    claim = service.claim(DONOR, session.node_id, session.id, loaded=None, wait_s=1.0)
    assignment = asyncio.run(claim)
    assert assignment.task is None
    assert tasks.claims == time.sleeps + 1 >= 20  # every 0.05 s


def test_with_notifications_it_queries_on_a_notice_and_rarely_otherwise(
    db: Engine, tmp_path: Path
) -> None:
    service, tasks, time, session = make_service(db, tmp_path)
    service.notified.set()
    ids = (session.node_id, session.id)
    idle = asyncio.run(service.claim(DONOR, *ids, loaded=None, wait_s=10.0))
    assert idle.task is None and tasks.claims <= 6  # the 2 s fallback, not 200 polls
    tasks.claims = 0

    queued: list[str] = []

    def queue_one(_sleeps: int) -> None:
        if not queued:  # during the first wait: another process queues a task and NOTIFYs
            queued.append(submit(tasks))
            service.task_queued(queued[0])

    time.on_sleep = queue_one
    assignment = asyncio.run(service.claim(DONOR, *ids, loaded=None, wait_s=10.0))
    assert assignment.task is not None and assignment.task.id == queued[0]
    assert tasks.claims == 2  # the first look, then the one the notice asked for
