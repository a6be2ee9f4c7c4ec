"""Claims ``like`` a batch key: a batch holds only the tasks the worker would have claimed next
anyway, one after another, so it never lets a task jump ahead of another account's earlier
one. On SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import uuid

from dan.domain import ClaimedTask, TaskKind
from dan.tasks.store import NewTask, Offer, SqlTaskStore

LEASE = 30.0


def submit(store: SqlTaskStore, account: str, key: str | None, prompt: str = "") -> str:
    task = NewTask(
        str(uuid.uuid4()),
        account,
        TaskKind.TXT2IMG,
        {"prompt": prompt or account},
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
