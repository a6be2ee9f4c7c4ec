"""A node's waiting claim asks the database only when a task was queued, while queue
notifications are on (PostgreSQL's NOTIFY); without them it polls as before."""

from __future__ import annotations

import asyncio
import time as time_module
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from dan.config import Settings
from dan.domain import Account, ClaimedTask, TaskKind
from dan.models.catalog import load_catalog
from dan.nodes import NodeService, SqlNodeStore
from dan.nodes.base import NodeRules
from dan.nodes.checks import ResultChecks
from dan.nodes.sessions import NodeDescription
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


def test_notices_that_found_no_claim_waiting_do_not_wake_a_later_claim(
    db: Engine, tmp_path: Path
) -> None:
    """Before: every notice that found no claim waiting was kept (up to 1,024) and the next
    claim was handed one as it entered, then the next each time it came back: after a burst
    of submits and cancels, it asked the database once per stale notice, back to back."""
    service, tasks, time, session = make_service(db, tmp_path)
    service.notified.set()
    for _ in range(200):  # submitted and cancelled while no claim waited on this replica
        task_id = submit(tasks)
        tasks.cancel(task_id)
        service.task_queued(task_id)
    time.now += 5.0
    ids = (session.node_id, session.id)
    idle = asyncio.run(service.claim(DONOR, *ids, loaded=None, wait_s=10.0))
    assert idle.task is None and tasks.claims <= 3  # its first look and the fallback's


# -- one wake per queued task ------------------------------------------------------------------


class PickyStore(CountingStore):
    """The real store, where the workers in ``cannot`` never find anything (as a node without
    the task's files would), and every claim takes ``delay_s`` (a slow database)."""

    cannot: frozenset[str] = frozenset()
    delay_s = 0.0
    running = 0
    most_at_once = 0

    def claim(self, worker_id: str, **kwargs: Any) -> ClaimedTask | None:
        self.running += 1  # only claim threads run this; a lost update only lowers the max
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            time_module.sleep(self.delay_s)
            if worker_id in self.cannot:
                self.claims += 1
                return None
            return super().claim(worker_id, **kwargs)
        finally:
            self.running -= 1


def real_service(db: Engine, tmp_path: Path, **settings: Any) -> tuple[NodeService, PickyStore]:
    """A service on real time with notifications on, as an API replica on PostgreSQL runs."""
    config = Settings(data_dir=tmp_path, max_nodes_per_account=100, **settings)  # type: ignore[call-arg]
    tasks = PickyStore(db)
    nodes = SqlNodeStore(db, rules=NodeRules(max_nodes_per_account=100))
    blobs = InMemoryBlobStore()
    checks = ResultChecks(SqlCheckStore(db), nodes, blobs, config)
    service = NodeService(nodes, tasks, blobs, load_catalog(), config, checks)
    service.notified.set()
    return service, tasks


def sessions(service: NodeService, count: int) -> list[Session]:
    return [service.register(DONOR, NodeDescription(f"gpu-{i}", {})) for i in range(count)]


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time_module.monotonic() + timeout_s
    while not condition():
        assert time_module.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def waiting(service: NodeService, session: Session, wait_s: float) -> Any:
    return service.claim(DONOR, session.node_id, session.id, loaded=None, wait_s=wait_s)


def test_a_queued_task_wakes_one_waiting_claim_the_longest_waiting(
    db: Engine, tmp_path: Path
) -> None:
    service, tasks = real_service(db, tmp_path)
    waiters = sessions(service, 20)

    async def scenario() -> None:
        claims = []
        for session in waiters:  # in this order: the first waits longest
            claims.append(asyncio.ensure_future(waiting(service, session, 3.0)))
            await until(lambda: tasks.claims == len(claims))  # each looked once, found nothing
        task_id = submit(tasks)
        service.task_queued(task_id)
        results = await asyncio.gather(*claims)
        assert results[0].task is not None and results[0].task.id == task_id
        assert all(result.task is None for result in results[1:])

    asyncio.run(scenario())
    assert tasks.claims == 20 + 1  # the first looks, then one for the queued task: no herd
    service.close()


def test_a_woken_claim_that_cannot_take_the_task_passes_it_on(db: Engine, tmp_path: Path) -> None:
    service, tasks = real_service(db, tmp_path)
    first, second, third = sessions(service, 3)
    tasks.cannot = frozenset({first.worker_id})

    async def scenario() -> list[Any]:
        claims = []
        for session in (first, second, third):
            claims.append(asyncio.ensure_future(waiting(service, session, 3.0)))
            await until(lambda: tasks.claims == len(claims))
        task_id = submit(tasks)
        service.task_queued(task_id)
        results = await asyncio.gather(*claims)
        return [None if r.task is None else r.task.id for r in results] + [task_id]

    got_first, got_second, got_third, task_id = asyncio.run(scenario())
    assert (got_first, got_second, got_third) == (None, task_id, None)
    assert tasks.claims == 3 + 2  # the first tried and passed it to the second, who took it
    service.close()


def test_a_task_nobody_here_can_take_ends_with_everyone_having_looked(
    db: Engine, tmp_path: Path
) -> None:
    service, tasks = real_service(db, tmp_path)
    waiters = sessions(service, 12)
    tasks.cannot = frozenset(session.worker_id for session in waiters)

    async def scenario() -> None:
        claims = []
        for session in waiters:
            claims.append(asyncio.ensure_future(waiting(service, session, 2.0)))
            await until(lambda: tasks.claims == len(claims))
        service.task_queued(submit(tasks))
        await until(lambda: tasks.claims >= 2 * len(waiters))  # passed on, then to everyone
        await asyncio.gather(*claims)

    asyncio.run(scenario())
    assert tasks.claims == 2 * len(waiters)  # each looked once more, not again and again
    service.close()


def test_heartbeats_are_answered_while_many_claims_wait_on_a_slow_database(
    db: Engine, tmp_path: Path
) -> None:
    service, tasks = real_service(db, tmp_path, claim_threads=2)
    waiters = sessions(service, 50)
    tasks.delay_s = 0.1  # 50 claims at once take 2.5 s on 2 threads
    busy = service.register(DONOR, NodeDescription("busy", {}))
    beats: list[float] = []

    async def scenario() -> None:
        claims = [asyncio.ensure_future(waiting(service, s, 3.0)) for s in waiters]
        for _ in range(5):
            await asyncio.sleep(0.1)  # the claims' first looks are queued on their threads
            started = time_module.monotonic()
            beat = await asyncio.to_thread(  # as a status or heartbeat request runs
                service.heartbeat, DONOR, busy.node_id, busy.id, "no-such-task", 0.5
            )
            beats.append(time_module.monotonic() - started)
            assert not beat.held
        await asyncio.gather(*claims)

    asyncio.run(scenario())
    assert tasks.most_at_once <= 2  # claims use their own threads and connections, no more
    assert max(beats) < 0.5, beats
    service.close()
