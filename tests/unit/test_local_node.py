"""The embedded worker is a node: it says what it serves and claims only what it can run."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from sqlalchemy import select

from dan.db import create_db_engine, migrate
from dan.db.tables import honor_grants
from dan.domain import (
    LOCAL_ACCOUNT,
    LOCAL_NODE_NAME,
    GenerationRequest,
    ModelKind,
    ModelRef,
    TaskKind,
    TaskStatus,
)
from dan.engine.fake import FakeEngine
from dan.metrics.families import Metrics
from dan.models.registry import ModelRegistry
from dan.nodes.store import SqlNodeStore
from dan.storage import InMemoryBlobStore
from dan.tasks.store import NewTask, SqlTaskStore
from dan.workers.local import LOCAL_NODE_ID, LocalNodeQueue, local_session_id, orphaned
from dan.workers.loop import Worker
from tests.api.conftest import install_dummy_checkpoint


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def submit(store: SqlTaskStore, sha: str) -> str:
    request = GenerationRequest("p", "", 1, "Euler", 2, 7.0, 64, 64, ModelRef(sha, "m"))
    task = NewTask(
        str(uuid.uuid4()),
        "someone",
        TaskKind.TXT2IMG,
        request.to_params(),
        checkpoint=sha,
        requires=(sha,),
    )
    return store.submit(task, max_pending=10).id


def test_the_local_worker_registers_claims_what_it_has_and_notices_new_files(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    migrate(url)
    db = create_db_engine(url)
    store = SqlTaskStore(db)
    nodes = SqlNodeStore(db)
    install_dummy_checkpoint(tmp_path / "models", "a")
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    ticks = Ticks()
    queue = LocalNodeQueue(store, nodes, registry, FakeEngine(), lookahead=8, monotonic=ticks)
    node_id = queue.register().node_id
    sha_a = registry.list(ModelKind.CHECKPOINT)[0].sha256
    record = nodes.get(node_id)
    assert record is not None
    assert (record.account, record.name) == (LOCAL_ACCOUNT, LOCAL_NODE_NAME)
    assert nodes.files(node_id) == {sha_a}
    assert store.runnable_somewhere([sha_a]) is True

    missing = submit(store, "d" * 64)
    runnable = submit(store, sha_a)
    blobs = InMemoryBlobStore()
    worker = Worker(queue, FakeEngine(), registry, blobs, worker_id=queue.worker_id, lease_s=30)
    assert worker.run_once() and not worker.run_once()  # the task for a file it lacks waits
    assert store.get(runnable).status == TaskStatus.SUCCESS  # type: ignore[union-attr]
    assert store.get(missing).status == TaskStatus.PENDING  # type: ignore[union-attr]
    assert nodes.get(node_id).tasks_done == 1  # type: ignore[union-attr]
    with db.connect() as conn:  # the local account earns nothing, not even a zero grant
        assert conn.execute(select(honor_grants.c.amount)).scalars().all() == []

    path = install_dummy_checkpoint(tmp_path / "models", "b")
    later = submit(store, registry.hashes.sha256(path))
    ticks.now += 10  # the next claim refreshes the node row (and rescans)
    assert worker.run_once()
    assert store.get(later).status == TaskStatus.SUCCESS  # type: ignore[union-attr]
    assert len(nodes.files(node_id)) == 2
    assert queue.register().id == queue.session_id  # refreshing keeps this process's session
    db.dispose()


def test_two_workers_on_one_data_dir_never_hand_back_each_others_tasks(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    migrate(url)
    db = create_db_engine(url)
    store, nodes = SqlTaskStore(db), SqlNodeStore(db)
    install_dummy_checkpoint(tmp_path / "models", "a")
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    first, second = (
        LocalNodeQueue(store, nodes, registry, FakeEngine(), lookahead=8) for _ in range(2)
    )
    first.register()
    second.register()
    sha_a = registry.list(ModelKind.CHECKPOINT)[0].sha256
    task_id = submit(store, sha_a)
    assert first.claim(first.worker_id, lease_s=30) is not None
    assert second.stop() == 0  # the other process stops: it held nothing
    assert store.get(task_id).status == TaskStatus.PROCESSING  # type: ignore[union-attr]
    assert first.stop() == 1
    assert store.get(task_id).status == TaskStatus.PENDING  # type: ignore[union-attr]
    db.dispose()


def test_a_dead_servers_worker_sessions_are_found_and_a_live_ones_are_not(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    migrate(url)
    db = create_db_engine(url)
    nodes = SqlNodeStore(db)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ids = {
        "dead": local_session_id(gone.pid),  # its server was killed
        "alive": local_session_id(os.getpid()),
        "elsewhere": f"other-host:{gone.pid}:abc",  # another machine's: not ours to judge
    }
    for session_id in ids.values():
        nodes.register(LOCAL_ACCOUNT, LOCAL_NODE_NAME, {}, [], [], session_id=session_id)
    found = orphaned(nodes.sessions_of(LOCAL_NODE_ID))
    assert [s.id for s in found] == [ids["dead"]]
    db.dispose()


def test_the_local_node_counts_its_runs_and_its_memory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    migrate(url)
    db = create_db_engine(url)
    metrics = Metrics()
    store, nodes = SqlTaskStore(db, observer=metrics), SqlNodeStore(db)
    install_dummy_checkpoint(tmp_path / "models", "a")
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    engine = FakeEngine()
    queue = LocalNodeQueue(store, nodes, registry, engine, lookahead=8, metrics=metrics)
    queue.register()
    submit(store, registry.list(ModelKind.CHECKPOINT)[0].sha256)
    worker = Worker(queue, engine, registry, InMemoryBlobStore(), worker_id="w", lease_s=30)
    assert worker.run_once()

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("dan_node_runs_total", node=LOCAL_NODE_ID, outcome="completed") == 1
    assert sample("dan_task_step_seconds_count", kind="txt2img") == 1
    used = sample("dan_worker_device_memory_bytes", device="cpu", kind="used")
    total = sample("dan_worker_device_memory_bytes", device="cpu", kind="total")
    assert used is not None and total is not None and 0 < used < total


def test_the_local_worker_batches_compatible_tasks_beyond_its_one_slot(tmp_path: Path) -> None:
    """It claims one task at a time (slots=1), but tasks like the first join its batch."""
    from dan.tasks.needs import batch_key

    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    migrate(url)
    db = create_db_engine(url)
    store = SqlTaskStore(db)
    install_dummy_checkpoint(tmp_path / "models", "a")
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    engine = FakeEngine(batch_max=4)
    queue = LocalNodeQueue(store, SqlNodeStore(db), registry, engine, lookahead=8)
    queue.register()
    sha = registry.list(ModelKind.CHECKPOINT)[0].sha256
    ids = []
    for seed in (1, 2, 3):
        request = GenerationRequest(
            f"p{seed}", "", seed, "Euler", 2, 7.0, 64, 64, ModelRef(sha, "m")
        )
        task = NewTask(
            str(uuid.uuid4()),
            "someone",
            TaskKind.TXT2IMG,
            request.to_params(),
            checkpoint=sha,
            requires=(sha,),
            batch_key=batch_key(request),
        )
        ids.append(store.submit(task, max_pending=10).id)
    worker = Worker(
        queue, engine, registry, InMemoryBlobStore(), worker_id=queue.worker_id, lease_s=30
    )
    assert worker.run_once()
    assert engine.batches == [["p1", "p2", "p3"]]
    assert [store.get(i).status for i in ids] == [TaskStatus.SUCCESS] * 3  # type: ignore[union-attr]
