"""Batching across requests in the worker loop (FakeEngine): compatible tasks the worker would
claim one after another run as one batch, each completing with its own image; a cancelled task
leaves its batch at once without disturbing the others, even while its report cannot get
through."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from dan.db import create_db_engine, migrate
from dan.domain import GenerationRequest, ModelKind, ModelRef, TaskKind, TaskStatus
from dan.engine.fake import FakeEngine
from dan.imaging import load_png
from dan.models.registry import ModelRegistry
from dan.storage import InMemoryBlobStore
from dan.tasks.base import CANCELLED_MESSAGE
from dan.tasks.needs import batch_key
from dan.tasks.store import NewTask, SqlTaskStore
from dan.workers.loop import Worker
from tests.api.conftest import install_dummy_checkpoint

Parts = tuple[SqlTaskStore, ModelRegistry, InMemoryBlobStore]


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    migrate(url)
    install_dummy_checkpoint(tmp_path / "models")
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    registry.scan()
    return SqlTaskStore(create_db_engine(url)), registry, InMemoryBlobStore()


def submit(parts: Parts, account: str, prompt: str, seed: int, **fields: object) -> str:
    store, registry, _ = parts
    checkpoint = registry.list(ModelKind.CHECKPOINT)[0]
    ref = ModelRef(checkpoint.sha256, checkpoint.name)
    request = GenerationRequest(prompt, "", seed, "Euler", 4, 7.0, 64, 64, ref)
    request = replace(request, **fields)  # type: ignore[arg-type]
    task = NewTask(
        str(uuid.uuid4()),
        account,
        TaskKind.TXT2IMG,
        request.to_params(),
        batch_key=batch_key(request),
    )
    return store.submit(task, max_pending=100).id


class StalledFails:
    """The real store, whose ``fail`` meets a database that does not answer until ``answers``
    is set; it counts the fails that got through."""

    def __init__(self, store: SqlTaskStore) -> None:
        self._store = store
        self.claim, self.heartbeat, self.complete = store.claim, store.heartbeat, store.complete
        self.answers = threading.Event()
        self.failed: list[str] = []

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        if not self.answers.is_set():
            raise OperationalError("UPDATE tasks", {}, Exception("the database does not answer"))
        self.failed.append(task_id)
        return self._store.fail(task_id, worker_id, error)


def worker(parts: Parts, engine: FakeEngine) -> Worker:
    store, registry, blobs = parts
    return Worker(store, engine, registry, blobs, worker_id="w", lease_s=30, beat_s=0.02)


def pixel(parts: Parts, task_id: str) -> tuple[int, ...]:
    store, _, blobs = parts
    record = store.get(task_id)
    assert record is not None and record.status == TaskStatus.SUCCESS, record
    return tuple(load_png(blobs.get(record.result.image_keys[0])).getpixel((0, 0)))  # type: ignore[arg-type]


def test_compatible_tasks_of_two_accounts_run_as_one_batch_each_with_its_own_image(
    parts: Parts,
) -> None:
    engine = FakeEngine(batch_max=4)
    ids = [
        submit(parts, "a", "one", 1),
        submit(parts, "b", "two", 2, cfg_scale=4.0),
        submit(parts, "a", "three", 3),
    ]
    assert worker(parts, engine).run_once()
    assert engine.batches == [["one", "two", "three"]]
    alone = FakeEngine()
    expected = [alone.txt2img(r, {}, lambda *_: None)[0].getpixel((0, 0)) for r in engine.calls]
    assert [pixel(parts, task_id) for task_id in ids] == expected
    assert len(set(expected)) == 3  # each task got the image of its own seed


def test_an_incompatible_task_between_them_ends_the_batch(parts: Parts) -> None:
    engine = FakeEngine(batch_max=4)
    first = submit(parts, "a", "one", 1)
    other = submit(parts, "b", "wide", 2, width=128)  # b's task comes next in the fair order
    later = submit(parts, "a", "three", 3)
    run = worker(parts, engine)
    while run.run_once():
        pass
    assert engine.batches == []  # no batch of more than one ever formed
    assert [r.prompt for r in engine.calls] == ["one", "wide", "three"]
    for task_id in (first, other, later):
        pixel(parts, task_id)


def test_the_batch_limit_is_kept(parts: Parts) -> None:
    engine = FakeEngine(batch_max=2)
    for i in range(5):
        submit(parts, "a", f"p{i}", i)
    run = worker(parts, engine)
    while run.run_once():
        pass
    assert engine.batches == [["p0", "p1"], ["p2", "p3"]]
    assert [r.prompt for r in engine.calls][-1] == "p4"  # the last one alone


def test_a_cancelled_task_leaves_the_batch_at_once_and_the_others_finish(parts: Parts) -> None:
    store = parts[0]
    engine = FakeEngine(batch_max=4, step_s=0.05)
    ids = [submit(parts, "a", f"p{i}", i, steps=60) for i in range(3)]
    thread = threading.Thread(target=worker(parts, engine).run_once)
    thread.start()
    try:
        while store.get(ids[2]).status != TaskStatus.PROCESSING:  # type: ignore[union-attr]
            time.sleep(0.01)
        store.cancel(ids[1])
        deadline = time.monotonic() + 10
        while store.get(ids[1]).status != TaskStatus.CANCELLED:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert thread.is_alive()  # cancelled while the batch still runs, not at its end
    finally:
        thread.join(20)
    record = store.get(ids[1])
    assert record is not None and record.error == CANCELLED_MESSAGE
    assert not record.result.image_keys
    for task_id in (ids[0], ids[2]):
        pixel(parts, task_id)


def test_a_batch_cancelled_entirely_stops(parts: Parts) -> None:
    store = parts[0]
    engine = FakeEngine(batch_max=4, step_s=0.05)
    ids = [submit(parts, "a", f"p{i}", i, steps=200) for i in range(2)]
    thread = threading.Thread(target=worker(parts, engine).run_once)
    thread.start()
    while store.get(ids[1]).status != TaskStatus.PROCESSING:  # type: ignore[union-attr]
        time.sleep(0.01)
    for task_id in ids:
        store.cancel(task_id)
    thread.join(5)  # 200 steps would take 10 s
    assert not thread.is_alive()
    assert [store.get(i).status for i in ids] == [TaskStatus.CANCELLED] * 2  # type: ignore[union-attr]


def test_a_failed_batch_runs_its_tasks_alone_so_only_the_failing_one_fails(
    parts: Parts,
) -> None:
    store = parts[0]
    ok, bad = submit(parts, "a", "ok", 1), submit(parts, "a", FakeEngine.FAIL_PROMPT, 2)
    engine = FakeEngine(batch_max=4)
    assert worker(parts, engine).run_once()
    failed = store.get(bad)
    assert failed is not None and failed.status == TaskStatus.FAILURE
    assert "told to fail" in (failed.error or "")
    pixel(parts, ok)  # the task that runs alone succeeds


def test_a_cancelled_tasks_report_never_holds_up_the_rest_of_its_batch(parts: Parts) -> None:
    store, registry, blobs = parts
    queue = StalledFails(store)
    engine = FakeEngine(batch_max=4, step_s=0.02)
    ids = [submit(parts, "a", f"p{i}", i, steps=50) for i in range(2)]  # 1 s of steps
    run = Worker(queue, engine, registry, blobs, worker_id="w", lease_s=30, beat_s=0.02)
    thread = threading.Thread(target=run.run_once)
    thread.start()
    try:
        while store.get(ids[1]).status != TaskStatus.PROCESSING:  # type: ignore[union-attr]
            time.sleep(0.01)
        store.cancel(ids[1])
        deadline = time.monotonic() + 10  # a report retried inside the step took 30 s
        while store.get(ids[0]).status != TaskStatus.SUCCESS:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the batch waited for the cancelled task"
            time.sleep(0.01)
        assert store.get(ids[1]).status == TaskStatus.PROCESSING  # type: ignore[union-attr]
    finally:
        queue.answers.set()
        thread.join(20)
    assert not thread.is_alive()
    assert store.get(ids[1]).status == TaskStatus.CANCELLED  # type: ignore[union-attr]
    assert queue.failed == [ids[1]]  # reported once, when the database answered
    pixel(parts, ids[0])


def test_an_abandoned_batch_stops_at_once_and_reports_nothing(parts: Parts) -> None:
    """The worker's server is gone: each task leaves at its next step, none is failed as
    cancelled; they stay held for whoever stops the worker to hand back."""
    store, registry, blobs = parts
    queue = StalledFails(store)
    queue.answers.set()
    engine = FakeEngine(batch_max=4, step_s=0.05)
    ids = [submit(parts, "a", f"p{i}", i, steps=200) for i in range(2)]  # 10 s of steps
    run = Worker(queue, engine, registry, blobs, worker_id="w", lease_s=30, beat_s=0.02)
    stop, abandon = threading.Event(), threading.Event()
    thread = threading.Thread(target=run.run, args=(stop, None, abandon))
    thread.start()
    while store.get(ids[1]).status != TaskStatus.PROCESSING:  # type: ignore[union-attr]
        time.sleep(0.01)
    abandon.set()
    thread.join(5)
    assert not thread.is_alive()
    assert engine.batches == [["p0", "p1"]]
    assert queue.failed == []
    assert [store.get(i).status for i in ids] == [TaskStatus.PROCESSING] * 2  # type: ignore[union-attr]
    assert store.release_worker("w") == 2
