"""The TaskStore contract, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from dan.db import create_db_engine, migrate
from dan.db.tables import tasks
from dan.domain import TaskKind, TaskResult, TaskStatus
from dan.errors import TooManyPendingTasks
from dan.tasks.store import CANCELLED_MESSAGE, NewTask, Offer, QueueRules, SqlTaskStore
from tests.fixtures.postgres import schema_url
from tests.store.conftest import POSTGRES_URL, Clock

LEASE = 30.0


def submit(store: SqlTaskStore, account: str = "alice", max_pending: int = 100) -> str:
    task = NewTask(str(uuid.uuid4()), account, TaskKind.TXT2IMG, {"prompt": account})
    return store.submit(task, max_pending=max_pending).id


def claim_all(store: SqlTaskStore) -> list[str]:
    """Claim and complete every pending task; the accounts in the order they ran."""
    order = []
    while (task := store.claim("w", lease_s=LEASE)) is not None:
        order.append(task.params["prompt"])
        assert store.complete(task.id, "w", TaskResult(("k",), (1,)))
    return order


def test_submit_then_get_round_trips(store: SqlTaskStore) -> None:
    task_id = submit(store)
    record = store.get(task_id)
    assert record is not None
    assert (record.status, record.queue_position, record.params) == (
        TaskStatus.PENDING,
        1,
        {"prompt": "alice"},
    )
    assert store.get("no-such-task") is None


def test_fifo_within_an_account(store: SqlTaskStore) -> None:
    ids = [submit(store) for _ in range(4)]
    assert [store.get(i).queue_position for i in ids] == [1, 2, 3, 4]  # type: ignore[union-attr]
    claimed = [store.claim("w", lease_s=LEASE) for _ in ids]
    assert [c.id for c in claimed if c] == ids


def test_accounts_interleave_round_robin(store: SqlTaskStore) -> None:
    for account in ["a", "a", "a", "b", "b", "c"]:
        submit(store, account)
    assert claim_all(store) == ["a", "b", "c", "a", "b", "a"]


def test_queue_position_counts_the_tasks_that_run_first(store: SqlTaskStore) -> None:
    a = [submit(store, "a") for _ in range(3)]
    b1 = submit(store, "b")
    # b's first task runs right after a's first: a flood from one account does not bury it.
    assert store.get(b1).queue_position == 2  # type: ignore[union-attr]
    assert store.get(a[2]).queue_position == 4  # type: ignore[union-attr]
    store.claim("w", lease_s=LEASE)
    assert store.get(b1).queue_position == 1  # type: ignore[union-attr]
    assert store.get(a[0]).queue_position == 0  # type: ignore[union-attr]


def test_active_lists_an_accounts_running_then_pending_tasks(store: SqlTaskStore) -> None:
    first, second, third = (submit(store, "a") for _ in range(3))
    submit(store, "b")
    assert store.claim("w", lease_s=LEASE).id == first  # type: ignore[union-attr]
    store.cancel(third)
    active = store.active("a")
    assert [(r.id, r.status, r.queue_position) for r in active] == [
        (first, TaskStatus.PROCESSING, 0),
        (second, TaskStatus.PENDING, 2),  # b's task runs first
    ]
    assert store.active("nobody") == []


def test_an_account_arriving_late_waits_for_one_round_not_the_backlog(store: SqlTaskStore) -> None:
    for _ in range(6):
        submit(store, "flood")
    store.claim("w", lease_s=LEASE)
    store.claim("w", lease_s=LEASE)
    late = submit(store, "late")
    # Behind the flood's next task only, not behind its 4 pending ones.
    assert store.get(late).queue_position == 2  # type: ignore[union-attr]
    assert claim_all(store) == ["flood", "late", "flood", "flood", "flood"]


def test_pending_limit_per_account(store: SqlTaskStore) -> None:
    for _ in range(3):
        submit(store, "a", max_pending=3)
    with pytest.raises(TooManyPendingTasks):
        submit(store, "a", max_pending=3)
    submit(store, "b", max_pending=3)  # other accounts are not affected
    store.claim("w", lease_s=LEASE)
    submit(store, "a", max_pending=3)  # a running task no longer counts as pending


def test_the_pending_limit_counts_images(store: SqlTaskStore) -> None:
    def batch(images: int) -> NewTask:
        return NewTask(str(uuid.uuid4()), "a", TaskKind.TXT2IMG, {"prompt": "a"}, images=images)

    store.submit(batch(3), max_pending=4)
    store.submit(batch(1), max_pending=4)
    assert store.pending_count("a") == 4
    with pytest.raises(TooManyPendingTasks) as refused:
        store.submit(batch(1), max_pending=4)
    assert "4 images pending (the limit is 4 pending images" in refused.value.message
    store.claim("w", lease_s=LEASE)  # the batch of 3 runs: its images no longer count
    assert store.pending_count("a") == 1
    with pytest.raises(TooManyPendingTasks, match="1 image pending and this task makes 4"):
        store.submit(batch(4), max_pending=4)
    store.submit(batch(3), max_pending=4)


def test_claim_is_exclusive_under_concurrency(store: SqlTaskStore) -> None:
    ids = {submit(store, f"acct{i % 3}") for i in range(30)}
    claimed: list[str] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (task := store.claim(name, lease_s=LEASE)) is not None:
            with lock:
                claimed.append(task.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_success_stores_the_result(store: SqlTaskStore) -> None:
    task_id = submit(store)
    task = store.claim("w", lease_s=LEASE)
    assert task is not None and task.attempt == 1
    assert store.complete(task_id, "w", TaskResult(("x/0.png",), (42,)))
    record = store.get(task_id)
    assert record is not None
    assert (record.status, record.result.image_keys, record.result.seeds, record.progress) == (
        TaskStatus.SUCCESS,
        ("x/0.png",),
        (42,),
        1.0,
    )


def test_failure_keeps_its_message(store: SqlTaskStore) -> None:
    task_id = submit(store)
    store.claim("w", lease_s=LEASE)
    assert store.fail(task_id, "w", "out of memory")
    record = store.get(task_id)
    assert record is not None and (record.status, record.error) == (
        TaskStatus.FAILURE,
        "out of memory",
    )


def test_cancel_pending_never_runs(store: SqlTaskStore) -> None:
    task_id = submit(store)
    record = store.cancel(task_id)
    assert record is not None and record.status == TaskStatus.CANCELLED
    assert record.error == CANCELLED_MESSAGE and record.status.wire == 3
    assert store.claim("w", lease_s=LEASE) is None


def test_a_run_that_stops_after_a_cancel_ends_cancelled(store: SqlTaskStore) -> None:
    """However the worker words its failure, a task whose cancel was asked for ends cancelled."""
    task_id = submit(store)
    store.claim("w", lease_s=LEASE)
    store.cancel(task_id)
    assert store.fail(task_id, "w", "interrupted")
    record = store.get(task_id)
    assert record is not None
    assert (record.status, record.error) == (TaskStatus.CANCELLED, CANCELLED_MESSAGE)


def test_cancel_processing_asks_the_worker_to_stop(store: SqlTaskStore) -> None:
    task_id = submit(store)
    store.claim("w", lease_s=LEASE)
    assert not store.heartbeat(task_id, "w", lease_s=LEASE).cancel_requested
    store.cancel(task_id)
    beat = store.heartbeat(task_id, "w", lease_s=LEASE, progress=0.5)
    assert beat.held and beat.cancel_requested


def test_heartbeat_records_progress(store: SqlTaskStore) -> None:
    task_id = submit(store)
    store.claim("w", lease_s=LEASE)
    store.heartbeat(task_id, "w", lease_s=LEASE, progress=0.25)
    assert store.get(task_id).progress == 0.25  # type: ignore[union-attr]


def test_expired_lease_requeues_and_late_result_is_rejected(
    store: SqlTaskStore, clock: Clock
) -> None:
    task_id = submit(store)
    store.claim("dead", lease_s=LEASE)
    clock.advance(LEASE - 1)
    assert store.requeue_expired() == 0
    clock.advance(2)
    assert store.requeue_expired() == 1
    record = store.get(task_id)
    assert record is not None and (record.status, record.queue_position) == (TaskStatus.PENDING, 1)
    retry = store.claim("alive", lease_s=LEASE)
    assert retry is not None and (retry.id, retry.attempt) == (task_id, 2)
    # The first worker comes back too late: nothing it says changes the task.
    assert not store.heartbeat(task_id, "dead", lease_s=LEASE).held
    assert not store.complete(task_id, "dead", TaskResult(("late",), (0,)))
    assert store.complete(task_id, "alive", TaskResult(("ok",), (1,)))
    assert store.get(task_id).result.image_keys == ("ok",)  # type: ignore[union-attr]


def test_heartbeats_keep_the_lease(store: SqlTaskStore, clock: Clock) -> None:
    task_id = submit(store)
    store.claim("w", lease_s=LEASE)
    for _ in range(5):
        clock.advance(LEASE / 2)
        assert store.heartbeat(task_id, "w", lease_s=LEASE).held
        assert store.requeue_expired() == 0


def lease_of(db: Engine, task_id: str) -> float:
    query = select(tasks.c.lease_expires_at).where(tasks.c.id == task_id)
    with db.connect() as conn:
        return float(conn.execute(query).scalar_one())


def test_lazy_heartbeats_write_the_lease_once_per_half_lease(
    store: SqlTaskStore, clock: Clock, db: Engine
) -> None:
    task_id = submit(store)
    store.claim("w", lease_s=LEASE)
    claimed_lease = lease_of(db, task_id)
    beats = []
    for step in range(20):  # 20 beats over just over half the lease: one write
        clock.advance(LEASE / 38)
        beats.append(store.heartbeat(task_id, "w", lease_s=LEASE, progress=step / 20, lazy=True))
    assert all(beat.held and not beat.cancel_requested for beat in beats)
    assert [beat.attempt for beat in beats] == [1] * 20
    assert sum(beat.renewed for beat in beats) == 1
    assert lease_of(db, task_id) > claimed_lease
    # The renewal wrote the progress of its beat; watchers see later beats through memory.
    renewal = next(step for step, beat in enumerate(beats) if beat.renewed)
    assert store.get(task_id).progress == renewal / 20  # type: ignore[union-attr]


def test_a_lazy_heartbeat_sees_a_cancel_at_once(store: SqlTaskStore) -> None:
    task_id = submit(store)
    store.claim("w", lease_s=LEASE)
    assert not store.heartbeat(task_id, "w", lease_s=LEASE, lazy=True).cancel_requested
    store.cancel(task_id)
    beat = store.heartbeat(task_id, "w", lease_s=LEASE, progress=0.5, lazy=True)
    assert beat.held and beat.cancel_requested and not beat.renewed


def test_lazy_heartbeats_do_not_keep_a_dead_lease(store: SqlTaskStore, clock: Clock) -> None:
    task_id = submit(store)
    store.claim("w", lease_s=LEASE)
    for _ in range(5):  # beats that only read: the lease still ends LEASE after the claim
        clock.advance(LEASE / 12)
        assert not store.heartbeat(task_id, "w", lease_s=LEASE, lazy=True).renewed
    clock.advance(LEASE - 5 * LEASE / 12 + 1)
    assert store.requeue_expired() == 1
    assert not store.heartbeat(task_id, "w", lease_s=LEASE, lazy=True).held


def test_lazy_heartbeats_keep_a_live_lease(store: SqlTaskStore, clock: Clock) -> None:
    task_id = submit(store)
    store.claim("w", lease_s=LEASE)
    for _ in range(40):  # a beat every tenth of the lease, for four leases
        clock.advance(LEASE / 10)
        assert store.heartbeat(task_id, "w", lease_s=LEASE, lazy=True).held
        assert store.requeue_expired() == 0


def test_gives_up_after_max_attempts(db: Engine, clock: Clock) -> None:
    store = SqlTaskStore(db, clock=clock, rules=QueueRules(max_attempts=2))
    task_id = submit(store)
    for _ in range(2):
        assert store.claim("w", lease_s=LEASE) is not None
        clock.advance(LEASE + 1)
        store.requeue_expired()
    record = store.get(task_id)
    assert record is not None and record.status == TaskStatus.FAILURE
    assert "stopped responding 2 times" in (record.error or "")


def test_release_worker_requeues_what_it_held(store: SqlTaskStore) -> None:
    task_id = submit(store)
    store.claim("restarted", lease_s=LEASE)
    assert store.release_worker("other") == 0
    assert store.release_worker("restarted") == 1
    assert store.get(task_id).status == TaskStatus.PENDING  # type: ignore[union-attr]


def test_statuses_reads_many_at_once(store: SqlTaskStore) -> None:
    a, b = submit(store), submit(store)
    store.claim("w", lease_s=LEASE)
    assert store.statuses([a, b, "missing"]) == {a: TaskStatus.PROCESSING, b: TaskStatus.PENDING}


def test_old_results_are_listed_and_marked_expired(store: SqlTaskStore, clock: Clock) -> None:
    task_id = submit(store)
    store.claim("w", lease_s=LEASE)
    store.complete(task_id, "w", TaskResult(("k",), (1,)))
    assert store.finished_before(clock.now - 10, limit=10) == []
    clock.advance(100)
    assert [r.id for r in store.finished_before(clock.now - 10, limit=10)] == [task_id]
    store.mark_expired([task_id])
    assert store.finished_before(clock.now, limit=10) == []
    assert store.get(task_id).expired  # type: ignore[union-attr]


def test_statistics_count_successes_by_age(store: SqlTaskStore, clock: Clock) -> None:
    for _ in range(2):
        submit(store)
    claim_all(store)
    clock.advance(2 * 86400)
    submit(store)
    claim_all(store)
    failed = submit(store)
    store.claim("w", lease_s=LEASE)
    store.fail(failed, "w", "boom")
    stats = store.statistics()
    assert (stats.total, stats.last_day, stats.last_week) == (3, 1, 3)


def test_migrations_are_idempotent(db_url: str, db: Engine) -> None:
    from dan.db import migrate

    migrate(db_url)  # the fixture already migrated once
    assert SqlTaskStore(db).statistics().total == 0


def test_concurrent_submits_never_pass_the_pending_limit(db_url: str, db: Engine) -> None:
    # Every submit is its own client (engine); on PostgreSQL the count-then-insert would race.
    engines = [create_db_engine(db_url) for _ in range(10)]
    limit, refused = 7, []
    barrier = threading.Barrier(len(engines))

    def flood(engine: Engine) -> None:
        store = SqlTaskStore(engine)
        barrier.wait()
        for _ in range(10):
            try:
                submit(store, "flood", max_pending=limit)
            except TooManyPendingTasks:
                refused.append(1)

    threads = [threading.Thread(target=flood, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    assert SqlTaskStore(db).pending_count("flood") == limit and len(refused) == 100 - limit


def test_expired_tasks_forget_their_prompt_parameters_and_caption(
    store: SqlTaskStore, clock: Clock
) -> None:
    task_id = store.submit(
        NewTask(str(uuid.uuid4()), "a", TaskKind.INTERROGATE, {"prompt": "secret"}),
        max_pending=10,
    ).id
    store.claim("w", lease_s=LEASE)
    store.complete(task_id, "w", TaskResult(caption="a private caption"))
    store.mark_expired([task_id])
    record = store.get(task_id)
    assert record is not None and record.expired and record.status == TaskStatus.SUCCESS
    assert record.params == {} and record.result.caption is None


def sqlite_db(tmp_path: Path) -> Engine:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    migrate(url)
    return create_db_engine(url)


def test_a_waiting_claim_with_nothing_for_it_does_not_take_the_write_lock(
    tmp_path: Path,
) -> None:
    # SQLite's write lock (PostgreSQL claims skip locked rows instead).
    db = sqlite_db(tmp_path)
    store = SqlTaskStore(db)
    task = NewTask(str(uuid.uuid4()), "someone", TaskKind.TXT2IMG, {}, requires=("f" * 64,))
    store.submit(task, max_pending=10)  # pending, but the claiming node lacks its file
    with db.begin():  # another process holds the write lock (BEGIN IMMEDIATE)
        started = time.monotonic()
        offer = Offer(node_id="a-node-with-no-files", account="a")
        assert SqlTaskStore(db).claim("w", lease_s=LEASE, offer=offer) is None
        assert time.monotonic() - started < 1.0  # not waiting 30 s for the lock
    db.dispose()


def test_submit_reads_the_virtual_time_from_its_partial_index(tmp_path: Path) -> None:
    # Checked on SQLite: PostgreSQL's plan depends on the table's statistics.
    db = sqlite_db(tmp_path)
    claimed = select(func.max(tasks.c.tag)).where(tasks.c.started_at.is_not(None))
    with db.connect() as conn:
        sql = str(claimed.compile(conn, compile_kwargs={"literal_binds": True}))
        plan = " ".join(str(row) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
    db.dispose()
    assert "ix_tasks_started_tag" in plan


@pytest.mark.postgres
def test_leases_run_on_the_database_clock_not_this_process_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not POSTGRES_URL:
        pytest.skip("set DAN_TEST_POSTGRES_URL: SQLite's clock is its machine's own")
    with schema_url(POSTGRES_URL) as url:
        migrate(url)
        db = create_db_engine(url)
        store = SqlTaskStore(db)  # no test clock: the database's time
        task_id = submit(store)
        assert store.claim("w", lease_s=LEASE) is not None
        fast = time.time() + 3600
        monkeypatch.setattr(time, "time", lambda: fast)  # this machine's clock runs an hour fast
        assert store.requeue_expired() == 0
        assert store.heartbeat(task_id, "w", lease_s=LEASE).held
        db.dispose()
