"""The worker loop above the Engine seam (FakeEngine; the real engine has tests/engine)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL.Image import Image
from sqlalchemy.exc import OperationalError

from dan.db import create_db_engine, migrate
from dan.domain import GenerationRequest, ModelKind, ModelRef, TaskKind, TaskStatus
from dan.engine.fake import FakeEngine
from dan.errors import FatalEngineError
from dan.models.registry import ModelRegistry
from dan.storage import InMemoryBlobStore
from dan.tasks.store import NewTask, SqlTaskStore
from dan.workers.loop import Worker
from tests.api.conftest import install_dummy_checkpoint


@pytest.fixture
def parts(tmp_path: Path) -> tuple[SqlTaskStore, ModelRegistry, InMemoryBlobStore]:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    migrate(url)
    install_dummy_checkpoint(tmp_path / "models")
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    registry.scan()
    return SqlTaskStore(create_db_engine(url)), registry, InMemoryBlobStore()


def submit(
    store: SqlTaskStore, registry: ModelRegistry, prompt: str, model: str | None = None
) -> str:
    checkpoint = registry.list(ModelKind.CHECKPOINT)[0]
    ref = ModelRef(model or checkpoint.sha256, checkpoint.name)
    request = GenerationRequest(prompt, "", 1, "Euler", 2, 7.0, 64, 64, ref)
    task = NewTask(str(uuid.uuid4()), "a", TaskKind.TXT2IMG, request.to_params())
    return store.submit(task, max_pending=100).id


def make_worker(
    parts: tuple[SqlTaskStore, ModelRegistry, InMemoryBlobStore], engine: FakeEngine
) -> Worker:
    store, registry, blobs = parts
    return Worker(store, engine, registry, blobs, worker_id="w", lease_s=30, idle_sleep_s=0.01)


def test_failures_stay_with_their_task(
    parts: tuple[SqlTaskStore, ModelRegistry, InMemoryBlobStore],
) -> None:
    store, registry, blobs = parts
    worker = make_worker(parts, FakeEngine())
    bad = submit(store, registry, FakeEngine.FAIL_PROMPT)
    missing = submit(store, registry, "ok", model="d" * 64)
    good = submit(store, registry, "ok")
    while worker.run_once():
        pass
    records = {tid: store.get(tid) for tid in (bad, missing, good)}
    assert records[bad].status == TaskStatus.FAILURE and "told to fail" in records[bad].error  # type: ignore[union-attr,operator]
    assert records[missing].status == TaskStatus.FAILURE and "d" * 10 in records[missing].error  # type: ignore[union-attr,operator]
    assert records[good].status == TaskStatus.SUCCESS  # type: ignore[union-attr]
    assert blobs.get(records[good].result.image_keys[0]).startswith(b"\x89PNG")  # type: ignore[union-attr]


def test_a_dead_engine_ends_the_loop_and_leaves_the_task_for_another_worker(
    parts: tuple[SqlTaskStore, ModelRegistry, InMemoryBlobStore],
) -> None:
    store, registry, _ = parts
    task_id = submit(store, registry, FakeEngine.FATAL_PROMPT)
    with pytest.raises(FatalEngineError):
        make_worker(parts, FakeEngine()).run(threading.Event())
    record = store.get(task_id)
    assert record is not None and record.status == TaskStatus.PROCESSING
    assert store.release_worker("w") == 1  # what a restarted worker does first


class LoadingEngine(FakeEngine):
    """A FakeEngine with a long phase that reports no steps (like loading a checkpoint): only
    the lease's renewal thread keeps the lease alive through it. It holds until released."""

    def __init__(self) -> None:
        super().__init__()
        self.loading, self.release = threading.Event(), threading.Event()

    def txt2img(self, *args: Any, **kwargs: Any) -> list[Image]:
        self.loading.set()
        assert self.release.wait(30), "the test never released the engine"
        return super().txt2img(*args, **kwargs)


def test_lease_is_renewed_while_a_long_task_runs(
    parts: tuple[SqlTaskStore, ModelRegistry, InMemoryBlobStore],
) -> None:
    store, registry, blobs = parts
    engine = LoadingEngine()
    lease_s = 0.6
    worker = Worker(store, engine, registry, blobs, worker_id="w", lease_s=lease_s)
    task_id = submit(store, registry, "slow")
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    try:
        assert engine.loading.wait(10)
        time.sleep(3 * lease_s)  # the task is still running, well past its first lease
        # Without renewals the sweeper would take the task back now and hand it to another.
        assert store.requeue_expired() == 0
        record = store.get(task_id)
        assert record is not None and record.status == TaskStatus.PROCESSING
        assert record.attempts == 1
    finally:
        engine.release.set()
        thread.join(10)
    assert not thread.is_alive()
    record = store.get(task_id)
    assert record is not None and record.status == TaskStatus.SUCCESS and record.attempts == 1


class FlakyQueue:
    """The real store, whose heartbeats fail ``failures`` times first (a database restart)."""

    def __init__(self, store: SqlTaskStore, failures: int) -> None:
        self._store, self.failures = store, failures
        self.claim, self.complete, self.fail = store.claim, store.complete, store.fail

    def heartbeat(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise OperationalError("SELECT 1", {}, Exception("the database restarts"))
        return self._store.heartbeat(*args, **kwargs)


def test_a_database_hiccup_during_a_run_does_not_fail_the_task(
    parts: tuple[SqlTaskStore, ModelRegistry, InMemoryBlobStore],
) -> None:
    store, registry, blobs = parts
    queue = FlakyQueue(store, failures=4)
    engine = FakeEngine(step_s=0.25)  # 2 steps: 0.5 s, about 10 beats
    worker = Worker(queue, engine, registry, blobs, worker_id="w", lease_s=5, beat_s=0.05)
    task_id = submit(store, registry, "a slow one")
    assert worker.run_once()
    assert queue.failures == 0  # the heartbeats failed, and were tried again
    assert store.get(task_id).status == TaskStatus.SUCCESS  # type: ignore[union-attr]


def test_running_out_of_memory_fails_the_task_not_the_worker(
    parts: tuple[SqlTaskStore, ModelRegistry, InMemoryBlobStore],
) -> None:
    store, registry, _ = parts
    worker = make_worker(parts, FakeEngine())
    hungry = submit(store, registry, FakeEngine.OOM_PROMPT)
    after = submit(store, registry, "fine")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while store.get(after).status != TaskStatus.SUCCESS and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.01)
    assert thread.is_alive()
    stop.set()
    thread.join(5)
    record = store.get(hungry)
    assert record is not None and record.status == TaskStatus.FAILURE
    assert "out of memory" in (record.error or "")
    assert store.get(after).status == TaskStatus.SUCCESS  # type: ignore[union-attr]
