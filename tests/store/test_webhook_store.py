"""The WebhookStore contract, on SQLite and (when configured) PostgreSQL: a webhook is written
with its task, claimed only once the task has ended, by one sender at a time, and settled only
by the try that holds it; the accounts' secrets are made once and rotated."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import Engine

from dan.accounts import SqlAccountStore
from dan.domain import TaskKind, TaskResult
from dan.tasks.store import NewTask, SqlTaskStore
from dan.webhooks.store import (
    DELIVERED,
    FAILED,
    PENDING,
    WAITING,
    Delivery,
    SqlWebhookStore,
)
from tests.store.conftest import Clock

URL = "https://hooks.example/dan"
LEASE = 60.0


@pytest.fixture
def hooks(db: Engine, clock: Clock) -> SqlWebhookStore:
    return SqlWebhookStore(db, clock=clock)


def submit(store: SqlTaskStore, url: str | None = URL, account: str = "alice") -> str:
    task = NewTask(str(uuid.uuid4()), account, TaskKind.TXT2IMG, {}, callback_url=url)
    return store.submit(task, max_pending=100).id


def finish(store: SqlTaskStore, task_id: str) -> None:
    claimed = store.claim("w", lease_s=30)
    assert claimed is not None and claimed.id == task_id
    assert store.complete(task_id, "w", TaskResult(("k",), (1,)))


def test_a_webhook_is_written_with_its_task_and_waits_for_it(
    store: SqlTaskStore, hooks: SqlWebhookStore
) -> None:
    task_id = submit(store)
    without = submit(store, url=None)
    state = hooks.state(task_id)
    assert state is not None and (state.state, state.attempts) == (WAITING, 0)
    assert hooks.state(without) is None
    assert hooks.claim_due(limit=10, lease_s=LEASE) == []  # pending
    store.claim("w", lease_s=30)
    assert hooks.claim_due(limit=10, lease_s=LEASE) == []  # running
    assert store.complete(task_id, "w", TaskResult(("k",), (1,)))
    assert hooks.claim_due(limit=10, lease_s=LEASE) == [Delivery(task_id, "alice", URL, 1)]


def test_failed_and_cancelled_tasks_are_due_too(
    store: SqlTaskStore, hooks: SqlWebhookStore
) -> None:
    failed, cancelled = submit(store), submit(store)
    store.claim("w", lease_s=30)
    assert store.fail(failed, "w", "boom")
    store.cancel(cancelled)
    claimed = hooks.claim_due(limit=10, lease_s=LEASE)
    assert sorted(d.task_id for d in claimed) == sorted([failed, cancelled])


def test_a_claimed_try_is_leased_then_taken_again_if_its_sender_vanished(
    store: SqlTaskStore, hooks: SqlWebhookStore, clock: Clock
) -> None:
    task_id = submit(store)
    finish(store, task_id)
    first = hooks.claim_due(limit=10, lease_s=LEASE)
    assert [d.attempt for d in first] == [1]
    assert hooks.claim_due(limit=10, lease_s=LEASE) == []  # another replica: leased
    clock.advance(LEASE + 1)
    again = hooks.claim_due(limit=10, lease_s=LEASE)
    assert [d.attempt for d in again] == [2]
    # The vanished sender's late answer changes nothing; the current try's does.
    assert not hooks.delivered(first[0])
    assert hooks.delivered(again[0])
    state = hooks.state(task_id)
    assert state is not None and (state.state, state.attempts) == (DELIVERED, 2)
    assert state.delivered_at == clock.now
    clock.advance(10 * LEASE)
    assert hooks.claim_due(limit=10, lease_s=LEASE) == []  # delivered once and for all


def test_a_retry_is_due_after_its_delay_and_a_give_up_is_final(
    store: SqlTaskStore, hooks: SqlWebhookStore, clock: Clock
) -> None:
    task_id = submit(store)
    finish(store, task_id)
    (try1,) = hooks.claim_due(limit=10, lease_s=LEASE)
    assert hooks.retry(try1, "answered HTTP 500", after_s=30)
    state = hooks.state(task_id)
    assert state is not None and (state.state, state.last_error) == (PENDING, "answered HTTP 500")
    clock.advance(29)
    assert hooks.claim_due(limit=10, lease_s=LEASE) == []
    clock.advance(2)
    (try2,) = hooks.claim_due(limit=10, lease_s=LEASE)
    assert try2.attempt == 2
    assert hooks.give_up(try2, "x" * 2000)
    state = hooks.state(task_id)
    assert state is not None and (state.state, state.attempts) == (FAILED, 2)
    assert state.last_error is not None and len(state.last_error) == 500
    clock.advance(10 * LEASE)
    assert hooks.claim_due(limit=10, lease_s=LEASE) == []


def test_due_webhooks_come_oldest_first_and_at_most_the_limit(
    store: SqlTaskStore, hooks: SqlWebhookStore, clock: Clock
) -> None:
    ids = []
    for _ in range(3):
        ids.append(submit(store))
        clock.advance(1)
    for task_id in ids:
        finish(store, task_id)
    assert [d.task_id for d in hooks.claim_due(limit=2, lease_s=LEASE)] == ids[:2]
    assert [d.task_id for d in hooks.claim_due(limit=2, lease_s=LEASE)] == ids[2:]


def test_concurrent_senders_never_claim_one_try_twice(
    store: SqlTaskStore, hooks: SqlWebhookStore
) -> None:
    ids = [submit(store, account=f"acct{i % 3}") for i in range(24)]
    while (task := store.claim("w", lease_s=30)) is not None:
        assert store.complete(task.id, "w", TaskResult(("k",), (1,)))
    claimed: list[str] = []
    lock = threading.Lock()

    def send() -> None:
        while batch := hooks.claim_due(limit=3, lease_s=LEASE):
            with lock:
                claimed.extend(d.task_id for d in batch)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)


def test_a_secret_is_made_on_first_use_kept_and_rotated(db: Engine, hooks: SqlWebhookStore) -> None:
    SqlAccountStore(db).ensure_account("alice", "alice")
    SqlAccountStore(db).ensure_account("bob", "bob")
    secret = hooks.secret("alice")
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert hooks.secret("alice") == secret
    assert hooks.secret("bob") != secret
    rotated = hooks.rotate_secret("alice")
    assert rotated != secret and hooks.secret("alice") == rotated
    with pytest.raises(LookupError):
        hooks.secret("nobody")
