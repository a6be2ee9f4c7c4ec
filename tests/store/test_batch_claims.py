"""Claims ``like`` a batch key: a batch holds only the tasks the worker would have claimed next
anyway, one after another, so it never lets a task jump ahead of another account's earlier
one; and a batch's tasks share the time limit of the whole batch. On SQLite and (when
configured) PostgreSQL."""

from __future__ import annotations

import uuid

from sqlalchemy import Engine

from dan.domain import ClaimedTask, TaskKind, TaskStatus
from dan.tasks.store import NewTask, Offer, QueueRules, SqlTaskStore
from tests.store.conftest import Clock

LEASE = 30.0


def submit(
    store: SqlTaskStore, account: str, key: str | None, prompt: str = "", cost: float = 1.0
) -> str:
    task = NewTask(
        str(uuid.uuid4()),
        account,
        TaskKind.TXT2IMG,
        {"prompt": prompt or account},
        cost=cost,
        checkpoint="m",
        batch_key=key,
    )
    return store.submit(task, max_pending=100).id


def batch(store: SqlTaskStore, limit: int, offer: Offer | None = None) -> list[ClaimedTask]:
    """What a worker claims as one batch: a plain claim, then claims like it up to ``limit``."""
    first = store.claim("w", lease_s=LEASE, offer=offer)
    assert first is not None
    claimed = [first]
    while first.batch_key is not None and len(claimed) < limit:
        more = store.claim("w", lease_s=LEASE, offer=offer, like=first.batch_key)
        if more is None:
            break
        claimed.append(more)
    return claimed


def test_a_claimed_task_carries_its_batch_key(store: SqlTaskStore) -> None:
    submit(store, "a", "k1")
    task = store.claim("w", lease_s=LEASE)
    assert task is not None and task.batch_key == "k1"


def test_compatible_tasks_of_two_accounts_join_one_batch_in_queue_order(
    store: SqlTaskStore,
) -> None:
    ids = [submit(store, "a", "k"), submit(store, "b", "k"), submit(store, "a", "k")]
    assert [task.id for task in batch(store, limit=8)] == ids


def test_a_batch_stops_at_another_accounts_earlier_incompatible_task(
    store: SqlTaskStore,
) -> None:
    first = submit(store, "a", "k")
    other = submit(store, "b", "other")  # b's task is next in the fair order
    later = submit(store, "a", "k")  # compatible, but must not jump ahead of b's task
    assert [task.id for task in batch(store, limit=8)] == [first]
    assert [task.id for task in batch(store, limit=8)] == [other]
    assert [task.id for task in batch(store, limit=8)] == [later]


def test_a_batch_never_exceeds_its_limit(store: SqlTaskStore) -> None:
    ids = [submit(store, "a", "k") for _ in range(5)]
    assert [task.id for task in batch(store, limit=2)] == ids[:2]
    assert [task.id for task in batch(store, limit=2)] == ids[2:4]
    assert [task.id for task in batch(store, limit=2)] == ids[4:]


def test_tasks_without_a_key_never_batch(store: SqlTaskStore) -> None:
    submit(store, "a", None)
    submit(store, "a", None)
    assert len(batch(store, limit=8)) == 1
    assert store.claim("w", lease_s=LEASE, like="k") is None  # a key never matches NULL


def test_a_like_claim_respects_the_offers_slots(store: SqlTaskStore) -> None:
    for _ in range(4):
        submit(store, "a", "k")
    assert len(batch(store, limit=8, offer=Offer(slots=3))) == 3


def test_a_batchs_tasks_share_the_time_limit_of_the_whole_batch(db: Engine, clock: Clock) -> None:
    """Run as one, each task takes the batch's time: its limit is counted from the cost of all
    (5 s + 5 s x (1 + 2 + 1) = 25 s), not its own (10 or 15 s); their leases run 30 s."""
    store = SqlTaskStore(db, clock=clock, rules=QueueRules(runtime_base_s=5, runtime_per_cost_s=5))
    ids = [submit(store, "a", "k", cost=cost) for cost in (1.0, 2.0, 1.0)]
    assert [task.id for task in batch(store, limit=8)] == ids
    clock.advance(20)
    assert store.requeue_expired() == 0
    assert {store.get(i).status for i in ids} == {TaskStatus.PROCESSING}  # type: ignore[union-attr]
    clock.advance(6)
    assert store.requeue_expired() == 3


def test_a_task_alone_keeps_the_time_limit_of_its_own_cost(db: Engine, clock: Clock) -> None:
    store = SqlTaskStore(db, clock=clock, rules=QueueRules(runtime_base_s=5, runtime_per_cost_s=5))
    first, other = submit(store, "a", "k", cost=1.0), submit(store, "b", "other", cost=3.0)
    assert [task.id for task in batch(store, limit=8)] == [first]  # alone: the next cannot join
    assert [task.id for task in batch(store, limit=8)] == [other]
    clock.advance(11)  # past the first's 10 s, within the other's 20 s
    assert store.requeue_expired() == 1
    assert store.get(first).status == TaskStatus.PENDING  # type: ignore[union-attr]
    assert store.get(other).status == TaskStatus.PROCESSING  # type: ignore[union-attr]
